//! The bounded queue behind every subscription and listener.
//!
//! A queue has one lane per [`Priority`], each bounded by the queue's
//! capacity. The bus pushes into a queue only while it holds its emit lock,
//! so pushes are serialized and every lane sees its events in sequence
//! order. The consumer, a [`Receiver`], takes events out of a lane in
//! batches of up to [`BATCH`] under the queue's mutex and hands them out one
//! by one without it, so producer and consumer rarely meet on the lock; it
//! picks the lane for every event from a word of "lane has events" bits, so
//! a high-priority event pushed behind a taken batch is still handed out
//! next. Events a receiver has taken cannot be dropped any more; the lag it
//! reports is exactly the gap between what it took and what remains queued.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::envelope::Envelope;
use crate::error::{RecvError, TryRecvError};
use crate::event::{Event, KindSet, Priority};
use crate::listener::LagPolicy;
use crate::metrics::{LaneMetrics, QueueExport};
use crate::sync::{
    AtomicBool, AtomicU64, AtomicUsize, Mutex, Notify, Ordering, dekker_fence, lock, wait_until,
};
use crate::throttle::Throttle;

pub(crate) struct Queue<E: Event> {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    /// A listener's queue (not a subscription's): what `quiesce` waits for.
    pub(crate) listener: bool,
    pub(crate) interests: KindSet<E::Kind>,
    /// The capacity of each lane.
    pub(crate) capacity: usize,
    pub(crate) policy: LagPolicy,
    /// The most events of higher lanes handed out while an event of a lower
    /// lane waits.
    pub(crate) fairness: usize,
    state: Mutex<State<E>>,
    /// The counters of each lane, by [`Priority::lane`].
    lanes: [Lane; Priority::LANES],
    /// Bit `l` is set while lane `l` has events queued (not taken). Written
    /// under the lock; the receiver reads it without, to see that a higher
    /// lane has something for it.
    waiting: AtomicUsize,
    /// `emit_wait` callers waiting for room (backpressure only); a hand-out
    /// notifies `room` only when there are some.
    room_waiters: AtomicUsize,
    room: Notify,
    /// Events a listener has been handed but not finished. Raised before
    /// `taken` falls (which releases it), so an idle check that reads `taken`
    /// and then `in_flight` sees every event somewhere.
    in_flight: AtomicUsize,
    /// Rate-limits the consumer's lag warnings.
    lag_warnings: Throttle,
    /// Set when the bus starts shutting down: a batch listener then hands
    /// over what it collected instead of waiting for more.
    draining: AtomicBool,
    drain_started: Notify,
    export: QueueExport,
}

/// What one lane counts outside the lock.
#[derive(Default)]
struct Lane {
    /// The lane's buffer length, mirrored for [`Queue::has_room`], which
    /// reads it without the lock (written under it).
    queued: AtomicUsize,
    /// Events the receiver has taken from the lane but not handed out yet.
    taken: AtomicUsize,
    /// Places promised to `emit_wait` callers that waited for room and have
    /// not pushed yet. Reserved and pushed under the bus's emit lock, so
    /// `emit_wait` never takes the lane past its capacity.
    reserved: AtomicUsize,
    /// Events handed to the consumer so far (written by the receiver only).
    delivered: AtomicU64,
}

struct State<E> {
    lanes: [VecDeque<Arc<Envelope<E>>>; Priority::LANES],
    /// Dropped events not yet reported to the consumer.
    unreported_lag: u64,
    /// Events dropped to make room, left for the consumer to drop when it
    /// next takes from the queue (after releasing the lock): an event's last
    /// drop may close the span it was emitted in, which runs the tracing
    /// subscriber's code, and that must not happen on an emitter's stack.
    /// At most the capacity; past that the emitter drops them itself.
    evicted: Vec<Arc<Envelope<E>>>,
    /// Per lane: events queued since the queue was made. With `dropped` and
    /// the lane's `delivered` it gives the depth, so a snapshot's
    /// `delivered + dropped + depth` is exactly what was queued.
    pushed: [u64; Priority::LANES],
    dropped: [u64; Priority::LANES],
    overflowed: [u64; Priority::LANES],
    closed: bool,
    waker: Option<Waker>,
}

