//! [`EventBus`]: the handle applications emit on, subscribe to and spawn
//! listeners with.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use super::dead_letters::{DeadLetters, Store};
use super::listeners::{ListenerHandle, Runtime, ShutdownReport};
use super::queue::QueueConfig;
use super::shared::{OPEN, Router, Shared};
use super::subscription::Subscription;
use crate::envelope::Envelope;
use crate::event::{Event, EventKind, KindSet, Priority};
use crate::listener::{LagPolicy, ListenerOptions};
use crate::metrics::{BusExport, BusMetrics, KindCount};
use crate::publish::Publish;
use crate::runner::Spawnable;
use crate::sync::{AtomicU8, AtomicU64, AtomicUsize, Mutex, Ordering, lock};

/// The default queue capacity of subscriptions and listeners.
pub const DEFAULT_CAPACITY: usize = 1024;

/// The default number of dead letters a bus keeps.
pub const DEFAULT_DEAD_LETTER_CAPACITY: usize = 10_000;

/// The default fairness bound: the most higher-priority events a queue hands
/// out while a lower-priority lane waits, before that lane's oldest event.
pub const DEFAULT_FAIRNESS: usize = 32;

/// A typed domain-event bus.
///
/// `EventBus` is a cheap handle: clone it into every part of the application
/// that emits. All clones share one bus. When the last handle is dropped the
/// bus closes: subscriptions receive what is queued and then
/// [`RecvError::Closed`](crate::RecvError::Closed), and listeners finish their
/// queues and end.
///
/// See the [crate documentation](crate) for the delivery rules.
pub struct EventBus<E: Event> {
    shared: Arc<Shared<E>>,
}

/// Configures and builds an [`EventBus`].
///
/// # Examples
///
/// ```
/// # use event_bus::{EventBus, Event, EventKind};
/// # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
/// # enum Kind { Ping }
/// # impl EventKind for Kind {
/// #     const ALL: &'static [Self] = &[Kind::Ping];
/// #     fn index(self) -> usize { 0 }
/// #     fn name(self) -> &'static str { "ping" }
/// # }
/// # #[derive(Debug)]
/// # struct Ping;
/// # impl Event for Ping { type Kind = Kind; fn kind(&self) -> Kind { Kind::Ping } }
/// let bus = EventBus::<Ping>::builder()
///     .capacity(4096)
///     .fairness(8)
///     .dead_letter_capacity(100)
///     .build();
/// # drop(bus);
/// ```
pub struct Builder<E> {
    capacity: usize,
    fairness: usize,
    dead_letter_capacity: usize,
    _event: PhantomData<fn() -> E>,
}

impl<E: Event> Builder<E> {
    /// The default queue capacity of every subscription and listener that
    /// does not set its own. Default [`DEFAULT_CAPACITY`]; 0 is raised to 1.
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// The default fairness bound of every subscription and listener that
    /// does not set its own: while a lane of a queue has events waiting, at
    /// most this many events of higher priority are handed out before the
    /// lane's oldest. Default
    /// [`DEFAULT_FAIRNESS`]; 0 is raised to 1, and `usize::MAX` serves
    /// strictly by priority. See the crate's [Priority](crate#priority)
    /// section.
    #[must_use]
    pub fn fairness(mut self, bound: usize) -> Self {
        self.fairness = bound.max(1);
        self
    }

    /// How many dead letters the bus keeps before evicting the oldest.
    /// Default [`DEFAULT_DEAD_LETTER_CAPACITY`].
    #[must_use]
    pub fn dead_letter_capacity(mut self, capacity: usize) -> Self {
        self.dead_letter_capacity = capacity;
        self
    }

