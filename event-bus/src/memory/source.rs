//! The memory tier as a [`Source`]: a listener's queue, whose deliveries
//! are retried in place.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::queue::{Queue, Receiver};
use super::shared::Shared;
use crate::envelope::Envelope;
use crate::error::{RecvError, TryRecvError};
use crate::event::Event;
use crate::runner::{Delivery, Ended, Retry, Source, Undecodable};

/// A listener's queue, as its runner takes from it.
pub(crate) struct MemorySource<E: Event> {
    receiver: Receiver<E>,
    finish: Arc<Finish<E>>,
}

/// What finishing a delivery touches: the queue's in-flight count, and the
/// bus's `quiesce` callers.
struct Finish<E: Event> {
    shared: Arc<Shared<E>>,
    queue: Arc<Queue<E>>,
}

impl<E: Event> Finish<E> {
    fn finished(&self) {
        self.queue.complete(1);
        self.shared.runtime.notify_idle();
    }
}

impl<E: Event> MemorySource<E> {
    pub(crate) fn new(shared: Arc<Shared<E>>, queue: Arc<Queue<E>>) -> Self {
        Self {
            receiver: Receiver::new(queue.clone()),
            finish: Arc::new(Finish { shared, queue }),
        }
    }

    fn delivery(&self, envelope: Arc<Envelope<E>>) -> MemoryDelivery<E> {
        MemoryDelivery {
            envelope,
            attempt: 1,
            finish: self.finish.clone(),
        }
    }
}

impl<E: Event> Source<E> for MemorySource<E> {
    type Delivery = MemoryDelivery<E>;

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<MemoryDelivery<E>, Undecodable>>> {
        loop {
            // The receiver takes part in the cooperative budget.
            match std::task::ready!(self.receiver.poll_recv(cx, true)) {
                Ok(envelope) => return Poll::Ready(Some(Ok(self.delivery(envelope)))),
                // The queue logged and counted the drop.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Poll::Ready(None),
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Result<MemoryDelivery<E>, Undecodable>>, Ended> {
        loop {
            match self.receiver.try_recv(true) {
                Ok(envelope) => return Ok(Some(Ok(self.delivery(envelope)))),
                Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Closed) => return Err(Ended),
            }
        }
    }

    fn is_draining(&self) -> bool {
        self.finish.queue.is_draining()
    }

    fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        let queue = self.finish.queue.clone();
        async move { queue.draining().await }
    }
}

/// An event taken from a listener's queue. It counts as in flight (for
/// `quiesce`) until it is finished; retries stay with the runner.
pub(crate) struct MemoryDelivery<E: Event> {
    envelope: Arc<Envelope<E>>,
    attempt: u32,
    finish: Arc<Finish<E>>,
}

impl<E: Event> Delivery<E> for MemoryDelivery<E> {
    fn envelope(&self) -> &Arc<Envelope<E>> {
        &self.envelope
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    fn ack(self) -> impl Future<Output = ()> + Send {
        self.finish.finished();
        std::future::ready(())
    }

    fn retry(self, _delay: Duration, _error: &str) -> impl Future<Output = Retry<Self>> + Send {
        std::future::ready(Retry::InPlace(Self {
            attempt: self.attempt + 1,
            ..self
        }))
    }

    fn terminate(self, _reason: &str) -> impl Future<Output = ()> + Send {
        self.finish.finished();
        std::future::ready(())
    }

    /// Never called: the memory tier keeps every retry in place. Were it
    /// called, the event would leave the queue unhandled, and be reported
    /// as still in flight.
    fn release(self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}