/// Counters of one queue, as one snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QueueCounts {
    pub(crate) lanes: [LaneCounts; Priority::LANES],
}

/// Counters of one lane.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LaneCounts {
    pub(crate) delivered: u64,
    pub(crate) dropped: u64,
    pub(crate) overflowed: u64,
    pub(crate) depth: usize,
}

impl QueueCounts {
    pub(crate) fn delivered(&self) -> u64 {
        self.lanes.iter().map(|l| l.delivered).sum()
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.lanes.iter().map(|l| l.dropped).sum()
    }

    pub(crate) fn overflowed(&self) -> u64 {
        self.lanes.iter().map(|l| l.overflowed).sum()
    }

    pub(crate) fn depth(&self) -> usize {
        self.lanes.iter().map(|l| l.depth).sum()
    }

    /// The per-lane part of a snapshot, highest priority first.
    pub(crate) fn lane_metrics(&self) -> Vec<LaneMetrics> {
        Priority::ALL
            .iter()
            .map(|&priority| {
                let lane = self.lane(priority);
                LaneMetrics {
                    priority,
                    delivered: lane.delivered,
                    dropped: lane.dropped,
                    overflowed: lane.overflowed,
                    queue_depth: lane.depth,
                }
            })
            .collect()
    }

    /// The counts of `priority`'s lane.
    pub(crate) fn lane(&self, priority: Priority) -> LaneCounts {
        self.lanes[priority.lane()]
    }
}

/// A queue's settings, as the bus registers it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueConfig {
    pub(crate) capacity: usize,
    pub(crate) policy: LagPolicy,
    pub(crate) fairness: usize,
}

impl<E: Event> Queue<E> {
    pub(crate) fn new(
        id: u64,
        name: Arc<str>,
        listener: bool,
        interests: KindSet<E::Kind>,
        config: QueueConfig,
    ) -> Self {
        let capacity = config.capacity.max(1);
        // Subscriptions share one label: one series per subscription would
        // grow without bound in the metrics backend.
        let export = QueueExport::new(if listener { &name } else { "subscription" });
        Self {
            id,
            name,
            listener,
            interests,
            capacity,
            policy: config.policy,
            fairness: config.fairness.max(1),
            room_waiters: AtomicUsize::new(0),
            room: Notify::new(),
            state: Mutex::new(State {
                lanes: std::array::from_fn(|lane| {
                    // Most events are normal: size that lane for a burst.
                    let normal = lane == Priority::Normal.lane();
                    VecDeque::with_capacity(if normal { capacity.min(1024) } else { 0 })
                }),
                unreported_lag: 0,
                evicted: Vec::new(),
                pushed: [0; Priority::LANES],
                dropped: [0; Priority::LANES],
                overflowed: [0; Priority::LANES],
                closed: false,
                waker: None,
            }),
            lanes: Default::default(),
            waiting: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            lag_warnings: Throttle::new(),
            draining: AtomicBool::new(false),
            drain_started: Notify::new(),
            export,
        }
    }