    /// Builds the bus.
    ///
    /// # Panics
    ///
    /// When the event's kind type is inconsistent: a kind whose
    /// [`EventKind::index`] is not its position in [`EventKind::ALL`].
    /// `#[derive(DomainEvent)]` always writes a consistent one; a
    /// hand-written `EventKind` is checked here, once, rather than failing
    /// in the middle of an emit.
    pub fn build(self) -> EventBus<E> {
        check_kinds::<E::Kind>();
        let kinds = E::Kind::ALL.len();
        let names: Vec<&'static str> = E::Kind::ALL.iter().map(|k| k.name()).collect();
        let shared = Shared {
            router: Mutex::new(Router {
                sequence: 0,
                listener_sequence: 0,
                closed: false,
                routes: (0..kinds).map(|_| Vec::new()).collect(),
                listener_routes: vec![0; kinds].into_boxed_slice(),
                emitted: vec![0; kinds].into_boxed_slice(),
                queues: Vec::new(),
            }),
            interested: (0..kinds).map(|_| AtomicUsize::new(0)).collect(),
            unrouted: (0..kinds).map(|_| AtomicU64::new(0)).collect(),
            rejected: AtomicU64::new(0),
            state: AtomicU8::new(OPEN),
            handles: AtomicUsize::new(1),
            capacity: self.capacity,
            fairness: self.fairness,
            next_queue_id: AtomicU64::new(0),
            runtime: Runtime::new(),
            dead_letters: Arc::new(Store::new(self.dead_letter_capacity)),
            export: BusExport::new(&names),
        };
        EventBus {
            shared: Arc::new(shared),
        }
    }
}

/// Checks that every kind's index is its position in `ALL`, which the bus's
/// routing tables and [`KindSet`] rely on.
fn check_kinds<K: EventKind>() {
    for (position, kind) in K::ALL.iter().enumerate() {
        let index = kind.index();
        assert!(
            index == position,
            "inconsistent `EventKind` for `{}`: `EventKind::index` of {:?} (`{}`) is {}, but it is at position {} in `EventKind::ALL`; `index()` must return each kind's position in `ALL`",
            std::any::type_name::<K>(),
            kind,
            kind.name(),
            index,
            position,
        );
    }
}

impl<E> Default for Builder<E> {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_CAPACITY,
            fairness: DEFAULT_FAIRNESS,
            dead_letter_capacity: DEFAULT_DEAD_LETTER_CAPACITY,
            _event: PhantomData,
        }
    }
}

impl<E> Clone for Builder<E> {
    fn clone(&self) -> Self {
        Self {
            capacity: self.capacity,
            fairness: self.fairness,
            dead_letter_capacity: self.dead_letter_capacity,
            _event: PhantomData,
        }
    }
}

impl<E> fmt::Debug for Builder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("capacity", &self.capacity)
            .field("fairness", &self.fairness)
            .field("dead_letter_capacity", &self.dead_letter_capacity)
            .finish()
    }
}

impl<E: Event> EventBus<E> {
    /// A bus with the default settings.
    pub fn new() -> Self {
        Builder::default().build()
    }

    /// A [`Builder`] to configure a bus.
    pub fn builder() -> Builder<E> {
        Builder::default()
    }

    /// Emits `event` to every subscription and listener interested in its
    /// kind.
    ///
    /// Never blocks, never fails and never runs a handler on the caller's
    /// stack: it queues one shared `Arc<Envelope<E>>` for each interested
    /// subscriber and wakes those that wait, in O(interested subscribers).
    /// An event nobody is interested in costs a counter increment.
    ///
    /// The event goes into the lane of its kind's [`Priority`] in each queue.
    /// A full lane is handled by the queue's [`LagPolicy`]: its oldest event
    /// is dropped and counted, or, under `Backpressure`, the event is queued
    /// past the capacity and counted as overflowed (use [`emit_wait`] to wait
    /// for room instead). After [`shutdown`] the event is counted as
    /// rejected.
    ///
    /// [`emit_wait`]: EventBus::emit_wait
    /// [`shutdown`]: EventBus::shutdown
    pub fn emit(&self, event: E) {
        let kind = event.kind();
        self.emit_as(event, kind, kind.priority());
    }

