//! The state a bus's handles, subscriptions and listener tasks share: the
//! routing table and emit order, the bus's state, and emitting into the
//! queues.

use std::sync::Arc;

use super::dead_letters::Store;
use super::listeners::Runtime;
use super::queue::{Evicted, Queue, QueueConfig, Reserve, WakeList};
use crate::envelope::Envelope;
use crate::event::{Event, EventKind, KindSet};
use crate::listener::{LagPolicy, ListenerOptions};
use crate::metrics::BusExport;
use crate::sync::{AtomicU8, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering, lock};

tokio::task_local! {
    /// On a listener's task: the address of its bus's `Shared`, so that an
    /// emit can tell whether it comes from one of the bus's listeners (which
    /// may still emit while the bus drains).
    pub(crate) static LISTENER_OF: usize;
}

/// Whether the current task is a listener of `shared`'s bus.
pub(crate) fn in_listener_of<E: Event>(shared: &Shared<E>) -> bool {
    let bus = shared as *const Shared<E> as usize;
    LISTENER_OF.try_with(|of| *of == bus).unwrap_or(false)
}

/// State shared by the bus handles, subscriptions and listener tasks.
pub(crate) struct Shared<E: Event> {
    pub(crate) router: Mutex<Router<E>>,
    /// Per kind: how many queues want it. Read without the lock so that an
    /// event nobody wants costs no lock and no allocation.
    pub(crate) interested: Box<[AtomicUsize]>,
    /// Per kind: emits that no queue wanted.
    pub(crate) unrouted: Box<[AtomicU64]>,
    pub(crate) rejected: AtomicU64,
    /// [`OPEN`], [`DRAINING`] or [`CLOSED`]; only ever moves forward.
    pub(crate) state: AtomicU8,
    pub(crate) handles: AtomicUsize,
    pub(crate) capacity: usize,
    pub(crate) fairness: usize,
    pub(crate) next_queue_id: AtomicU64,
    pub(crate) runtime: Runtime<E>,
    pub(crate) dead_letters: Arc<Store<E>>,
    pub(crate) export: BusExport,
}

/// The bus accepts every emit.
pub(crate) const OPEN: u8 = 0;
/// Shutting down: the bus accepts only its listeners' emits.
pub(crate) const DRAINING: u8 = 1;
/// Closed: the bus accepts nothing, and every queue is closed.
pub(crate) const CLOSED: u8 = 2;

/// Routing table and emit order, under one lock: holding it while an event is
/// numbered and queued gives every queue the same order.
pub(crate) struct Router<E: Event> {
    pub(crate) sequence: u64,
    /// Emits queued for at least one listener: `quiesce` looks for change
    /// in this, not in `sequence`, so that emits to subscriptions alone do
    /// not hold it up.
    pub(crate) listener_sequence: u64,
    pub(crate) closed: bool,
    /// Per kind: the queues interested in it, in id order.
    pub(crate) routes: Box<[Vec<Arc<Queue<E>>>]>,
    /// Per kind: how many of its queues are listeners'.
    pub(crate) listener_routes: Box<[usize]>,
    /// Per kind: emits delivered to at least one queue.
    pub(crate) emitted: Box<[u64]>,
    pub(crate) queues: Vec<Arc<Queue<E>>>,
}

impl<E: Event> Shared<E> {
    /// Whether an emit of `kind` must be delivered. One nobody wants is
    /// counted here; one that is delivered is counted under the emit lock,
    /// which its delivery takes anyway.
    #[inline]
    pub(crate) fn accept(&self, kind: usize) -> bool {
        let state = self.state.load(Ordering::Acquire);
        if state != OPEN && !(state == DRAINING && in_listener_of(self)) {
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
    pub(crate) fn reject(&self) {
        self.export.rejected();
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Numbers `envelope` and queues it for every queue interested in
    /// `kind`: an emit that reserved no places.
    pub(crate) fn deliver_now(&self, kind: usize, envelope: Arc<Envelope<E>>) {
        self.deliver(kind, envelope, &[]);
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
    pub(crate) fn deliver_if_room(
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
        // Made at the first waker: an emit whose consumers are awake wakes
        // nobody, and an empty list still cost its making and, at its
        // drop, a check of each of its slots.
        let mut wakers: Option<WakeList> = None;
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
                wakers.get_or_insert_with(WakeList::new).push(waker);
            }
        }
        drop(router);
        if let Some(mut wakers) = wakers {
            wakers.wake_all();
        }
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
    pub(crate) async fn deliver_with_room(&self, kind: usize, envelope: Arc<Envelope<E>>) {
        let lane = envelope.priority().lane();
        // Runs on the emitter's task: whether it is one of the bus's
        // listeners, which may still emit while the bus drains.
        let from_listener = in_listener_of(self);
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
    pub(crate) fn refuses_waiting(&self, from_listener: bool) -> bool {
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
    pub(crate) fn listener_queue(
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
