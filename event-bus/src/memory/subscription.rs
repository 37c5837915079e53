//! [`Subscription`]: a queue of the events a consumer is interested in.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;

use crate::envelope::Envelope;
use crate::error::{Lagged, RecvError, TryRecvError};
use crate::event::{Event, KindSet, Priority};
use crate::listener::LagPolicy;
use crate::memory::queue::{Queue, Receiver};
use crate::memory::shared::Shared;
use crate::metrics::LaneMetrics;

/// Receives the events of the kinds it subscribed to, in emit order.
///
/// Made by [`EventBus::subscribe`](crate::EventBus::subscribe). Dropping it
/// unsubscribes and discards what is queued. Also a [`Stream`] of
/// `Result<Arc<Envelope<E>>, Lagged>` that ends when the bus closes.
///
/// # Examples
///
/// ```
/// # use event_bus::{EventBus, Event, EventKind, KindSet, RecvError};
/// # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
/// # enum Kind { Ping, Pong }
/// # impl EventKind for Kind {
/// #     const ALL: &'static [Self] = &[Kind::Ping, Kind::Pong];
/// #     fn index(self) -> usize { self as usize }
/// #     fn name(self) -> &'static str { ["ping", "pong"][self as usize] }
/// # }
/// # #[derive(Debug, PartialEq)]
/// # enum Msg { Ping(u32), Pong }
/// # impl Event for Msg { type Kind = Kind; fn kind(&self) -> Kind {
/// #     match self { Msg::Ping(_) => Kind::Ping, Msg::Pong => Kind::Pong } } }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let bus = EventBus::new();
/// let mut pings = bus.subscribe(Kind::Ping);
///
/// bus.emit(Msg::Ping(1));
/// bus.emit(Msg::Pong); // not of interest: never queued, never wakes `pings`
/// bus.emit(Msg::Ping(2));
/// drop(bus);
///
/// assert_eq!(**pings.recv().await.unwrap(), Msg::Ping(1));
/// assert_eq!(**pings.recv().await.unwrap(), Msg::Ping(2));
/// assert_eq!(pings.recv().await.unwrap_err(), RecvError::Closed);
/// # }
/// ```
pub struct Subscription<E: Event> {
    receiver: Receiver<E>,
    shared: Arc<Shared<E>>,
}

impl<E: Event> Subscription<E> {
    pub(crate) fn new(queue: Arc<Queue<E>>, shared: Arc<Shared<E>>) -> Self {
        Self {
            receiver: Receiver::new(queue),
            shared,
        }
    }

    fn queue(&self) -> &Queue<E> {
        &self.receiver.queue
    }

    /// Receives the next event.
    ///
    /// # Errors
    ///
    /// - [`RecvError::Lagged(n)`](RecvError::Lagged): the queue was full and
    ///   its `n` oldest events were dropped; the next call returns the oldest
    ///   event still queued.
    /// - [`RecvError::Closed`]: the bus closed and the queue is empty.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: an event is taken from the queue only when this returns.
    pub async fn recv(&mut self) -> Result<Arc<Envelope<E>>, RecvError> {
        self.receiver.recv(false).await
    }

    /// Receives the next event if one is queued, without waiting.
    ///
    /// # Errors
    ///
    /// [`TryRecvError::Empty`] when nothing is queued, otherwise as
    /// [`recv`](Self::recv).
    pub fn try_recv(&mut self) -> Result<Arc<Envelope<E>>, TryRecvError> {
        self.receiver.try_recv(false)
    }

    /// The kinds this subscription receives.
    pub fn interests(&self) -> &KindSet<E::Kind> {
        &self.queue().interests
    }

    /// The capacity of each of the queue's priority lanes.
    pub fn capacity(&self) -> usize {
        self.queue().capacity
    }

    /// The queue's lag policy.
    pub fn lag_policy(&self) -> LagPolicy {
        self.queue().policy
    }

    /// The number of events queued: waiting in the queue, or taken from it
    /// in the batch the next receives hand out.
    pub fn len(&self) -> usize {
        self.queue().counts().depth()
    }

    /// Whether no event is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events received so far.
    pub fn delivered(&self) -> u64 {
        self.queue().counts().delivered()
    }

    /// Events dropped from the full queue so far ([`LagPolicy::DropOldest`]).
    ///
    /// `delivered() + dropped() + len()` is the number of events of interest
    /// emitted since the subscription was made. Each of these calls reads the
    /// counters afresh; while events flow, [`lane`](Self::lane) reads one
    /// lane's counters together, and the identity holds in every such
    /// snapshot.
    pub fn dropped(&self) -> u64 {
        self.queue().counts().dropped()
    }

    /// Events queued past capacity by `emit` so far
    /// ([`LagPolicy::Backpressure`]).
    pub fn overflowed(&self) -> u64 {
        self.queue().counts().overflowed()
    }

    /// The counters of the `priority` lane of the queue: each lane accounts
    /// for its own events.
    pub fn lane(&self, priority: Priority) -> LaneMetrics {
        self.queue().counts().lane_metrics()[priority.lane()]
    }

    /// The queue's fairness bound: while a lane has events waiting, at most
    /// this many events of higher priority are handed out before the lane's
    /// oldest.
    pub fn fairness(&self) -> usize {
        self.queue().fairness
    }
}

impl<E: Event> Stream for Subscription<E> {
    type Item = Result<Arc<Envelope<E>>, Lagged>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .receiver
            .poll_recv(cx, false)
            .map(|result| match result {
                Ok(envelope) => Some(Ok(envelope)),
                Err(RecvError::Lagged(count)) => Some(Err(Lagged(count))),
                Err(RecvError::Closed) => None,
            })
    }
}

impl<E: Event> Drop for Subscription<E> {
    fn drop(&mut self) {
        self.shared.unregister(&self.receiver.queue);
        // What is queued is dropped here, by the subscriber, not by an
        // emitter that may hold the queue a moment longer.
        drop(self.receiver.queue.discard());
    }
}

impl<E: Event> fmt::Debug for Subscription<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("receiver", &self.receiver)
            .finish()
    }
}
