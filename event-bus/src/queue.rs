//! The bounded queue behind every subscription and listener.
//!
//! The bus pushes into a queue only while it holds its emit lock, so pushes
//! are serialized and every queue sees events in sequence order. The consumer
//! pops concurrently; the queue's own mutex covers both ends and keeps the lag
//! accounting exact.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// `emit_wait` callers waiting for room (backpressure only); a pop
    /// notifies `room` only when there are some.
    room_waiters: AtomicUsize,
    room: Notify,
    /// Events a listener has taken but not finished. Raised under the state
    /// lock as the event is popped, so an idle check that holds the lock sees
    /// the event either queued or in flight, never neither.
    in_flight: AtomicUsize,
    export: QueueExport,
}

struct State<E> {
    buffer: VecDeque<Arc<Envelope<E>>>,
    /// Dropped events not yet reported to the consumer.
    unreported_lag: u64,
    delivered: u64,
    dropped: u64,
    overflowed: u64,
    /// Places promised to `emit_wait` callers that waited for room and have
    /// not pushed yet. Reserved and pushed under the bus's emit lock, so
    /// `emit_wait` never takes the queue past its capacity.
    reserved: usize,
    closed: bool,
    waker: Option<Waker>,
}

/// Counters of one queue, read together under its lock.
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
            room_waiters: AtomicUsize::new(0),
            room: Notify::new(),
            state: Mutex::new(State {
                buffer: VecDeque::with_capacity(capacity.min(1024)),
                unreported_lag: 0,
                delivered: 0,
                dropped: 0,
                overflowed: 0,
                reserved: 0,
                closed: false,
                waker: None,
            }),
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
            state.reserved -= 1;
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
        self.export.depth(state.buffer.len());
        state.waker.take()
    }

    /// Whether `emit_wait` may push without waiting: a backpressure queue
    /// with a free place, or any other queue. Called under the emit lock.
    pub(crate) fn has_room(&self) -> bool {
        if self.policy != LagPolicy::Backpressure {
            return true;
        }
        let state = lock(&self.state);
        state.closed || state.buffer.len() + state.reserved < self.capacity
    }

    /// Reserves a place for a later [`push`](Queue::push). Called under the
    /// emit lock.
    pub(crate) fn try_reserve(&self) -> Reserve {
        let mut state = lock(&self.state);
        if state.closed {
            Reserve::Closed
        } else if state.buffer.len() + state.reserved < self.capacity {
            state.reserved += 1;
            Reserve::Reserved
        } else {
            Reserve::Full
        }
    }

    /// Gives back a reserved place that will not be pushed.
    pub(crate) fn release(&self) {
        lock(&self.state).reserved -= 1;
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

    /// Polls for the next event. `track` marks a popped event as in flight
    /// until [`Queue::complete`] (the listener runtime's bookkeeping).
    pub(crate) fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        track: bool,
    ) -> Poll<Result<Arc<Envelope<E>>, RecvError>> {
        let mut state = lock(&self.state);
        match self.pop(&mut state, track) {
            Ok(envelope) => Poll::Ready(Ok(envelope)),
            Err(TryRecvError::Lagged(count)) => Poll::Ready(Err(RecvError::Lagged(count))),
            Err(TryRecvError::Closed) => Poll::Ready(Err(RecvError::Closed)),
            Err(TryRecvError::Empty) => {
                match &mut state.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    pub(crate) fn try_recv(&self) -> Result<Arc<Envelope<E>>, TryRecvError> {
        self.pop(&mut lock(&self.state), false)
    }

    fn pop(&self, state: &mut State<E>, track: bool) -> Result<Arc<Envelope<E>>, TryRecvError> {
        if state.unreported_lag > 0 {
            let count = std::mem::take(&mut state.unreported_lag);
            tracing::warn!(
                queue = %self.name,
                dropped = count,
                capacity = self.capacity,
                "consumer lagged: its queue was full and its oldest events were dropped"
            );
            return Err(TryRecvError::Lagged(count));
        }
        let Some(envelope) = state.buffer.pop_front() else {
            return Err(if state.closed {
                TryRecvError::Closed
            } else {
                TryRecvError::Empty
            });
        };
        state.delivered += 1;
        if track {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
        }
        self.export.depth(state.buffer.len());
        if self.policy == LagPolicy::Backpressure {
            self.notify_room();
        }
        Ok(envelope)
    }

    /// Marks one tracked event as finished; returns how many remain in flight.
    pub(crate) fn complete(&self) -> usize {
        self.in_flight.fetch_sub(1, Ordering::SeqCst) - 1
    }

    /// No event queued and none in flight.
    pub(crate) fn is_idle(&self) -> bool {
        let state = lock(&self.state);
        state.buffer.is_empty() && self.in_flight.load(Ordering::SeqCst) == 0
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
            delivered: state.delivered,
            dropped: state.dropped,
            overflowed: state.overflowed,
            depth: state.buffer.len(),
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
    const CAPACITY: usize = 32;

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