    /// A view of the bus that emits with `priority` instead of the priority
    /// of each event's kind: `bus.with_priority(Priority::High).emit(event)`.
    /// It [publishes](crate::Publish), so the derive's emit helpers work on
    /// it too.
    ///
    /// # Examples
    ///
    /// ```
    /// # use event_bus::{DomainEvent, EventBus, Priority};
    /// #[derive(Debug, DomainEvent)]
    /// enum Job {
    ///     Thumbnail(u64),
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let bus = EventBus::new();
    /// let mut jobs = bus.subscribe(JobKind::Thumbnail);
    /// bus.emit(Job::Thumbnail(1));
    /// bus.with_priority(Priority::High).emit_thumbnail(2); // the one a user waits for
    ///
    /// let first = jobs.recv().await.unwrap();
    /// assert_eq!(first.priority(), Priority::High);
    /// assert!(matches!(**first, Job::Thumbnail(2)));
    /// # }
    /// ```
    pub fn with_priority(&self, priority: Priority) -> Prioritized<'_, E> {
        Prioritized {
            bus: self,
            priority,
        }
    }

    /// Emits `event`, of `kind`, with `priority`: the kind is read once.
    #[inline]
    fn emit_as(&self, event: E, kind: E::Kind, priority: Priority) {
        let kind = kind.index();
        if !self.shared.accept(kind) {
            return;
        }
        let envelope = Arc::new(Envelope::with_priority(event, priority));
        self.shared.deliver_now(kind, envelope);
    }

    /// Emits `event`, first waiting for room in every interested subscriber
    /// whose policy is [`LagPolicy::Backpressure`].
    ///
    /// It waits until every backpressure subscriber interested in the event
    /// at the moment of delivery (one that subscribed while it waited
    /// included) has a place in the event's lane, and never takes a lane past
    /// its capacity. Subscribers under `DropOldest` are served as by
    /// [`emit`](EventBus::emit). If the bus shuts down while this waits, it
    /// returns at once and the event is counted as rejected.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes emits nothing and releases any
    /// room it had reserved.
    pub async fn emit_wait(&self, event: E) {
        let kind = event.kind();
        self.emit_wait_as(event, kind, kind.priority()).await;
    }

    /// Emits `event`, of `kind`, with `priority`, waiting for room as
    /// [`emit_wait`](EventBus::emit_wait) does.
    async fn emit_wait_as(&self, event: E, kind: E::Kind, priority: Priority) {
        let kind = kind.index();
        if !self.shared.accept(kind) {
            return;
        }
        let envelope = Arc::new(Envelope::with_priority(event, priority));
        // Nearly always every queue has room: deliver at once, as `emit`.
        let Err(envelope) = self.shared.deliver_if_room(kind, envelope) else {
            return;
        };
        self.shared.deliver_with_room(kind, envelope).await;
    }

    /// Subscribes to the kinds in `interests`, with the bus's default
    /// capacity and fairness bound and [`LagPolicy::DropOldest`].
    ///
    /// The subscription receives every event of those kinds emitted after
    /// this call, in emit order. Dropping it unsubscribes.
    pub fn subscribe(&self, interests: impl Into<KindSet<E::Kind>>) -> Subscription<E> {
        self.subscribe_with(interests, self.shared.capacity, LagPolicy::DropOldest)
    }

    /// Subscribes with an explicit queue `capacity` (per priority lane; 0 is
    /// raised to 1) and lag `policy`.
    pub fn subscribe_with(
        &self,
        interests: impl Into<KindSet<E::Kind>>,
        capacity: usize,
        policy: LagPolicy,
    ) -> Subscription<E> {
        let config = QueueConfig {
            capacity,
            policy,
            fairness: self.shared.fairness,
        };
        let queue = self.shared.make_queue(None, interests.into(), config);
        self.shared.route(&queue);
        Subscription::new(queue, self.shared.clone())
    }

    /// Spawns `listener` on the current tokio runtime with default
    /// [`ListenerOptions`]: a [`Listener`](crate::Listener), or a
    /// [`BatchListener`](crate::BatchListener), handed
    /// batches of what is queued when it is free, up to
    /// [`DEFAULT_MAX_BATCH`](crate::DEFAULT_MAX_BATCH) events.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime, as [`tokio::spawn`] does.
    pub fn spawn<L: Spawnable<E, M>, M>(&self, listener: L) -> ListenerHandle<E> {
        self.spawn_with(listener, ListenerOptions::new())
    }

    /// Spawns `listener` with `options`: a [`Listener`](crate::Listener), or a
    /// [`BatchListener`](crate::BatchListener), whose batches
    /// [`max_batch`](ListenerOptions::max_batch) and
    /// [`max_wait`](ListenerOptions::max_wait) shape.
    ///
    /// The listener's queue is registered before this returns, so it receives
    /// every event of interest emitted afterwards.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime, as [`tokio::spawn`] does.
    pub fn spawn_with<L: Spawnable<E, M>, M>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> ListenerHandle<E> {
        let queue = self.shared.listener_queue(
            listener.listener_name(),
            listener.listener_interests(),
            &options,
        );
        crate::memory::runtime::spawn(&self.shared, queue, listener, options)
    }

    /// Waits until every listener's queue is empty and no handler is running.
    ///
    /// Events that handlers emit while the bus settles are waited for too, so
    /// a chain of listeners is followed to its end. Tests and demos wait on
    /// this instead of sleeping. Subscriptions are not listeners and are not
    /// waited for: emits that reach only subscriptions do not hold it up.
    /// It returns once every listener is idle at one moment; while other
    /// tasks keep emitting to listeners it may wait as long as they do. A
    /// listener that never finishes its event keeps this pending: wrap it in
    /// [`tokio::time::timeout`] to bound the wait.
    pub async fn quiesce(&self) {
        self.shared.quiesce().await;
    }

    /// Shuts the bus down, in two phases, within `deadline`, and reports
    /// what every listener handled and what it left undelivered.
    ///
    /// 1. *Draining*: the bus refuses new events from outside its listeners
    ///    (each counted as rejected) while the listeners finish their queues.
    ///    Events a listener's handler emits meanwhile (the follow-ups of a
    ///    chain `A → B`) are still delivered, and waited for, as
    ///    [`quiesce`](Self::quiesce) does.
    /// 2. *Closing*: once every listener is idle, or the deadline has passed,
    ///    the bus closes: every emit is rejected, subscriptions end once
    ///    their queues are empty, and listeners end. Those still busy at the
    ///    deadline are stopped, as by [`ListenerHandle::abort`], and reported
    ///    with what they left undelivered.
    ///
    /// An emit counts as a listener's when it is made on the listener's own
    /// task (in its handler); a task the handler spawns is outside.
    ///
    /// Returns once every listener's task has ended, so the report is
    /// final: a stopped listener handles nothing after it. A handler that
    /// blocks its thread (rather than awaiting) cannot be stopped until it
    /// returns; shutdown waits for it at most [`ABORT_GRACE`] past the
    /// deadline and reports it as still running.
    ///
    /// Calling it again, or after the last handle of the bus dropped, reports
    /// again.
    ///
    /// [`ABORT_GRACE`]: crate::ABORT_GRACE
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        self.shared.shutdown(deadline).await
    }

    /// Whether the bus has begun shutting down: it accepts no more events
    /// from outside its listeners.
    pub fn is_closed(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) != OPEN
    }

    /// A snapshot of the bus's counters.
    ///
    /// The snapshot is consistent, even while other threads emit and
    /// listeners run: the per-listener identities documented on
    /// [`ListenerMetrics`](crate::ListenerMetrics) hold in every snapshot, and the emit counts are
    /// read at the same moment as the listeners' queues, so a listener
    /// spawned before any emit and interested in every kind has
    /// `delivered + dropped + queue_depth == emitted`.
    pub fn metrics(&self) -> BusMetrics {
        // Together: a listener that leaves the list moves its undelivered
        // events into `abandoned` under the same lock.
        let (listeners, abandoned) = self.shared.runtime.listed();
        let (emitted, counts) = {
            // Pushes and their emit counts happen under the emit lock: read
            // both under it, and every queue's counts agree with the
            // totals.
            let router = lock(&self.shared.router);
            let emitted: Vec<u64> = (self.shared.unrouted.iter().zip(router.emitted.iter()))
                .map(|(unrouted, routed)| unrouted.load(Ordering::Relaxed) + routed)
                .collect();
            let counts: Vec<_> = listeners.iter().map(|l| l.counts()).collect();
            (emitted, counts)
        };
        let emitted_by_kind: Vec<KindCount> = E::Kind::ALL
            .iter()
            .zip(emitted)
            .map(|(kind, emitted)| KindCount {
                event: kind.name(),
                emitted,
            })
            .collect();
        BusMetrics {
            emitted: emitted_by_kind.iter().map(|k| k.emitted).sum(),
            emitted_by_kind,
            rejected: self.shared.rejected(),
            abandoned,
            dead_letters_evicted: self.shared.dead_letters.evicted(),
            listeners: listeners
                .iter()
                .zip(counts)
                .map(|(listener, counts)| listener.metrics_from(counts))
                .collect(),
        }
    }

    /// The state the bus's handles share, for the crate's own tests.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared<E>> {
        &self.shared
    }

    /// The dead letters of this bus's listeners.
    pub fn dead_letters(&self) -> DeadLetters<E> {
        DeadLetters::new(self.shared.dead_letters.clone())
    }
}

