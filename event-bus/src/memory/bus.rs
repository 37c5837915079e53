//! [`EventBus`]: the handle applications emit on, subscribe to and spawn
//! listeners with.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use super::dead_letters::{DeadLetters, Store};
use crate::envelope::Envelope;
use crate::event::{Event, EventKind, KindSet, Priority};
use crate::listener::LagPolicy;
use crate::listener::ListenerOptions;
use crate::memory::queue::{Evicted, Queue, QueueConfig, Reserve, WakeList};
use crate::memory::runtime::{ListenerHandle, Runtime, ShutdownReport};
use crate::memory::subscription::Subscription;
use crate::metrics::{BusExport, BusMetrics, KindCount};
use crate::runner::Spawnable;
use crate::sync::{AtomicU8, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering, lock};

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
        self.shared.deliver(kind, envelope, &[]);
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

impl<E: Event> crate::Publish<E> for Prioritized<'_, E> {
    #[inline]
    fn publish(&self, event: E) {
        self.emit(event);
    }

    fn publish_wait(&self, event: E) -> impl Future<Output = ()> + Send {
        self.emit_wait(event)
    }
}

/// State shared by the bus handles, subscriptions and listener tasks.
pub(crate) struct Shared<E: Event> {
    pub(crate) router: Mutex<Router<E>>,
    /// Per kind: how many queues want it. Read without the lock so that an
    /// event nobody wants costs no lock and no allocation.
    interested: Box<[AtomicUsize]>,
    /// Per kind: emits that no queue wanted.
    unrouted: Box<[AtomicU64]>,
    rejected: AtomicU64,
    /// [`OPEN`], [`DRAINING`] or [`CLOSED`]; only ever moves forward.
    state: AtomicU8,
    handles: AtomicUsize,
    capacity: usize,
    fairness: usize,
    next_queue_id: AtomicU64,
    pub(crate) runtime: Runtime<E>,
    pub(crate) dead_letters: Arc<Store<E>>,
    export: BusExport,
}

/// The bus accepts every emit.
const OPEN: u8 = 0;
/// Shutting down: the bus accepts only its listeners' emits.
const DRAINING: u8 = 1;
/// Closed: the bus accepts nothing, and every queue is closed.
const CLOSED: u8 = 2;

/// Routing table and emit order, under one lock: holding it while an event is
/// numbered and queued gives every queue the same order.
pub(crate) struct Router<E: Event> {
    pub(crate) sequence: u64,
    /// Emits queued for at least one listener: `quiesce` looks for change
    /// in this, not in `sequence`, so that emits to subscriptions alone do
    /// not hold it up.
    pub(crate) listener_sequence: u64,
    closed: bool,
    /// Per kind: the queues interested in it, in id order.
    routes: Box<[Vec<Arc<Queue<E>>>]>,
    /// Per kind: how many of its queues are listeners'.
    listener_routes: Box<[usize]>,
    /// Per kind: emits delivered to at least one queue.
    emitted: Box<[u64]>,
    queues: Vec<Arc<Queue<E>>>,
}

impl<E: Event> Shared<E> {
    /// Whether an emit of `kind` must be delivered. One nobody wants is
    /// counted here; one that is delivered is counted under the emit lock,
    /// which its delivery takes anyway.
    #[inline]
    fn accept(&self, kind: usize) -> bool {
        let state = self.state.load(Ordering::Acquire);
        if state != OPEN && !(state == DRAINING && crate::memory::runtime::in_listener_of(self)) {
            self.reject();
            return false;
        }
        // A hand-written kind missing from `EventKind::ALL` has nowhere to
        // go; refuse it rather than index past the tables.
        let Some(interested) = self.interested.get(kind) else {
            self.reject();
            return false;
        };
        if interested.load(Ordering::Relaxed) > 0 {
            return true;
        }
        self.unrouted[kind].fetch_add(1, Ordering::Relaxed);
        self.export.emitted(kind);
        false
    }

