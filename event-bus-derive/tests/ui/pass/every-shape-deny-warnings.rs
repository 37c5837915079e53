//! A public event enum in a crate that denies warnings and missing docs: the
//! generated items carry docs and trigger no lint.
#![deny(warnings, missing_docs)]

use event_bus::{DomainEvent, EventBus, HandlerError, Meta, listener};

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
    /// A user was removed.
    #[event(name = "user.removed")]
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

fn assert_send<T: Send>(_: &T) {}

fn main() {
    let bus = EventBus::<AppEvent>::new();
    bus.emit_user_created(UserEventData { id: 1 });
    bus.emit_user_deleted(1, "spam".to_owned());
    bus.emit_cache_flushed();
    let waiting = bus.emit_user_created_wait(UserEventData { id: 2 });
    assert_send(&waiting);
    drop(waiting);
    let _: fn(&EventBus<AppEvent>, Mailer) = |bus, mailer| {
        bus.spawn(mailer);
    };
}
