//! [`Meta`]: what a handler is told of the event it handles, besides the
//! event itself.

use uuid::Uuid;

use crate::envelope::Envelope;
use crate::event::{Event, Priority};
use crate::trace::TraceParent;

/// The identity of the event a handler is handling, and which attempt this
/// is.
///
/// Every handler receives one: [`Listener::handle`](crate::Listener::handle)
/// as its second parameter, and the `on_*` methods of a handler written with
/// `#[derive(DomainEvent)]` when they declare it as their last parameter
/// (`#[listener]` passes it to those that do). The id is the same on every
/// attempt and every tier, so a handler whose effect must happen once
/// records the ids it has applied; the attempt tells a first delivery from a
/// retry.
///
/// # Examples
///
/// ```
/// use std::collections::HashSet;
/// use std::sync::Mutex;
/// use event_bus::{DomainEvent, EventBus, HandlerError, Meta, listener};
///
/// #[derive(Debug, DomainEvent)]
/// enum Shop {
///     OrderPaid { order: u64 },
/// }
///
/// #[derive(Default)]
/// struct Mailer {
///     sent: Mutex<HashSet<uuid::Uuid>>,
/// }
///
/// #[listener]
/// impl ShopHandler for Mailer {
///     async fn on_order_paid(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
///         // Once per event, however often it is delivered.
///         if self.sent.lock().unwrap().insert(meta.id()) {
///             println!("receipt for order {order} (attempt {})", meta.attempt());
///         }
///         Ok(())
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// # let bus = EventBus::new();
/// # bus.spawn(Mailer::default());
/// # bus.emit_order_paid(7);
/// # bus.quiesce().await;
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    id: Uuid,
    name: &'static str,
    sequence: u64,
    priority: Priority,
    traceparent: Option<TraceParent>,
    attempt: u32,
}

impl Meta {
    /// The meta of `envelope` at attempt `attempt` (1 for the first): what
    /// the runner passes, and what a test of a handler passes.
    pub fn new<E: Event>(envelope: &Envelope<E>, attempt: u32) -> Self {
        Self {
            id: envelope.id(),
            name: envelope.name(),
            sequence: envelope.sequence(),
            priority: envelope.priority(),
            traceparent: envelope.traceparent(),
            attempt,
        }
    }

    /// The event's id: the same on every attempt, and wherever the event is
    /// carried. See [`Envelope::id`].
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The event's name, such as `"user.created"`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The event's position: the bus-wide sequence number on the memory
    /// tier. See [`Envelope::sequence`].
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The priority the event was emitted with.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The W3C trace context the event carries, if it has one: a tracing
    /// layer of the application can continue the trace from it. See
    /// [`Envelope::traceparent`].
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.traceparent
    }

    /// Which attempt this is: 1 for the first, 2 for the first retry.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}