    /// Counts an emit the bus refused. Not logged here, on the emitter's
    /// stack, where a slow log sink would block the emit: the count is in
    /// the metrics and the shutdown report, which `shutdown` logs.
    fn reject(&self) {
        self.export.rejected();
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Numbers `envelope` and queues it for every queue interested in `kind`.
    /// `reserved` holds the places the caller reserved in some of them.
    fn deliver(&self, kind: usize, envelope: Arc<Envelope<E>>, reserved: &[Reservation<E>]) {
        let router = lock(&self.router);
        if router.closed {
            drop(router);
            self.reject();
            return;
        }
        self.deliver_locked(router, kind, envelope, reserved);
    }

    /// As [`deliver`](Self::deliver) if every backpressure queue interested
    /// in `kind` has room; otherwise gives `envelope` back, delivering nothing.
    fn deliver_if_room(
        &self,
        kind: usize,
        envelope: Arc<Envelope<E>>,
    ) -> Result<(), Arc<Envelope<E>>> {
        let router = lock(&self.router);
        if router.closed {
            drop(router);
            self.reject();
            return Ok(());
        }
        let lane = envelope.priority().lane();
        if !router.routes[kind].iter().all(|queue| queue.has_room(lane)) {
            return Err(envelope);
        }
        self.deliver_locked(router, kind, envelope, &[]);
        Ok(())
    }

    fn deliver_locked(
        &self,
        mut router: MutexGuard<'_, Router<E>>,
        kind: usize,
        mut envelope: Arc<Envelope<E>>,
        reserved: &[Reservation<E>],
    ) {
        let mut wakers = WakeList::new();
        router.emitted[kind] += 1;
        self.export.emitted(kind);
        router.sequence += 1;
        if router.listener_routes[kind] > 0 {
            router.listener_sequence += 1;
        }
        if let Some(unshared) = Arc::get_mut(&mut envelope) {
            unshared.set_sequence(router.sequence);
        }
        let mut evicted = Evicted::new();
        for queue in &router.routes[kind] {
            let holds_room = reserved.iter().any(|r| r.take(queue.id));
            if let Some(waker) = queue.push(envelope.clone(), holds_room, &mut evicted) {
                wakers.push(waker);
            }
        }
        drop(router);
        wakers.wake_all();
        drop(evicted);
    }

    /// Delivers `envelope` once every backpressure queue interested in
    /// `kind` holds a place reserved for it in the envelope's lane, waiting
    /// for room as needed.
    ///
    /// Places are reserved under the emit lock, as pushes are, so `emit_wait`
    /// never takes a lane past its capacity; and the queues are those routed
    /// at delivery, so a subscriber that joined during the wait gets a place
    /// too. While it waits for a queue, it holds places only in queues of
    /// lower id (it gives back the others): two callers never wait for each
    /// other's places.
    async fn deliver_with_room(&self, kind: usize, envelope: Arc<Envelope<E>>) {
        let lane = envelope.priority().lane();
        // Runs on the emitter's task: whether it is one of the bus's
        // listeners, which may still emit while the bus drains.
        let from_listener = crate::memory::runtime::in_listener_of(self);
        let mut reservations: Vec<Reservation<E>> = Vec::new();
        loop {
            let full = {
                let router = lock(&self.router);
                if router.closed || self.refuses_waiting(from_listener) {
                    drop(router);
                    // Dropping them gives the reserved places back.
                    drop(reservations);
                    self.reject();
                    return;
                }
                let mut full = None;
                let backpressure = router.routes[kind]
                    .iter()
                    .filter(|queue| queue.policy == LagPolicy::Backpressure);
                for queue in backpressure {
                    if reservations.iter().any(|r| r.queue.id == queue.id) {
                        continue;
                    }
                    match queue.try_reserve(lane) {
                        Reserve::Reserved => {
                            reservations.push(Reservation::new(queue.clone(), lane))
                        }
                        Reserve::Full => {
                            full = Some(queue.clone());
                            break;
                        }
                        Reserve::Closed => {}
                    }
                }
                match full {
                    Some(full) => full,
                    None => {
                        self.deliver_locked(router, kind, envelope, &reservations);
                        return;
                    }
                }
            };
            // Dropping a reservation gives its place back.
            reservations.retain(|r| r.queue.id < full.id);
            loop {
                let mut outcome = Reserve::Full;
                full.room_freed(|| {
                    let _router = lock(&self.router);
                    if self.refuses_waiting(from_listener) {
                        // The next round rejects the event.
                        outcome = Reserve::Closed;
                        return false;
                    }
                    outcome = full.try_reserve(lane);
                    outcome == Reserve::Full
                })
                .await;
                match outcome {
                    Reserve::Reserved => {
                        reservations.push(Reservation::new(full, lane));
                        break;
                    }
                    // A closed queue has no room to wait for; the bus may
                    // have closed, which the next round sees.
                    Reserve::Closed => break,
                    Reserve::Full => {}
                }
            }
        }
    }

    /// Whether an `emit_wait` that is waiting for room must give up: the bus
    /// is draining and the emit does not come from one of its listeners.
    fn refuses_waiting(&self, from_listener: bool) -> bool {
        !from_listener && self.state.load(Ordering::Acquire) == DRAINING
    }

    /// Creates a queue, not yet routed. Unnamed queues are subscriptions.
    pub(crate) fn make_queue(
        &self,
        name: Option<Arc<str>>,
        interests: KindSet<E::Kind>,
        config: QueueConfig,
    ) -> Arc<Queue<E>> {
        let id = self.next_queue_id.fetch_add(1, Ordering::Relaxed);
        let listener = name.is_some();
        let name = name.unwrap_or_else(|| format!("subscription-{id}").into());
        Arc::new(Queue::new(id, name, listener, interests, config))
    }

    /// Routes the kinds of `queue` to it; on a closed bus, closes it.
    pub(crate) fn route(&self, queue: &Arc<Queue<E>>) {
        let mut router = lock(&self.router);
        if router.closed {
            drop(router);
            queue.close();
            return;
        }
        if self.state.load(Ordering::Acquire) == DRAINING {
            // `begin_draining` stores the state before it takes this lock to
            // list the queues: a queue routed after that is marked here.
            queue.start_draining();
        }
        for kind in queue.interests.iter() {
            router.routes[kind.index()].push(queue.clone());
            if queue.listener {
                router.listener_routes[kind.index()] += 1;
            }
            self.interested[kind.index()].fetch_add(1, Ordering::Relaxed);
        }
        router.queues.push(queue.clone());
    }

    /// Removes a queue from routing and closes it.
    pub(crate) fn unregister(&self, queue: &Queue<E>) {
        {
            let mut router = lock(&self.router);
            for kind in queue.interests.iter() {
                let route = &mut router.routes[kind.index()];
                if let Some(at) = route.iter().position(|q| q.id == queue.id) {
                    route.remove(at);
                    if queue.listener {
                        router.listener_routes[kind.index()] -= 1;
                    }
                    self.interested[kind.index()].fetch_sub(1, Ordering::Relaxed);
                }
            }
            router.queues.retain(|q| q.id != queue.id);
        }
        queue.close();
    }

    /// Stops accepting events and closes every queue; queued events can
    /// still be received.
    pub(crate) fn close(&self) {
        self.state.store(CLOSED, Ordering::Release);
        let queues = {
            let mut router = lock(&self.router);
            router.closed = true;
            for route in router.routes.iter_mut() {
                route.clear();
            }
            router.listener_routes.fill(0);
            for interested in self.interested.iter() {
                interested.store(0, Ordering::Relaxed);
            }
            std::mem::take(&mut router.queues)
        };
        for queue in queues {
            queue.close();
        }
        self.runtime.closed(&self.dead_letters);
    }

    /// Makes the queue of a listener named `name`, with the settings of its
    /// `options`, or else the bus's; the runtime routes it.
    fn listener_queue(
        &self,
        name: &str,
        interests: KindSet<E::Kind>,
        options: &ListenerOptions,
    ) -> Arc<Queue<E>> {
        let config = QueueConfig {
            capacity: options.capacity.unwrap_or(self.capacity),
            policy: options.lag_policy,
            fairness: options.fairness.unwrap_or(self.fairness),
        };
        self.make_queue(Some(name.into()), interests, config)
    }

    pub(crate) fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Starts the first phase of shutdown: only listeners' emits are
    /// accepted from now on. Does nothing once closed.
    ///
    /// Wakes the `emit_wait` callers waiting for room, so that those from
    /// outside the listeners see the refusal at once, and the batch
    /// listeners waiting for their batches to fill.
    pub(crate) fn begin_draining(&self) {
        let _ = self
            .state
            .compare_exchange(OPEN, DRAINING, Ordering::AcqRel, Ordering::Acquire);
        let queues: Vec<Arc<Queue<E>>> = lock(&self.router).queues.clone();
        for queue in queues {
            queue.start_draining();
        }
    }

    /// How many emits have been queued for at least one listener.
    pub(crate) fn listener_sequence(&self) -> u64 {
        lock(&self.router).listener_sequence
    }
}

/// A place reserved in a queue by `emit_wait`: used by the push, or given
/// back when the push does not happen (the future was dropped, or the queue
/// left the route).
struct Reservation<E: Event> {
    queue: Arc<Queue<E>>,
    lane: usize,
    used: std::cell::Cell<bool>,
}

impl<E: Event> Reservation<E> {
    fn new(queue: Arc<Queue<E>>, lane: usize) -> Self {
        Self {
            queue,
            lane,
            used: std::cell::Cell::new(false),
        }
    }

    /// Whether this reserves a place in queue `id`; if so it is now used.
    fn take(&self, id: u64) -> bool {
        let matches = self.queue.id == id && !self.used.get();
        if matches {
            self.used.set(true);
        }
        matches
    }
}

impl<E: Event> Drop for Reservation<E> {
    fn drop(&mut self) {
        if !self.used.get() {
            self.queue.release(self.lane);
        }
    }
}
