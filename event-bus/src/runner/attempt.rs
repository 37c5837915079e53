//! One attempt of a handler: its future made, polled and dropped inside a
//! panic catch, while the deliveries it works on are kept alive.
//!
//! One small future instead of a catch wrapped around an `async` block
//! wrapped in a keep-alive `select!`: every event's attempt is moved into
//! its run loop's state, so its size is paid per event. It holds the
//! handler's future and three words; the keep-alive timer is allocated only
//! for a source whose deliveries expire.

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Interval, MissedTickBehavior};

use super::{Delivery, MIN_PROGRESS_INTERVAL};
use crate::event::Event;

/// What a panic in a handler leaves.
pub(crate) type Panic = Box<dyn Any + Send + 'static>;

pin_project! {
    /// The future of [`attempt`].
    pub(crate) struct Attempt<'a, E, D, F> {
        #[pin]
        handler: Option<F>,
        // The panic of making the handler's future, reported at the first
        // poll.
        made: Option<Panic>,
        // `Some` when a delivery expires.
        keep_alive: Option<Box<KeepAlive<'a, D>>>,
        event: PhantomData<fn() -> E>,
    }
}

/// Deliveries that expire, and when to tell them they are still worked on.
struct KeepAlive<'a, D> {
    deliveries: &'a [D],
    ticks: Interval,
}

/// Makes the handler's future with `make` and runs it, telling
/// `deliveries` every [`progress_interval`](Delivery::progress_interval)
/// that they are still being worked on. A panic in making, polling or
/// dropping the handler's future is the handler's: `Err` with its payload.
#[inline]
pub(crate) fn attempt<'a, E, D, F>(
    deliveries: &'a [D],
    make: impl FnOnce() -> F,
) -> Attempt<'a, E, D, F>
where
    E: Event,
    D: Delivery<E>,
    F: Future,
{
    let (handler, made) = match catch_unwind(AssertUnwindSafe(make)) {
        Ok(handler) => (Some(handler), None),
        Err(payload) => (None, Some(payload)),
    };
    let keep_alive = progress_interval(deliveries).map(|every| {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Box::new(KeepAlive { deliveries, ticks })
    });
    Attempt {
        handler,
        made,
        keep_alive,
        event: PhantomData,
    }
}

/// The shortest [`progress_interval`](Delivery::progress_interval) of
/// `deliveries`, no shorter than [`MIN_PROGRESS_INTERVAL`]; `None` when none
/// expires.
pub(crate) fn progress_interval<E: Event, D: Delivery<E>>(deliveries: &[D]) -> Option<Duration> {
    deliveries
        .iter()
        .filter_map(Delivery::progress_interval)
        .min()
        .map(|every| every.max(MIN_PROGRESS_INTERVAL))
}

impl<E, D, F> Future for Attempt<'_, E, D, F>
where
    E: Event,
    D: Delivery<E>,
    F: Future,
{
    type Output = Result<F::Output, Panic>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(payload) = this.made.take() {
            return Poll::Ready(Err(payload));
        }
        let polled = catch_unwind(AssertUnwindSafe(|| {
            let Some(handler) = this.handler.as_mut().as_pin_mut() else {
                // Polled again after it finished: `Attempt` is only awaited.
                return Poll::Pending;
            };
            let output = ready!(handler.poll(cx));
            // Dropped inside the catch: a panic in its drop is the handler's.
            this.handler.set(None);
            Poll::Ready(output)
        }));
        match polled {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => {
                if let Some(keep_alive) = this.keep_alive {
                    while keep_alive.ticks.poll_tick(cx).is_ready() {
                        keep_alive.deliveries.iter().for_each(Delivery::in_progress);
                    }
                }
                Poll::Pending
            }
            Err(payload) => {
                // Whatever its drop does after a panic, the first panic is
                // the one reported.
                let _ = catch_unwind(AssertUnwindSafe(|| this.handler.set(None)));
                Poll::Ready(Err(payload))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::envelope::Envelope;
    use crate::event::EventKind;
    use crate::runner::Retry;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    struct Kind;

    impl EventKind for Kind {
        const ALL: &'static [Self] = &[Kind];

        fn index(self) -> usize {
            0
        }

        fn name(self) -> &'static str {
            "ping"
        }
    }

    #[derive(Debug)]
    struct Ping;

    impl Event for Ping {
        type Kind = Kind;

        fn kind(&self) -> Kind {
            Kind
        }
    }

    /// A delivery that expires: counts how often it was kept alive.
    struct Leased {
        envelope: Arc<Envelope<Ping>>,
        kept: Arc<AtomicU32>,
    }

    impl Delivery<Ping> for Leased {
        fn envelope(&self) -> &Arc<Envelope<Ping>> {
            &self.envelope
        }

        fn attempt(&self) -> u32 {
            1
        }

        async fn ack(self) {}

        async fn retry(self, _: Duration) -> Retry<Self> {
            Retry::Redelivered
        }

        async fn terminate(self, _: &str) {}

        async fn release(self) {}

        fn in_progress(&self) {
            self.kept.fetch_add(1, Ordering::SeqCst);
        }

        fn progress_interval(&self) -> Option<Duration> {
            Some(Duration::from_secs(1))
        }
    }

    fn leased() -> (Leased, Arc<AtomicU32>) {
        let kept = Arc::new(AtomicU32::new(0));
        let delivery = Leased {
            envelope: Arc::new(Envelope::new(Ping)),
            kept: kept.clone(),
        };
        (delivery, kept)
    }

    struct PanicsOnDrop;

    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("in drop");
        }
    }

    struct PanicsOnPoll(#[allow(dead_code)] PanicsOnDrop);

    impl Future for PanicsOnPoll {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            panic!("in poll first");
        }
    }

    fn message(payload: &Panic) -> &str {
        payload.downcast_ref::<&str>().copied().unwrap_or("?")
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_handler_keeps_its_delivery_alive_every_interval() {
        let (delivery, kept) = leased();
        let deliveries = [delivery];
        let outcome = attempt(&deliveries, || async {
            tokio::time::sleep(Duration::from_millis(3500)).await;
            7
        })
        .await;
        assert_eq!(outcome.ok(), Some(7));
        assert_eq!(kept.load(Ordering::SeqCst), 3, "at 1 s, 2 s and 3 s");
    }

    #[tokio::test]
    async fn a_panic_making_polling_or_dropping_the_future_is_the_handlers() {
        let (delivery, _) = leased();
        let deliveries = [delivery];

        let made = attempt(&deliveries, || -> std::future::Ready<()> {
            panic!("in make")
        });
        assert_eq!(message(&made.await.unwrap_err()), "in make");

        let polled = attempt(&deliveries, || async { panic!("in poll") });
        assert_eq!(message(&polled.await.unwrap_err()), "in poll");

        let dropped = attempt(&deliveries, || {
            let guard = PanicsOnDrop;
            async move {
                let _guard = guard;
            }
        });
        assert_eq!(message(&dropped.await.unwrap_err()), "in drop");

        // A future whose poll panics and whose drop then panics too: the
        // first panic is reported, the second contained.
        let both = attempt(&deliveries, || PanicsOnPoll(PanicsOnDrop));
        assert_eq!(message(&both.await.unwrap_err()), "in poll first");
    }
}