impl<E: Event> Default for EventBus<E> {
    fn default() -> Self {
        Self::new()
    }
}

/// Lets the derive's emit helpers (`bus.emit_user_created(…)`) work on the bus
/// itself, as they do on any application state that implements
/// `AsRef<EventBus<E>>`.
impl<E: Event> AsRef<EventBus<E>> for EventBus<E> {
    fn as_ref(&self) -> &EventBus<E> {
        self
    }
}

impl<E: Event> Clone for EventBus<E> {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<E: Event> Drop for EventBus<E> {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.close();
        }
    }
}

impl<E: Event> fmt::Debug for EventBus<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("capacity", &self.shared.capacity)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// The bus, and everything that exposes one: see [which types
/// publish](Publish#which-types-publish).
impl<E: Event, T: AsRef<EventBus<E>> + ?Sized> Publish<E> for T {
    /// [`EventBus::emit`].
    #[inline]
    fn publish(&self, event: E) {
        self.as_ref().emit(event);
    }

    /// [`EventBus::emit_wait`].
    #[inline]
    fn publish_wait(&self, event: E) -> impl Future<Output = ()> + Send {
        self.as_ref().emit_wait(event)
    }
}

/// An [`EventBus`] that emits with one priority: see
/// [`EventBus::with_priority`].
///
/// With [`emit_wait`](Prioritized::emit_wait), an event waits for room in
/// its priority's lane only: a flood of normal events does not hold up a
/// high one.
#[derive(Debug, Clone, Copy)]
pub struct Prioritized<'a, E: Event> {
    bus: &'a EventBus<E>,
    priority: Priority,
}

impl<'a, E: Event> Prioritized<'a, E> {
    /// As [`EventBus::emit`], with this view's priority.
    pub fn emit(&self, event: E) {
        let kind = event.kind();
        self.bus.emit_as(event, kind, self.priority);
    }

    /// As [`EventBus::emit_wait`], with this view's priority. The future
    /// borrows the bus, not this view, so
    /// `bus.with_priority(p).emit_wait(event)` can be held and awaited later.
    pub fn emit_wait(&self, event: E) -> impl Future<Output = ()> + Send + use<'a, E> {
        let (bus, priority) = (self.bus, self.priority);
        async move {
            let kind = event.kind();
            bus.emit_wait_as(event, kind, priority).await;
        }
    }
}

impl<E: Event> Publish<E> for Prioritized<'_, E> {
    #[inline]
    fn publish(&self, event: E) {
        self.emit(event);
    }

    fn publish_wait(&self, event: E) -> impl Future<Output = ()> + Send {
        self.emit_wait(event)
    }
}