    /// Queues `envelope` in its priority's lane; returns the consumer's
    /// waker if it is waiting. An event dropped to make room goes into
    /// `evicted`, for the caller to drop after releasing its locks: the last
    /// drop of an event runs the application's code.
    ///
    /// `reserved` says the caller holds a place it reserved with
    /// [`Queue::try_reserve`]. Called only under the bus's emit lock.
    pub(crate) fn push(
        &self,
        envelope: Arc<Envelope<E>>,
        reserved: bool,
        evicted: &mut Evicted<E>,
    ) -> Option<Waker> {
        let lane = envelope.priority().lane();
        let counters = &self.lanes[lane];
        let mut state = lock(&self.state);
        if reserved {
            // Sequentially consistent, as every write of `reserved`: see
            // `Queue::release`.
            counters.reserved.fetch_sub(1, Ordering::SeqCst);
        }
        if state.closed {
            return None;
        }
        let state = &mut *state;
        let buffer = &mut state.lanes[lane];
        state.pushed[lane] += 1;
        let backpressure = self.policy == LagPolicy::Backpressure;
        // A place reserved by a waiting `emit_wait` (backpressure lanes only)
        // counts against the ceiling of plain emits, so that a reserved push
        // always finds its place and never drops an event.
        let promised = if backpressure {
            counters.reserved.load(Ordering::SeqCst)
        } else {
            0
        };
        // The bound is on what is queued: the batch the consumer has taken
        // cannot be dropped, and the oldest queued event is what goes, never
        // the newest.
        if !reserved && buffer.len() + promised >= self.policy.ceiling(self.capacity) {
            state.dropped[lane] += 1;
            state.unreported_lag += 1;
            self.export.dropped();
            if let Some(oldest) = buffer.pop_front() {
                // The consumer drops it (see `State::evicted`); past the
                // bound, the emitter does, after its locks.
                if state.evicted.len() < self.capacity {
                    state.evicted.push(oldest);
                } else {
                    evicted.push(Some(oldest));
                }
            }
        } else {
            let past_capacity = || {
                buffer.len() + counters.taken.load(Ordering::Acquire) + promised >= self.capacity
            };
            if backpressure && !reserved && past_capacity() {
                state.overflowed[lane] += 1;
                self.export.overflowed();
            }
            self.export.depth(1);
        }
        if buffer.is_empty() {
            self.mark_waiting(lane, true);
        }
        buffer.push_back(envelope);
        counters.queued.store(buffer.len(), Ordering::Relaxed);
        state.waker.take()
    }

    /// Whether `emit_wait` may push into `lane` without waiting: a
    /// backpressure lane with a free place, or any other lane. Called under
    /// the emit lock, without the queue's: pushes and reservations happen
    /// only under the emit lock, and the receiver only frees places, so a
    /// stale read can only under-count the room.
    pub(crate) fn has_room(&self, lane: usize) -> bool {
        let counters = &self.lanes[lane];
        self.policy != LagPolicy::Backpressure
            || counters.queued.load(Ordering::Acquire)
                + counters.taken.load(Ordering::Acquire)
                + counters.reserved.load(Ordering::SeqCst)
                < self.capacity
    }

    /// Places a backpressure lane counts against its capacity: queued,
    /// taken by the receiver but not handed out, and reserved. `taken` and
    /// `reserved` are read sequentially consistent: each is one half of a
    /// pair with the waiters' count (see [`Queue::handed_out`] and
    /// [`Queue::release`]).
    fn occupied(&self, state: &State<E>, lane: usize) -> usize {
        let counters = &self.lanes[lane];
        state.lanes[lane].len()
            + counters.taken.load(Ordering::SeqCst)
            + counters.reserved.load(Ordering::SeqCst)
    }

    /// Reserves a place in `lane` for a later [`push`](Queue::push). Called
    /// under the emit lock.
    pub(crate) fn try_reserve(&self, lane: usize) -> Reserve {
        let state = lock(&self.state);
        if state.closed {
            Reserve::Closed
        } else if self.occupied(&state, lane) < self.capacity {
            self.lanes[lane].reserved.fetch_add(1, Ordering::SeqCst);
            Reserve::Reserved
        } else {
            Reserve::Full
        }
    }

    /// Gives back a place reserved in `lane` that will not be pushed.
    ///
    /// The decrement and the read of the waiters' count in `notify_room` are
    /// sequentially consistent, as are a waiter's increment of that count
    /// and its read of `reserved` in `try_reserve`: of the two pairs, one
    /// side sees the other, so a waiter never misses the place given back.
    pub(crate) fn release(&self, lane: usize) {
        self.lanes[lane].reserved.fetch_sub(1, Ordering::SeqCst);
        self.notify_room();
    }

    /// Waits until a place may have freed up; `register` runs once the
    /// waiter is registered, so a place freed after it is not missed.
    pub(crate) async fn room_freed(&self, register: impl FnOnce() -> bool) {
        self.room_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = DecrementOnDrop(&self.room_waiters);
        dekker_fence();
        let notified = self.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if register() {
            notified.await;
        }
    }

    fn notify_room(&self) {
        dekker_fence();
        if self.room_waiters.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }

