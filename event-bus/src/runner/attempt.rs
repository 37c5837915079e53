//! One attempt of a handler: its future made, polled and dropped inside a
//! panic catch; and the keep-alive clock of the deliveries the runner holds.
//!
//! One small future instead of a catch wrapped around an `async` block:
//! every event's attempt is moved into its run loop's state, so its size is
//! paid per event. It holds the handler's future and two words.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::{Delivery, MIN_PROGRESS_INTERVAL};
use crate::event::Event;

/// What a panic in a handler leaves.
pub(crate) type Panic = Box<dyn Any + Send + 'static>;

pin_project! {
    /// The future of [`attempt`].
    pub(crate) struct Attempt<F> {
        #[pin]
        handler: Option<F>,
        // The panic of making the handler's future, reported at the first
        // poll.
        made: Option<Panic>,
    }
}

/// Makes the handler's future with `make` and runs it. A panic in making,
/// polling or dropping the handler's future is the handler's: `Err` with
/// its payload.
#[inline]
pub(crate) fn attempt<F: Future>(make: impl FnOnce() -> F) -> Attempt<F> {
    let (handler, made) = match catch_unwind(AssertUnwindSafe(make)) {
        Ok(handler) => (Some(handler), None),
        Err(payload) => (None, Some(payload)),
    };
    Attempt { handler, made }
}

/// The keep-alive clock of what the runner holds (a delivery, a batch
/// being collected or handled): started when the first of it is taken from
/// the source, it tells what is held that it is still worked on every
/// [`progress_interval`](Delivery::progress_interval), through every phase
/// until the last of it is finished. `None` when nothing held expires.
pub(crate) type Clock = Option<Box<KeepAlive>>;

/// See [`Clock`].
pub(crate) struct KeepAlive {
    every: Duration,
    next: Pin<Box<Sleep>>,
}

impl KeepAlive {
    /// The clock of `deliveries`, taken now.
    pub(crate) fn of<E: Event, D: Delivery<E>>(deliveries: &[D]) -> Clock {
        progress_interval(deliveries).map(Self::every)
    }

    fn every(every: Duration) -> Box<Self> {
        Box::new(Self {
            every,
            next: Box::pin(tokio::time::sleep(every)),
        })
    }

    /// Adds `delivery`, taken now, to what `clock` keeps alive.
    pub(crate) fn add<E: Event, D: Delivery<E>>(clock: &mut Clock, delivery: &D) {
        let Some(every) = progress_interval(std::slice::from_ref(delivery)) else {
            return;
        };
        match clock {
            None => *clock = Some(Self::every(every)),
            Some(keep_alive) if every < keep_alive.every => {
                keep_alive.every = every;
                let due = tokio::time::Instant::now() + every;
                if due < keep_alive.next.deadline() {
                    keep_alive.next.as_mut().reset(due);
                }
            }
            Some(_) => {}
        }
    }

    /// Calls `tick` each time the interval has passed, and arranges for
    /// `cx` to be woken when it next does.
    fn poll_tick(&mut self, cx: &mut Context<'_>, tick: &impl Fn()) {
        while self.next.as_mut().poll(cx).is_ready() {
            tick();
            let due = tokio::time::Instant::now() + self.every;
            self.next.as_mut().reset(due);
        }
    }
}

/// Runs `work` while `clock` keeps alive what `tick` tells (calling it
/// whenever the clock's interval has passed).
pub(crate) async fn held<F: Future>(clock: &mut Clock, tick: impl Fn(), work: F) -> F::Output {
    let Some(keep_alive) = clock else {
        return work.await;
    };
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = work.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        keep_alive.poll_tick(cx, &tick);
        Poll::Pending
    })
    .await
}

/// What `tick` of [`held`] does for `deliveries`.
pub(crate) fn in_progress<'d, E: Event, D: Delivery<E> + 'd>(
    deliveries: impl IntoIterator<Item = &'d D>,
) {
    deliveries.into_iter().for_each(Delivery::in_progress);
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

impl<F: Future> Future for Attempt<F> {
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
            Ok(Poll::Pending) => Poll::Pending,
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
        interval: Duration,
    }

    impl Delivery<Ping> for Leased {
        fn envelope(&self) -> &Arc<Envelope<Ping>> {
            &self.envelope
        }

        fn attempt(&self) -> u32 {
            1
        }

        async fn ack(self) {}

        async fn retry(self, _: Duration, _: &str) -> Retry<Self> {
            Retry::Redelivered
        }

        async fn terminate(self, _: &str) {}

        async fn release(self) {}

        fn in_progress(&self) {
            self.kept.fetch_add(1, Ordering::SeqCst);
        }

        fn progress_interval(&self) -> Option<Duration> {
            Some(self.interval)
        }
    }

    fn leased() -> (Leased, Arc<AtomicU32>) {
        let kept = Arc::new(AtomicU32::new(0));
        let delivery = Leased {
            envelope: Arc::new(Envelope::new(Ping)),
            kept: kept.clone(),
            interval: Duration::from_secs(1),
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
    async fn the_clock_keeps_what_is_held_alive_across_phases() {
        let (delivery, kept) = leased();
        let deliveries = [delivery];
        let mut clock = KeepAlive::of(&deliveries);
        let tick = || in_progress(&deliveries);
        // Three phases of 0.9 s each: 2.7 s held, ticks at 1 s and 2 s.
        for _ in 0..3 {
            held(
                &mut clock,
                tick,
                tokio::time::sleep(Duration::from_millis(900)),
            )
            .await;
        }
        assert_eq!(kept.load(Ordering::SeqCst), 2);
        let output = held(&mut clock, tick, async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            7
        })
        .await;
        assert_eq!(output, 7);
        assert_eq!(kept.load(Ordering::SeqCst), 4, "and at 3 s and 4 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_with_a_shorter_interval_shortens_the_clock() {
        let (delivery, kept) = leased();
        let mut clock = None;
        KeepAlive::add(&mut clock, &delivery);
        assert_eq!(
            clock.as_ref().map(|clock| clock.every),
            Some(Duration::from_secs(1))
        );
        // A zero interval is taken as the floor, and brings the next tick
        // forward.
        let zero = Leased {
            interval: Duration::ZERO,
            ..leased().0
        };
        KeepAlive::add(&mut clock, &zero);
        assert_eq!(
            clock.as_ref().map(|clock| clock.every),
            Some(MIN_PROGRESS_INTERVAL)
        );
        held(
            &mut clock,
            || delivery.in_progress(),
            tokio::time::sleep(Duration::from_millis(10)),
        )
        .await;
        assert!((9..=10).contains(&kept.load(Ordering::SeqCst)));
    }

    #[tokio::test]
    async fn a_panic_making_polling_or_dropping_the_future_is_the_handlers() {
        let made = attempt(|| -> std::future::Ready<()> { panic!("in make") });
        assert_eq!(message(&made.await.unwrap_err()), "in make");

        let polled = attempt(|| async { panic!("in poll") });
        assert_eq!(message(&polled.await.unwrap_err()), "in poll");

        let dropped = attempt(|| {
            let guard = PanicsOnDrop;
            async move {
                let _guard = guard;
            }
        });
        assert_eq!(message(&dropped.await.unwrap_err()), "in drop");

        // A future whose poll panics and whose drop then panics too: the
        // first panic is reported, the second contained.
        let both = attempt(|| PanicsOnPoll(PanicsOnDrop));
        assert_eq!(message(&both.await.unwrap_err()), "in poll first");
    }
}
