//! A write: the transaction a handler writes its rows in and emits its
//! events on (the store's outbox), so that the rows and their events commit
//! together or not at all.
//!
//! ```text
//! let mut tx = state.write().await?;
//! let post = db::insert_post(&mut *tx, …).await?;
//! tx.emit_post_created(&post);
//! state.commit(tx).await?;
//! ```
//!
//! Once committed, the events also go to this process's bus, for the
//! listeners whose state dies with the process (the cache).

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, PoisonError};

use event_bus::Publish;
use event_bus::sql::Outbox;
use sqlx::{Any, AnyConnection};

use super::AppState;
use super::error::ApiError;
use super::events::AppEvent;

/// A handler's transaction: a `&mut AnyConnection` for its queries, and a
/// publisher for the derive's `tx.emit_…` helpers.
///
/// Each event emitted marks the cache keys it will make stale as in flux
/// at once (see `cache`), so a read right after the commit does not see
/// the entry cached before it. Dropped or failed without committing, the
/// write takes its marks back: no event of it will clear them.
pub(crate) struct Write {
    /// `None` once committed.
    outbox: Option<Outbox<AppEvent, Any>>,
    events: Mutex<Vec<AppEvent>>,
    #[cfg(feature = "cache")]
    cache: std::sync::Arc<super::cache::Cache>,
}

impl AppState {
    /// Begins a write (on SQLite, once the writers before it are done).
    pub(crate) async fn write(&self) -> Result<Write, ApiError> {
        let outbox = self.store.begin().await.map_err(store_error)?;
        Ok(Write {
            outbox: Some(outbox),
            events: Mutex::new(Vec::new()),
            #[cfg(feature = "cache")]
            cache: self.cache.clone(),
        })
    }

    /// Commits `write`, its rows and its events, then emits the events on
    /// this process's bus. The handlers run it within
    /// [`detached`](Self::detached), so that nothing but a crash comes
    /// between the two; and a crash takes the cache, all the bus serves,
    /// with it.
    pub(crate) async fn commit(&self, write: Write) -> Result<(), ApiError> {
        for event in write.commit().await? {
            self.bus.emit_wait(event).await;
        }
        Ok(())
    }
}

impl Write {
    /// Commits; returns the events now in the log.
    async fn commit(mut self) -> Result<Vec<AppEvent>, ApiError> {
        let Some(outbox) = self.outbox.take() else {
            return Ok(Vec::new());
        };
        match outbox.commit().await {
            Ok(_) => Ok(std::mem::take(self.events())),
            Err(error) => {
                self.take_back_marks();
                Err(store_error(error))
            }
        }
    }

    fn events(&mut self) -> &mut Vec<AppEvent> {
        self.events
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn take_back_marks(&mut self) {
        let events = std::mem::take(self.events());
        #[cfg(feature = "cache")]
        for event in &events {
            self.cache.unexpect(event);
        }
        #[cfg(not(feature = "cache"))]
        let _ = events;
    }
}

impl Drop for Write {
    fn drop(&mut self) {
        if self.outbox.is_some() {
            self.take_back_marks();
        }
    }
}

impl Publish<AppEvent> for Write {
    fn publish(&self, event: AppEvent) {
        let Some(outbox) = &self.outbox else {
            return;
        };
        #[cfg(feature = "cache")]
        self.cache.expect(&event);
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event.clone());
        outbox.publish(event);
    }
}

impl Deref for Write {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        // `commit` takes the outbox and the write with it.
        self.outbox
            .as_ref()
            .expect("a write's outbox is there until its commit")
    }
}

impl DerefMut for Write {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.outbox
            .as_mut()
            .expect("a write's outbox is there until its commit")
    }
}

/// The store's errors as answers: the database's as [`ApiError::from`]
/// maps them (a busy pool is a 503), the rest a 500.
pub(crate) fn store_error(error: event_bus::sql::Error) -> ApiError {
    match error {
        event_bus::sql::Error::Database(error) => error.into(),
        other => ApiError::Internal(other.into()),
    }
}