    /// As [`notify_room`](Self::notify_room), but only once the consumer
    /// has drained `lane` to its low watermark: a waiting emitter then fills
    /// a batch of places at once instead of waking for every place freed.
    ///
    /// The watermark counts what the consumer holds (queued and taken), not
    /// the places reserved by other waiting emitters: those are not the
    /// consumer's to free, and counting them could keep a waiter asleep
    /// while the lane has room.
    fn notify_room_drained(&self, lane: usize) {
        dekker_fence();
        if self.room_waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        let counters = &self.lanes[lane];
        let slack = (self.capacity / 2).clamp(1, BATCH);
        let held = counters.queued.load(Ordering::Acquire) + counters.taken.load(Ordering::Acquire);
        if held + slack <= self.capacity {
            self.room.notify_waiters();
        }
    }

    /// Sets or clears `lane`'s bit in [`waiting`](Self::waiting). Called
    /// under the lock, which every writer holds, so a load and a store do:
    /// no locked read-modify-write on the emit path.
    fn mark_waiting(&self, lane: usize, waiting: bool) {
        let bits = self.waiting.load(Ordering::Relaxed);
        let bits = if waiting {
            bits | 1 << lane
        } else {
            bits & !(1 << lane)
        };
        self.waiting.store(bits, Ordering::Release);
    }

