//! The bounded queue behind every subscription and listener.
//!
//! The bus pushes into a queue only while it holds its emit lock, so pushes
//! are serialized and every queue sees events in sequence order. The
//! consumer, a [`Receiver`], takes events out in batches of up to
//! [`BATCH`] under the queue's mutex and hands them out one by one without
//! it, so producer and consumer rarely meet on the lock. Events a receiver
//! has taken cannot be dropped any more; the lag it reports is exactly the
//! gap between its batch and what remains queued.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

use crate::envelope::Envelope;
use crate::error::{RecvError, TryRecvError};
use crate::event::{Event, KindSet};
use crate::metrics::QueueExport;

/// What a subscription's queue does when an event arrives and it is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum LagPolicy {
    /// Drop the oldest queued event to make room, count it, and report the
    /// gap to the consumer as [`RecvError::Lagged`] before the next event.
    ///
    /// The emitter never waits. The default: a slow consumer loses its oldest
    /// events, never the newest, and never silently.
    #[default]
    DropOldest,
    /// Never drop. [`EventBus::emit_wait`](crate::EventBus::emit_wait) waits
    /// until the queue has room; [`EventBus::emit`](crate::EventBus::emit),
    /// which must not block, queues past the capacity and counts the event as
    /// overflowed.
    Backpressure,
}

/// Locks a mutex, ignoring poisoning: no code that can panic runs while the
/// crate's locks are held, and a poisoned lock still guards consistent data.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct Queue<E: Event> {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) interests: KindSet<E::Kind>,
    pub(crate) capacity: usize,
    pub(crate) policy: LagPolicy,
    state: Mutex<State<E>>,
    /// Places promised to `emit_wait` callers that waited for room and have
    /// not pushed yet. Reserved and pushed under the bus's emit lock, so
    /// `emit_wait` never takes the queue past its capacity.
    reserved: AtomicUsize,
    /// `emit_wait` callers waiting for room (backpressure only); a pop
    /// notifies `room` only when there are some.
    room_waiters: AtomicUsize,
    room: Notify,
    /// `state.buffer.len()`, mirrored for [`Queue::has_room`], which reads
    /// it without the lock (written under it).
    queued: AtomicUsize,
    /// Events handed to the consumer so far (written by the receiver only).
    delivered: AtomicU64,
    /// Events the receiver has taken in its batch but not handed out yet.
    taken: AtomicUsize,
    /// Events a listener has been handed but not finished. Raised before
    /// `taken` falls (which releases it), so an idle check that reads `taken`
    /// and then `in_flight` sees every event somewhere.
    in_flight: AtomicUsize,
    export: QueueExport,
}

struct State<E> {
    buffer: VecDeque<Arc<Envelope<E>>>,
    /// Dropped events not yet reported to the consumer.
    unreported_lag: u64,
    dropped: u64,
    overflowed: u64,
    closed: bool,
    waker: Option<Waker>,
}

/// Counters of one queue, as one snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QueueCounts {
    pub(crate) delivered: u64,
    pub(crate) dropped: u64,
    pub(crate) overflowed: u64,
    pub(crate) depth: usize,
    pub(crate) in_flight: usize,
}

impl<E: Event> Queue<E> {
    pub(crate) fn new(
        id: u64,
        name: Arc<str>,
        interests: KindSet<E::Kind>,
        capacity: usize,
        policy: LagPolicy,
    ) -> Self {
        let capacity = capacity.max(1);
        let export = QueueExport::new(&name);
        Self {
            id,
            name,
            interests,
            capacity,
            policy,
            reserved: AtomicUsize::new(0),
            room_waiters: AtomicUsize::new(0),
            room: Notify::new(),
            state: Mutex::new(State {
                buffer: VecDeque::with_capacity(capacity.min(1024)),
                unreported_lag: 0,
                dropped: 0,
                overflowed: 0,
                closed: false,
                waker: None,
            }),
            queued: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            taken: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            export,
        }
    }

