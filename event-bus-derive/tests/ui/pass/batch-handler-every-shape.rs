//! The batch handler scaffolding for every variant shape, under
//! `deny(warnings)`, used through `#[listener]` as a `BatchListener`.

#![deny(warnings, missing_docs)]

use std::sync::Arc;

use event_bus::{
    Batch, BatchError, BatchFailure, DomainEvent, Envelope, EventBus, Meta, listener,
};

/// Events.
#[derive(Debug, DomainEvent)]
pub enum AppEvent {
    /// Unit.
    #[event(priority = "low")]
    CacheCleared,
    /// Newtype.
    PostPublished(u64),
    /// One field.
    #[event(priority = "high")]
    UserDeleted {
        /// Id.
        id: u64,
    },
    /// Several fields.
    UserRenamed {
        /// Id.
        id: u64,
        /// New name.
        name: String,
    },
    /// Fields named like the generated code's own variables.
    Moved {
        /// Where to.
        position: u64,
        /// Wrapped in what.
        envelope: String,
        /// The batch it came in.
        batch: u32,
    },
}

struct Indexer;

#[listener(name = "indexer")]
impl AppEventBatchHandler for Indexer {
    async fn on_cache_cleared(&self, count: usize, metas: &[event_bus::Meta]) -> Result<(), BatchError> {
        assert_eq!(count, metas.len());
        Ok(())
    }

    async fn on_post_published(&self, batch: &[&u64]) -> Result<(), BatchError> {
        let _ids: Vec<u64> = batch.iter().map(|id| **id).collect();
        Ok(())
    }

    async fn on_user_deleted(&self, batch: &[&u64], metas: &[Meta]) -> Result<(), BatchError> {
        assert_eq!(batch.len(), metas.len());
        Ok(())
    }

    async fn on_user_renamed(&self, batch: &[(&u64, &String)]) -> Result<(), BatchError> {
        for (index, (_id, name)) in batch.iter().enumerate() {
            if name.is_empty() {
                return Err(BatchError::event(index, "empty name"));
            }
        }
        Ok(())
    }

    async fn on_moved(&self, batch: &[(&u64, &String, &u32)]) -> Result<(), BatchError> {
        let _ = batch;
        Ok(())
    }
}

fn main() {
    use event_bus::{EventKind, Priority};
    assert_eq!(AppEventKind::UserDeleted.priority(), Priority::High);
    assert_eq!(AppEventKind::CacheCleared.priority(), Priority::Low);
    assert_eq!(AppEventKind::PostPublished.priority(), Priority::Normal);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bus = EventBus::<AppEvent>::new();
        let handle = bus.spawn(Indexer);
        assert_eq!(handle.name(), "indexer");

        // The dispatcher takes a `Batch`, whose failure mode it follows.
        let renamed = |name: &str| AppEvent::UserRenamed {
            id: 1,
            name: name.to_string(),
        };
        let events = [
            AppEvent::PostPublished(1),
            renamed("ada"),
            renamed(""),
            AppEvent::CacheCleared,
        ];
        let batch = Batch::new(events.into_iter().map(|e| Arc::new(Envelope::new(e))).collect())
            .with_failure_mode(BatchFailure::StopAtFirst);
        let error = Indexer.dispatch_batch(&batch).await.unwrap_err();
        assert_eq!(error.to_string(), "event 2: empty name");
    });
}