    /// The lanes with events queued (not taken), as bits; read without the
    /// lock, so it may lag a push by a moment.
    fn waiting_lanes(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Moves up to [`BATCH`] events of `lane` into `taken`, which is empty,
    /// or reports a gap first.
    fn take(
        &self,
        lane: usize,
        taken: &mut VecDeque<Arc<Envelope<E>>>,
        graveyard: &mut Vec<Arc<Envelope<E>>>,
    ) -> Result<(), TryRecvError> {
        let mut state = lock(&self.state);
        self.report_lag(&mut state, graveyard)?;
        let buffer = &mut state.lanes[lane];
        let count = buffer.len().min(BATCH).min(self.capacity);
        taken.extend(buffer.drain(..count));
        if buffer.is_empty() {
            self.mark_waiting(lane, false);
        }
        let counters = &self.lanes[lane];
        // Under the lock, so an idle check never sees the batch in neither
        // place; `taken` first, so `has_room` never sees it in neither.
        counters.taken.store(taken.len(), Ordering::Release);
        counters.queued.store(buffer.len(), Ordering::Release);
        Ok(())
    }

    /// Called when the receiver saw no lane with events: reports a gap, or
    /// says the queue is closed, or registers `waker` and says it is empty.
    /// `Ok` means events arrived meanwhile.
    fn wait(
        &self,
        waker: Option<&Waker>,
        graveyard: &mut Vec<Arc<Envelope<E>>>,
    ) -> Result<(), TryRecvError> {
        let mut state = lock(&self.state);
        self.report_lag(&mut state, graveyard)?;
        if state.depth() > 0 {
            return Ok(());
        }
        if state.closed {
            return Err(TryRecvError::Closed);
        }
        if let Some(waker) = waker {
            match &mut state.waker {
                Some(current) if current.will_wake(waker) => {}
                slot => *slot = Some(waker.clone()),
            }
        }
        Err(TryRecvError::Empty)
    }

    /// Reports the gap since the last report, and hands the events dropped
    /// for it to `graveyard` (empty). Called under the lock: the caller
    /// logs the gap, with [`warn_lagged`](Self::warn_lagged), and drops the
    /// events after releasing the lock, which emitters take under the bus's
    /// emit lock.
    fn report_lag(
        &self,
        state: &mut State<E>,
        graveyard: &mut Vec<Arc<Envelope<E>>>,
    ) -> Result<(), TryRecvError> {
        if state.unreported_lag == 0 {
            return Ok(());
        }
        std::mem::swap(&mut state.evicted, graveyard);
        Err(TryRecvError::Lagged(std::mem::take(
            &mut state.unreported_lag,
        )))
    }

    /// Logs that the consumer lagged by `count`: at most one warning per
    /// [`Throttle::PERIOD`], which counts the drops of the warnings it held
    /// back.
    fn warn_lagged(&self, count: u64) {
        if let Some(since) = self.lag_warnings.admit(count) {
            tracing::warn!(
                queue = %self.name,
                dropped = since.total,
                reports = since.events,
                capacity = self.capacity,
                "consumer lagged: its queue was full and its oldest events were dropped"
            );
        }
    }

    /// Records that the receiver handed out an event of `lane`, leaving
    /// `remaining` taken.
    fn handed_out(&self, lane: usize, remaining: usize, track: bool) {
        if track {
            // Only the listener's task raises it; the store of `taken` below
            // publishes it.
            let in_flight = self.in_flight.load(Ordering::Relaxed);
            self.in_flight.store(in_flight + 1, Ordering::Relaxed);
        }
        let counters = &self.lanes[lane];
        // After `in_flight` rises: whoever sees `taken` fall sees that too.
        // Under backpressure, sequentially consistent: with the waiters'
        // count, it forms the pair (a waiter counts itself, then reads
        // `taken`; this writes `taken`, then reads the count) in which one
        // side must see the other, so no waiter misses the room freed.
        let order = if self.policy == LagPolicy::Backpressure {
            Ordering::SeqCst
        } else {
            Ordering::Release
        };
        // `delivered` first: a snapshot derives the depth from it, so the
        // event leaves the depth before its place is free to `emit_wait`
        // (a snapshot never shows a lane past its capacity). Release: a
        // snapshot that reads it sees the take, so the depth never goes
        // negative.
        counters.delivered.store(
            counters.delivered.load(Ordering::Relaxed) + 1,
            Ordering::Release,
        );
        counters.taken.store(remaining, order);
        self.export.depth(-1);
        if self.policy == LagPolicy::Backpressure {
            self.notify_room_drained(lane);
        }
    }

    /// Marks `count` tracked events as finished.
    #[inline]
    pub(crate) fn complete(&self, count: usize) {
        self.in_flight.fetch_sub(count, Ordering::SeqCst);
    }

    /// No event queued, taken or in flight.
    pub(crate) fn is_idle(&self) -> bool {
        let state = lock(&self.state);
        state.depth() == 0
            && self
                .lanes
                .iter()
                .all(|lane| lane.taken.load(Ordering::Acquire) == 0)
            && self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Takes out every event the closed queue still holds, for the caller to
    /// drop on its own stack after the lock: an `emit_wait` that still holds
    /// the queue may be the last to let go of it, and the drop of what it
    /// holds (the application's events, their emit spans) must not run on
    /// an emitter's stack.
    pub(crate) fn discard(&self) -> Discarded<E> {
        let mut state = lock(&self.state);
        let lanes = std::mem::replace(&mut state.lanes, std::array::from_fn(|_| VecDeque::new()));
        Discarded {
            _lanes: lanes,
            _evicted: std::mem::take(&mut state.evicted),
        }
    }

    /// Marks the queue's bus as shutting down, and wakes whoever waits in
    /// [`draining`](Self::draining).
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.drain_started.notify_waiters();
        self.room.notify_waiters();
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Completes once the bus has started shutting down.
    pub(crate) async fn draining(&self) {
        wait_until(&self.drain_started, || self.is_draining()).await;
    }

    /// Stops accepting events and wakes the consumer and any `emit_wait`
    /// caller waiting for room; queued events can still be received.
    pub(crate) fn close(&self) {
        let waker = {
            let mut state = lock(&self.state);
            state.closed = true;
            state.waker.take()
        };
        self.room.notify_waiters();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The queue's counters, consistent with each other: for every lane,
    /// `delivered + dropped + depth` is exactly what was queued in it.
    ///
    /// `pushed` and `dropped` are read under the lock, which every push
    /// holds, and `delivered` after them: an event is handed out only after
    /// its push, so `delivered` never exceeds `pushed - dropped`, and the
    /// depth is what is left.
    pub(crate) fn counts(&self) -> QueueCounts {
        let state = lock(&self.state);
        QueueCounts {
            lanes: std::array::from_fn(|lane| {
                let delivered = self.lanes[lane].delivered.load(Ordering::Acquire);
                let depth = (state.pushed[lane] - state.dropped[lane]).saturating_sub(delivered);
                LaneCounts {
                    delivered,
                    dropped: state.dropped[lane],
                    overflowed: state.overflowed[lane],
                    depth: usize::try_from(depth).unwrap_or(usize::MAX),
                }
            }),
        }
    }
}

#[cfg(feature = "metrics")]
impl<E: Event> Drop for Queue<E> {
    fn drop(&mut self) {
        // What it still held leaves the depth gauge with it: queues that
        // share a label add up in it.
        let depth = self.counts().depth();
        self.export.depth(-(depth as i64));
    }
}

impl<E> State<E> {
    /// Events queued over all lanes.
    fn depth(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }
}

impl<E: Event> std::fmt::Debug for Queue<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("interests", &self.interests)
            .field("capacity", &self.capacity)
            .field("policy", &self.policy)
            .field("fairness", &self.fairness)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

/// The most events a receiver takes from a lane at once.
pub(crate) const BATCH: usize = 32;

/// The consuming end of a queue: what a subscription or a listener task
/// receives through.
///
/// It decides which lane to serve at every event, from what it has taken
/// and the queue's [`waiting`](Queue::waiting_lanes) bits: the oldest event
/// of the highest lane with events, unless a lower lane with events has
/// been passed [`fairness`](Queue::fairness) times, in which case the lowest
/// such lane is served once.
pub(crate) struct Receiver<E: Event> {
    pub(crate) queue: Arc<Queue<E>>,
    /// Per lane: events taken from the queue and not handed out yet, all
    /// older than what the lane still queues.
    taken: [VecDeque<Arc<Envelope<E>>>; Priority::LANES],
    /// Per lane: events of higher lanes handed out since the lane's last
    /// while it had events waiting.
    passed: [usize; Priority::LANES],
    /// Events the queue dropped for a gap it reported, to drop once its lock
    /// is released (see `State::evicted`).
    graveyard: Vec<Arc<Envelope<E>>>,
}

impl<E: Event> Receiver<E> {
    pub(crate) fn new(queue: Arc<Queue<E>>) -> Self {
        Self {
            taken: std::array::from_fn(|lane| {
                let normal = lane == Priority::Normal.lane();
                VecDeque::with_capacity(if normal { BATCH.min(queue.capacity) } else { 0 })
            }),
            passed: [0; Priority::LANES],
            graveyard: Vec::new(),
            queue,
        }
    }

    /// Polls for the next event. `track` marks it as in flight until
    /// [`Queue::complete`] (the listener runtime's bookkeeping).
    ///
    /// Takes part in tokio's cooperative budget, as tokio's own channels do:
    /// once the task has used its budget this returns `Pending` (and wakes
    /// the task at once), so a consumer whose every event is ready still
    /// lets other tasks run, and can be aborted, between events.
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        track: bool,
    ) -> Poll<Result<Arc<Envelope<E>>, RecvError>> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let outcome = match self.next(Some(cx.waker()), track) {
            Ok(envelope) => Ok(envelope),
            Err(TryRecvError::Lagged(count)) => Err(RecvError::Lagged(count)),
            Err(TryRecvError::Closed) => Err(RecvError::Closed),
            // Dropping `coop` gives the unit of budget back.
            Err(TryRecvError::Empty) => return Poll::Pending,
        };
        coop.made_progress();
        Poll::Ready(outcome)
    }

    pub(crate) async fn recv(&mut self, track: bool) -> Result<Arc<Envelope<E>>, RecvError> {
        std::future::poll_fn(|cx| self.poll_recv(cx, track)).await
    }

    /// The next event if one is queued, without waiting.
    pub(crate) fn try_recv(&mut self, track: bool) -> Result<Arc<Envelope<E>>, TryRecvError> {
        self.next(None, track)
    }

    fn next(
        &mut self,
        waker: Option<&Waker>,
        track: bool,
    ) -> Result<Arc<Envelope<E>>, TryRecvError> {
        let next = self.next_unlogged(waker, track);
        if let Err(TryRecvError::Lagged(count)) = next {
            // Outside the lock, on the consumer's stack: the events dropped
            // for the gap, then its warning.
            self.graveyard.clear();
            self.queue.warn_lagged(count);
        }
        next
    }

    fn next_unlogged(
        &mut self,
        waker: Option<&Waker>,
        track: bool,
    ) -> Result<Arc<Envelope<E>>, TryRecvError> {
        loop {
            let queued = self.queue.waiting_lanes();
            let waiting: [bool; Priority::LANES] = std::array::from_fn(|lane| {
                !self.taken[lane].is_empty() || queued & (1 << lane) != 0
            });
            let Some(lane) = self.choose(&waiting) else {
                self.queue.wait(waker, &mut self.graveyard)?;
                continue;
            };
            let Some(envelope) = self.taken[lane].pop_front() else {
                self.queue
                    .take(lane, &mut self.taken[lane], &mut self.graveyard)?;
                continue;
            };
            #[expect(
                clippy::needless_range_loop,
                reason = "a zipped, skipped iterator here was not inlined: 100 instructions a delivery"
            )]
            for lower in lane + 1..Priority::LANES {
                if waiting[lower] {
                    self.passed[lower] = self.passed[lower].saturating_add(1);
                }
            }
            self.passed[lane] = 0;
            self.queue.handed_out(lane, self.taken[lane].len(), track);
            return Ok(envelope);
        }
    }

    /// The lane to serve next among those `waiting`: the lowest one passed
    /// as often as the fairness bound allows, or else the highest.
    fn choose(&self, waiting: &[bool; Priority::LANES]) -> Option<usize> {
        let starved = (0..Priority::LANES)
            .rev()
            .find(|&lane| waiting[lane] && self.passed[lane] >= self.queue.fairness);
        starved.or_else(|| (0..Priority::LANES).find(|&lane| waiting[lane]))
    }
}