    /// Queues `envelope`; returns the consumer's waker if it is waiting.
    ///
    /// `reserved` says the caller holds a place it reserved with
    /// [`Queue::try_reserve`]. Called only under the bus's emit lock.
    pub(crate) fn push(&self, envelope: Arc<Envelope<E>>, reserved: bool) -> Option<Waker> {
        let mut state = lock(&self.state);
        if reserved {
            self.reserved.fetch_sub(1, Ordering::Relaxed);
        }
        if state.closed {
            return None;
        }
        if state.buffer.len() >= self.capacity {
            match self.policy {
                LagPolicy::DropOldest => {
                    state.buffer.pop_front();
                    state.dropped += 1;
                    state.unreported_lag += 1;
                    self.export.dropped();
                }
                LagPolicy::Backpressure if !reserved => {
                    state.overflowed += 1;
                    self.export.overflowed();
                }
                LagPolicy::Backpressure => {}
            }
        }
        state.buffer.push_back(envelope);
        self.queued.store(state.buffer.len(), Ordering::Relaxed);
        self.export.depth(state.buffer.len());
        state.waker.take()
    }

    /// Whether `emit_wait` may push without waiting: a backpressure queue
    /// with a free place, or any other queue. Called under the emit lock,
    /// without the queue's: pushes and reservations happen only under the
    /// emit lock, and the receiver only frees places, so a stale read can
    /// only under-count the room.
    pub(crate) fn has_room(&self) -> bool {
        self.policy != LagPolicy::Backpressure
            || self.queued.load(Ordering::Acquire)
                + self.taken.load(Ordering::Acquire)
                + self.reserved.load(Ordering::Relaxed)
                < self.capacity
    }

    /// Places a backpressure queue counts against its capacity: queued,
    /// taken by the receiver but not handed out, and reserved. `taken` is
    /// read sequentially consistent: see [`Receiver`]'s hand-out.
    fn occupied(&self, state: &State<E>) -> usize {
        state.buffer.len()
            + self.taken.load(Ordering::SeqCst)
            + self.reserved.load(Ordering::Relaxed)
    }

    /// Reserves a place for a later [`push`](Queue::push). Called under the
    /// emit lock.
    pub(crate) fn try_reserve(&self) -> Reserve {
        let state = lock(&self.state);
        if state.closed {
            Reserve::Closed
        } else if self.occupied(&state) < self.capacity {
            self.reserved.fetch_add(1, Ordering::Relaxed);
            Reserve::Reserved
        } else {
            Reserve::Full
        }
    }

    /// Gives back a reserved place that will not be pushed.
    pub(crate) fn release(&self) {
        self.reserved.fetch_sub(1, Ordering::Relaxed);
        self.notify_room();
    }

    /// Waits until a place may have freed up; `register` runs once the
    /// waiter is registered, so a place freed after it is not missed.
    pub(crate) async fn room_freed(&self, register: impl FnOnce() -> bool) {
        self.room_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = DecrementOnDrop(&self.room_waiters);
        let notified = self.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if register() {
            notified.await;
        }
    }

    fn notify_room(&self) {
        if self.room_waiters.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }

    /// As [`notify_room`](Self::notify_room), but only once the queue has
    /// drained to its low watermark: a waiting emitter then fills a batch of
    /// places at once instead of waking for every place freed.
    fn notify_room_drained(&self) {
        if self.room_waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        let slack = (self.capacity / 2).clamp(1, BATCH);
        let occupied = self.queued.load(Ordering::Acquire)
            + self.taken.load(Ordering::Acquire)
            + self.reserved.load(Ordering::Relaxed);
        if occupied + slack <= self.capacity {
            self.room.notify_waiters();
        }
    }

    /// Moves up to [`BATCH`] events into `batch`, or says why it cannot:
    /// a gap to report, nothing queued (registering `waker`), or closed.
    fn refill(
        &self,
        batch: &mut VecDeque<Arc<Envelope<E>>>,
        waker: Option<&Waker>,
    ) -> Result<(), TryRecvError> {
        let mut state = lock(&self.state);
        if state.unreported_lag > 0 {
            let count = std::mem::take(&mut state.unreported_lag);
            drop(state);
            tracing::warn!(
                queue = %self.name,
                dropped = count,
                capacity = self.capacity,
                "consumer lagged: its queue was full and its oldest events were dropped"
            );
            return Err(TryRecvError::Lagged(count));
        }
        if state.buffer.is_empty() {
            if state.closed {
                return Err(TryRecvError::Closed);
            }
            if let Some(waker) = waker {
                match &mut state.waker {
                    Some(current) if current.will_wake(waker) => {}
                    slot => *slot = Some(waker.clone()),
                }
            }
            return Err(TryRecvError::Empty);
        }
        let count = state.buffer.len().min(BATCH).min(self.capacity);
        batch.extend(state.buffer.drain(..count));
        // Under the lock, so an idle check never sees the batch in neither
        // place; `taken` first, so `has_room` never sees the batch in neither.
        self.taken.store(batch.len(), Ordering::Release);
        self.queued.store(state.buffer.len(), Ordering::Release);
        self.export.depth(state.buffer.len());
        Ok(())
    }

