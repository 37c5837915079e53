//! A public event enum in a crate that denies warnings and missing docs: the
//! generated items carry docs and trigger no lint.
#![deny(warnings, missing_docs)]

use std::sync::Mutex;

use event_bus::{DomainEvent, EventBus, HandlerError, Meta, Publish, listener};

/// A user, as listeners see it.
#[derive(Debug, Clone)]
pub struct UserEventData {
    /// Id.
    pub id: u64,
}

/// The application's events.
#[derive(Debug, DomainEvent)]
pub enum AppEvent {
    /// A user signed up.
    UserCreated(UserEventData),
    /// A user was removed: stored as `user.deleted` and `account.closed`
    /// before its rename.
    #[event(name = "user.removed", alias = "user.deleted")]
    #[event(alias = "account.closed")]
    UserDeleted {
        /// Id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// The cache was flushed.
    CacheFlushed,
    /// Never emitted by helpers.
    #[event(skip_emit)]
    Internal(u8),
}

/// Handles one kind.
pub struct Mailer;

#[listener]
impl AppEventHandler for Mailer {
    async fn on_user_created(&self, data: &UserEventData) -> Result<(), HandlerError> {
        let _ = data.id;
        Ok(())
    }

    async fn on_user_deleted(&self, id: &u64, _: &String, meta: Meta) -> Result<(), HandlerError> {
        let _ = (id, meta.id(), meta.attempt());
        Ok(())
    }

    async fn on_cache_flushed(&self, meta: event_bus::Meta) -> Result<(), HandlerError> {
        let _ = meta;
        Ok(())
    }
}

/// A publisher of its own: buffers events, like an outbox transaction.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Mutex<Vec<AppEvent>>,
}

impl Publish<AppEvent> for Outbox {
    fn publish(&self, event: AppEvent) {
        self.pending.lock().unwrap().push(event);
    }
}

fn assert_send<T: Send>(_: &T) {}

fn main() {
    use event_bus::EventKind;
    assert_eq!(
        AppEventKind::UserDeleted.aliases(),
        ["user.deleted", "account.closed"]
    );
    assert_eq!(AppEventKind::CacheFlushed.aliases(), [] as [&str; 0]);
    for name in ["user.removed", "user.deleted", "account.closed"] {
        assert_eq!(AppEventKind::from_name(name), Some(AppEventKind::UserDeleted));
    }
    assert_eq!(AppEventKind::from_name("internal"), Some(AppEventKind::Internal));
    assert_eq!(AppEventKind::from_name("user.gone"), None);

    let bus = EventBus::<AppEvent>::new();
    bus.emit_user_created(UserEventData { id: 1 });
    bus.emit_user_deleted(1, "spam".to_owned());
    bus.emit_cache_flushed();
    let waiting = bus.emit_user_created_wait(UserEventData { id: 2 });
    assert_send(&waiting);
    drop(waiting);
    let outbox = Outbox::default();
    outbox.emit_user_created(UserEventData { id: 3 });
    let waiting = outbox.emit_cache_flushed_wait();
    assert_send(&waiting);
    drop(waiting);
    assert_eq!(outbox.pending.lock().unwrap().len(), 2);
    let _: fn(&EventBus<AppEvent>, Mailer) = |bus, mailer| {
        bus.spawn(mailer);
    };
}