impl<E: Event> std::fmt::Debug for Receiver<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let taken: Vec<usize> = self.taken.iter().map(VecDeque::len).collect();
        f.debug_struct("Receiver")
            .field("queue", &self.queue)
            .field("taken", &taken)
            .field("passed", &self.passed)
            .finish()
    }
}

/// What [`Queue::discard`] took out: dropped by its holder.
pub(crate) struct Discarded<E> {
    _lanes: [VecDeque<Arc<Envelope<E>>>; Priority::LANES],
    _evicted: Vec<Arc<Envelope<E>>>,
}

/// Events dropped from full queues during one delivery, held until the
/// delivery has released its locks. Allocates only for a second one.
pub(crate) struct Evicted<E> {
    first: Option<Arc<Envelope<E>>>,
    rest: Vec<Arc<Envelope<E>>>,
}

impl<E> Evicted<E> {
    pub(crate) fn new() -> Self {
        Self {
            first: None,
            rest: Vec::new(),
        }
    }

    fn push(&mut self, envelope: Option<Arc<Envelope<E>>>) {
        match (&self.first, envelope) {
            (_, None) => {}
            (None, envelope) => self.first = envelope,
            (Some(_), Some(envelope)) => self.rest.push(envelope),
        }
    }
}

/// The outcome of [`Queue::try_reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reserve {
    Reserved,
    Full,
    Closed,
}

struct DecrementOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wakers collected under a lock and woken after it is released, so a
/// consumer that wakes up never finds the emitter still holding the lock.
/// Mirrors tokio's internal `WakeList`: a fixed array, no allocation.
pub(crate) struct WakeList {
    wakers: [Option<Waker>; WakeList::CAPACITY],
    len: usize,
}

impl WakeList {
    /// Small, because the list is made and dropped on every emit that wakes
    /// a consumer; a fan-out to more parked consumers than this wakes them
    /// in groups.
    const CAPACITY: usize = 8;

    pub(crate) fn new() -> Self {
        Self {
            wakers: [const { None }; Self::CAPACITY],
            len: 0,
        }
    }

    /// Adds a waker; when the list is full it wakes them all first.
    pub(crate) fn push(&mut self, waker: Waker) {
        if self.len == Self::CAPACITY {
            self.wake_all();
        }
        self.wakers[self.len] = Some(waker);
        self.len += 1;
    }

    pub(crate) fn wake_all(&mut self) {
        for slot in &mut self.wakers[..self.len] {
            if let Some(waker) = slot.take() {
                waker.wake();
            }
        }
        self.len = 0;
    }
}