    /// Hands out the next event of `batch`.
    fn hand_out(
        &self,
        batch: &mut VecDeque<Arc<Envelope<E>>>,
        track: bool,
    ) -> Option<Arc<Envelope<E>>> {
        let envelope = batch.pop_front()?;
        if track {
            // Only the listener's task raises it; the store of `taken` below
            // publishes it.
            crate::metrics::bump_usize(&self.in_flight, 1);
        }
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
        self.taken.store(batch.len(), order);
        crate::metrics::bump(&self.delivered, 1);
        if self.policy == LagPolicy::Backpressure {
            self.notify_room_drained();
        }
        Some(envelope)
    }

    /// Marks one tracked event as finished.
    pub(crate) fn complete(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// No event queued, taken or in flight.
    pub(crate) fn is_idle(&self) -> bool {
        let state = lock(&self.state);
        state.buffer.is_empty()
            && self.taken.load(Ordering::Acquire) == 0
            && self.in_flight.load(Ordering::SeqCst) == 0
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

    pub(crate) fn counts(&self) -> QueueCounts {
        let state = lock(&self.state);
        QueueCounts {
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: state.dropped,
            overflowed: state.overflowed,
            depth: state.buffer.len() + self.taken.load(Ordering::Acquire),
            in_flight: self.in_flight.load(Ordering::SeqCst),
        }
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
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

/// The most events a receiver takes from its queue at once.
pub(crate) const BATCH: usize = 32;

/// The consuming end of a queue: what a subscription or a listener task
/// receives through.
pub(crate) struct Receiver<E: Event> {
    pub(crate) queue: Arc<Queue<E>>,
    batch: VecDeque<Arc<Envelope<E>>>,
}

impl<E: Event> Receiver<E> {
    pub(crate) fn new(queue: Arc<Queue<E>>) -> Self {
        Self {
            batch: VecDeque::with_capacity(BATCH.min(queue.capacity)),
            queue,
        }
    }

    /// Polls for the next event. `track` marks it as in flight until
    /// [`Queue::complete`] (the listener runtime's bookkeeping).
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        track: bool,
    ) -> Poll<Result<Arc<Envelope<E>>, RecvError>> {
        match self.next(Some(cx.waker()), track) {
            Ok(envelope) => Poll::Ready(Ok(envelope)),
            Err(TryRecvError::Lagged(count)) => Poll::Ready(Err(RecvError::Lagged(count))),
            Err(TryRecvError::Closed) => Poll::Ready(Err(RecvError::Closed)),
            Err(TryRecvError::Empty) => Poll::Pending,
        }
    }

    pub(crate) async fn recv(&mut self, track: bool) -> Result<Arc<Envelope<E>>, RecvError> {
        std::future::poll_fn(|cx| self.poll_recv(cx, track)).await
    }

    pub(crate) fn try_recv(&mut self) -> Result<Arc<Envelope<E>>, TryRecvError> {
        self.next(None, false)
    }

    fn next(
        &mut self,
        waker: Option<&Waker>,
        track: bool,
    ) -> Result<Arc<Envelope<E>>, TryRecvError> {
        loop {
            if let Some(envelope) = self.queue.hand_out(&mut self.batch, track) {
                return Ok(envelope);
            }
            self.queue.refill(&mut self.batch, waker)?;
        }
    }
}

impl<E: Event> std::fmt::Debug for Receiver<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("queue", &self.queue)
            .field("batch", &self.batch.len())
            .finish()
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
    /// Small, because the list is made and dropped on every emit; a fan-out
    /// to more parked consumers than this wakes them in groups.
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
