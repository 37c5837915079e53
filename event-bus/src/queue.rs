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

use tokio::sync::Semaphore;

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
    /// Free places for `emit_wait`; `Some` only under `Backpressure`.
    pub(crate) permits: Option<Semaphore>,
    state: Mutex<State<E>>,
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
    /// Queued events that hold a `permits` place.
    permits_held: usize,
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
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        let export = QueueExport::new(&name);
        Self {
            id,
            name,
            interests,
            capacity,
            policy,
            permits: (policy == LagPolicy::Backpressure).then(|| Semaphore::new(capacity)),
            state: Mutex::new(State {
                buffer: VecDeque::with_capacity(capacity.min(1024)),
                unreported_lag: 0,
                delivered: 0,
                dropped: 0,
                overflowed: 0,
                permits_held: 0,
                closed: false,
                waker: None,
            }),
            in_flight: AtomicUsize::new(0),
            export,
        }
    }

    /// Queues `envelope`; returns the consumer's waker if it is waiting.
    ///
    /// `reserved` says the caller already took a `permits` place for it
    /// (`emit_wait`). Called only under the bus's emit lock.
    pub(crate) fn push(&self, envelope: Arc<Envelope<E>>, reserved: bool) -> Option<Waker> {
        let reserved = reserved || self.try_reserve();
        let mut state = lock(&self.state);
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
                LagPolicy::Backpressure => {
                    state.overflowed += 1;
                    self.export.overflowed();
                }
            }
        }
        if reserved {
            state.permits_held += 1;
        }
        state.buffer.push_back(envelope);
        self.export.depth(state.buffer.len());
        state.waker.take()
    }

    fn try_reserve(&self) -> bool {
        match &self.permits {
            Some(permits) => permits.try_acquire().map(|p| p.forget()).is_ok(),
            None => false,
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
        if state.permits_held > 0 {
            state.permits_held -= 1;
            if let Some(permits) = &self.permits {
                permits.add_permits(1);
            }
        }
        self.export.depth(state.buffer.len());
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
        if let Some(permits) = &self.permits {
            permits.close();
        }
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
