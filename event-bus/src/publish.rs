//! [`Publish`]: anything events can be emitted on, which is what the
//! derive's `emit_*` helpers call.

use std::future::{self, Future};

use crate::event::Event;

/// Something events of type `E` can be published on: the bus, the
/// application's state, an outbox transaction.
///
/// The emit helpers that `#[derive(DomainEvent)]` writes (`emit_user_created`,
/// `emit_user_created_wait`) are provided methods of an extension trait
/// implemented for every `Publish<E>` type, so a request handler writes
/// `state.emit_user_created(&user)` whatever `state` publishes on, and code
/// generic over `impl Publish<AppEvent>` runs on the in-memory bus in one
/// deployment and on a durable outbox in another.
///
/// # Which types publish
///
/// - A type that exposes a bus, through `AsRef<EventBus<E>>`, publishes on
///   it: [`EventBus`](crate::EventBus) itself, `&EventBus`, `Arc<EventBus>`, and the
///   application's state once it has that one-method impl. `publish` is
///   [`EventBus::emit`](crate::EventBus::emit) and `publish_wait` is [`EventBus::emit_wait`](crate::EventBus::emit_wait),
///   inlined: the helpers cost what a direct `emit` costs.
/// - Any other type implements `Publish` itself, as the outbox below does.
///
/// That first rule is one blanket impl. It is why `Publish` has no
/// forwarding impls for `&P`, `Arc<P>` and `Box<P>` of every publisher:
/// `Arc<EventBus<E>>` is `AsRef<EventBus<E>>`, so such impls would overlap
/// it and the compiler rejects them (E0119). The blanket impl was chosen over
/// them because it keeps an application state that implements `AsRef` a
/// publisher without a line more, and leaves users free to implement
/// `Publish` for their own types (the compiler knows a local type is not
/// `AsRef<EventBus<E>>` unless its crate says so). Method calls see through
/// references and smart pointers anyway (`arc_tx.emit_user_created(..)`);
/// generic code takes `&impl Publish<E>`. A type that is `AsRef<EventBus<E>>`
/// cannot also implement `Publish<E>` itself: it already publishes on its
/// bus.
///
/// `Publish` is not object safe (`publish_wait` returns `impl Future`); take
/// it as a generic parameter.
///
/// # Examples
///
/// An outbox transaction buffers the events a request handler emits and
/// hands them over only at commit, so that an event is published if and only
/// if the handler's writes are:
///
/// ```
/// use std::sync::Mutex;
/// use event_bus::{DomainEvent, EventBus, Publish};
///
/// #[derive(Debug, PartialEq, DomainEvent)]
/// enum AppEvent {
///     UserCreated { id: u64 },
///     UserDeleted { id: u64 },
/// }
///
/// /// Events wait here until `commit`.
/// struct Outbox<'a> {
///     bus: &'a EventBus<AppEvent>,
///     pending: Mutex<Vec<AppEvent>>,
/// }
///
/// impl Publish<AppEvent> for Outbox<'_> {
///     fn publish(&self, event: AppEvent) {
///         self.pending.lock().unwrap().push(event);
///     }
/// }
///
/// impl Outbox<'_> {
///     fn commit(self) {
///         for event in self.pending.into_inner().unwrap() {
///             self.bus.emit(event);
///         }
///     }
/// }
///
/// // Written once, for the bus and for the outbox.
/// fn create_user(events: &impl Publish<AppEvent>, id: u64) {
///     // ... insert the row ...
///     events.emit_user_created(id);
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let bus = EventBus::new();
/// let mut users = bus.subscribe(event_bus::KindSet::all());
///
/// create_user(&bus, 1); // straight onto the bus
///
/// let tx = Outbox { bus: &bus, pending: Mutex::new(Vec::new()) };
/// create_user(&tx, 2);
/// tx.emit_user_deleted(1);
/// assert_eq!(users.len(), 1); // nothing published before the commit
/// tx.commit();
///
/// assert_eq!(**users.recv().await.unwrap(), AppEvent::UserCreated { id: 1 });
/// assert_eq!(**users.recv().await.unwrap(), AppEvent::UserCreated { id: 2 });
/// assert_eq!(**users.recv().await.unwrap(), AppEvent::UserDeleted { id: 1 });
/// # }
/// ```
pub trait Publish<E: Event> {
    /// Publishes `event`.
    ///
    /// Synchronous: never blocks and never fails the caller. What that
    /// means for delivery is the publisher's to say: the bus queues the
    /// event for its subscribers now ([`EventBus::emit`](crate::EventBus::emit)); an outbox
    /// transaction buffers it and writes it when it commits.
    fn publish(&self, event: E);

    /// Publishes `event`, first waiting for room where the publisher has a
    /// notion of it: on a bus, [`EventBus::emit_wait`](crate::EventBus::emit_wait), which waits while a
    /// backpressure subscriber is full.
    ///
    /// The default publishes at once and returns a ready future, which is
    /// right for a publisher that only buffers.
    fn publish_wait(&self, event: E) -> impl Future<Output = ()> + Send {
        self.publish(event);
        future::ready(())
    }
}
