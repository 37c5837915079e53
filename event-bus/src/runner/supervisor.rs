//! The run loop of a listener that handles one event at a time: takes
//! deliveries from its source, calls the handler, contains its failures,
//! retries and records dead letters.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::{Instrument, Span};

use super::attempt::{Attempt, Clock, KeepAlive, Panic, attempt, held};
use super::{DeadLetterSink, Delivery, ListenerCore, Retry, Source, Undecodable};
use crate::dead_letter::DeadLetter;
use crate::dead_letter::UndecodableLetter;
use crate::envelope::Envelope;
use crate::error::{HandlerError, chain};
use crate::event::Event;
use crate::listener::Listener;
use crate::meta::Meta;
use crate::metrics::ListenerStatus;

/// Runs one listener over a source: takes its deliveries, calls its
/// handler, contains its failures.
pub(crate) struct Supervisor<L, K> {
    pub(crate) core: Arc<ListenerCore>,
    pub(crate) listener: L,
    pub(crate) sink: K,
}

impl<L, K> Supervisor<L, K> {
    /// Whether the listener was stopped: checked before every event.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.core.is_cancelled()
    }

    /// The run loop ended: the source ended and every delivery taken is
    /// finished, unless the listener was stopped.
    pub(crate) fn ended(&self) {
        self.core.end(if self.is_cancelled() {
            ListenerStatus::Aborted
        } else {
            ListenerStatus::Drained
        });
    }

    /// Runs up to `concurrency` units of work at once until `feed` ends or
    /// the listener is stopped, then waits for those running. A unit's
    /// future is `true` when it handed something back to the source: a
    /// source that ended yields again what is handed back to it afterwards,
    /// so the feed is polled again once that happens.
    pub(crate) async fn concurrently<E, F, W>(
        &self,
        concurrency: usize,
        mut feed: F,
        mut start: impl FnMut(F::Unit) -> W,
    ) where
        F: Feed<E>,
        W: Future<Output = bool>,
    {
        let mut running = FuturesUnordered::new();
        let mut ended = false;
        while !self.is_cancelled() {
            tokio::select! {
                biased;
                Some(handed_back) = running.next(), if !running.is_empty() => {
                    if handed_back {
                        ended = false;
                        feed.reopen();
                    }
                }
                next = feed.next(), if !ended && running.len() < concurrency => match next {
                    // Checked again: the feed may have been ready at once,
                    // and a stop is final.
                    Some(_) if self.is_cancelled() => break,
                    Some(unit) => running.push(start(unit)),
                    None => ended = true,
                },
                else => break,
            }
        }
        while running.next().await.is_some() {}
    }

    pub(crate) fn name(&self) -> &Arc<str> {
        &self.core.name
    }

    /// Records `envelope` as a dead letter after `attempts` attempts, the
    /// last of which failed with `error` (a panic if `panicked`), and
    /// terminates its delivery; `clock` keeps it alive meanwhile, with
    /// what else is held, which `held_too` tells.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn dead_letter<E, D>(
        &self,
        delivery: D,
        error: String,
        attempts: u32,
        panicked: bool,
        clock: &mut Clock,
        held_too: impl Fn(),
    ) where
        E: Event,
        D: Delivery<E>,
        K: DeadLetterSink<E>,
    {
        self.core.dead_lettered(panicked);
        let letter = DeadLetter {
            envelope: delivery.envelope().clone(),
            listener: self.core.name.clone(),
            error,
            attempts,
            failed_at: SystemTime::now(),
        };
        let reason = letter.error.clone();
        let tick = || {
            delivery.in_progress();
            held_too();
        };
        held(clock, tick, self.sink.record(letter)).await;
        // The terminate is the source's; what is held beside it is kept.
        held(clock, &held_too, delivery.terminate(&reason)).await;
    }
}

impl<L, K> Supervisor<L, K> {
    /// Records an event the source could not decode as a dead letter, and
    /// terminates it; the handler never sees it.
    pub(crate) async fn undecodable<E>(&self, undecodable: Undecodable)
    where
        E: Event,
        K: DeadLetterSink<E>,
    {
        let Undecodable {
            name,
            id,
            error,
            payload,
            attempt,
            terminate,
        } = undecodable;
        tracing::error!(
            listener = %self.name(),
            event = name.as_deref().unwrap_or("?"),
            event_id = ?id,
            error = %error,
            "an event did not decode; recorded a dead letter",
        );
        self.core.dead_lettered(false);
        let reason = format!("does not decode: {error}");
        self.sink
            .record_undecodable(UndecodableLetter {
                listener: self.core.name.clone(),
                name,
                id,
                error: reason.clone(),
                payload,
                attempts: attempt,
                failed_at: SystemTime::now(),
            })
            .await;
        terminate(reason).await;
    }

    /// Runs the listener until its source ends or it is stopped, with up to
    /// `concurrency` deliveries handled at once.
    pub(crate) async fn run<E, S>(self, mut source: S, concurrency: usize)
    where
        E: Event,
        L: Listener<E>,
        K: DeadLetterSink<E>,
        S: Source<E>,
    {
        if concurrency <= 1 {
            while !self.is_cancelled() {
                match std::future::poll_fn(|cx| source.poll_next(cx)).await {
                    // Checked again: the source may have been ready at once,
                    // and a stop is final.
                    Some(_) if self.is_cancelled() => break,
                    // What is handed back is the source's to yield again
                    // before it ends.
                    Some(Ok(delivery)) => {
                        let span = self.span(delivery.envelope());
                        if !span.is_disabled() {
                            span.follows_from(delivery.envelope().span());
                            _ = self.attempt_all(delivery).instrument(span).await;
                            continue;
                        }
                        // Nobody collects the span: `attempt_all` inlined,
                        // so that no future holding the delivery is made
                        // and moved per event; only the handler's attempt.
                        let mut delivery = delivery;
                        let mut clock = KeepAlive::of(std::slice::from_ref(&delivery));
                        let mut started = self.started(&delivery);
                        loop {
                            let outcome = if clock.is_none() {
                                self.attempt(&delivery).await
                            } else {
                                let tick = || delivery.in_progress();
                                held(&mut clock, tick, self.attempt(&delivery)).await
                            };
                            match self.finish(delivery, outcome, started, &mut clock).await {
                                Finished::Again(again) => delivery = again,
                                Finished::Done { .. } => break,
                            }
                            started = Instant::now();
                        }
                    }
                    Some(Err(undecodable)) => self.undecodable(undecodable).await,
                    None => break,
                }
            }
        } else {
            self.concurrently(concurrency, Deliveries(&mut source), |next| match next {
                Ok(delivery) => Either::Left(self.process(delivery)),
                Err(undecodable) => Either::Right(async {
                    self.undecodable(undecodable).await;
                    false
                }),
            })
            .await;
        }
        self.ended();
    }

    /// Handles `delivery` to its end, in its span when one is collected;
    /// `true` if it went back to the source to be redelivered.
    ///
    /// Not an `async fn`: the attempts' future is awaited as it is, without
    /// a future around it to be moved per event.
    fn process<E, D>(&self, delivery: D) -> impl Future<Output = bool> + Send + '_
    where
        E: Event,
        L: Listener<E>,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        let span = self.span(delivery.envelope());
        if span.is_disabled() {
            // Nobody collects the span: skip entering it on every poll.
            Either::Left(self.attempt_all(delivery))
        } else {
            span.follows_from(delivery.envelope().span());
            Either::Right(self.attempt_all(delivery).instrument(span))
        }
    }

    /// The span a delivery is handled in.
    fn span<E: Event>(&self, envelope: &Envelope<E>) -> Span {
        tracing::info_span!(
            "event_bus.handle",
            listener = %self.core.name,
            event = envelope.name(),
            event_id = %envelope.id(),
            sequence = envelope.sequence(),
        )
    }

    /// Attempts `delivery` until it is finished; `true` if it went back to
    /// the source.
    async fn attempt_all<E, D>(&self, mut delivery: D) -> bool
    where
        E: Event,
        L: Listener<E>,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        let mut clock = KeepAlive::of(std::slice::from_ref(&delivery));
        let mut started = self.started(&delivery);
        loop {
            let tick = || delivery.in_progress();
            let outcome = held(&mut clock, tick, self.attempt(&delivery)).await;
            match self.finish(delivery, outcome, started, &mut clock).await {
                Finished::Again(again) => delivery = again,
                Finished::Done { handed_back } => return handed_back,
            }
            started = Instant::now();
        }
    }

    /// The time the first attempt of `delivery` starts, recording how long
    /// the event waited for it.
    fn started<E: Event, D: Delivery<E>>(&self, delivery: &D) -> Instant {
        let started = Instant::now();
        if delivery.attempt() <= 1 {
            self.core.waited(delivery.envelope(), started);
        }
        started
    }

    /// One attempt of the handler on `delivery`. The envelope and meta are
    /// made in the closure: nothing of them is kept beside the handler's
    /// future.
    fn attempt<'a, E, D>(
        &'a self,
        delivery: &'a D,
    ) -> Attempt<impl Future<Output = Result<(), HandlerError>> + Send + 'a>
    where
        E: Event,
        L: Listener<E>,
        D: Delivery<E>,
    {
        attempt(|| {
            let envelope = delivery.envelope();
            let meta = Meta::new(envelope, delivery.attempt());
            self.listener.handle(envelope.clone(), meta)
        })
    }

    /// Finishes `delivery` after an attempt that started at `started` and
    /// ended with `outcome`: acked, or retried, or recorded as a dead letter,
    /// kept alive by `clock` while it is held.
    async fn finish<E, D>(
        &self,
        delivery: D,
        outcome: Result<Result<(), HandlerError>, Panic>,
        started: Instant,
        clock: &mut Clock,
    ) -> Finished<D>
    where
        E: Event,
        L: Listener<E>,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        self.core.took(started.elapsed());
        let failure = match outcome {
            Ok(Ok(())) => {
                self.core.handled(1);
                delivery.ack().await;
                return Finished::Done { handed_back: false };
            }
            Ok(Err(error)) => Failure {
                error: chain(&*error),
                panicked: false,
            },
            Err(payload) => Failure {
                error: panicked(&*payload),
                panicked: true,
            },
        };
        // Boxed: the retry's timer and the dead letter's record stay out of
        // the future every event is finished in.
        Box::pin(self.failed(delivery, failure, clock)).await
    }

    /// Retries `delivery` after its attempt failed, or records it as a dead
    /// letter after its last.
    async fn failed<E, D>(&self, delivery: D, failure: Failure, clock: &mut Clock) -> Finished<D>
    where
        E: Event,
        L: Listener<E>,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        let Failure { error, panicked } = failure;
        let retry = self.core.retry;
        let attempt = delivery.attempt();
        let envelope = delivery.envelope();
        if attempt < retry.max_attempts() {
            let delay = retry.delay(attempt);
            tracing::warn!(
                listener = %self.name(),
                event = envelope.name(),
                event_id = %envelope.id(),
                attempt,
                retry_in = ?delay,
                error = %error,
                "handler failed; retrying",
            );
            self.core.retried(1, usize::from(panicked));
            return match delivery.retry(delay, &error).await {
                Retry::InPlace(again) => {
                    // A new delivery: its interval may be another.
                    KeepAlive::add(clock, &again);
                    held(clock, || again.in_progress(), tokio::time::sleep(delay)).await;
                    if self.is_cancelled() {
                        // A stop is final: the retry stays unattempted.
                        Finished::Done { handed_back: false }
                    } else {
                        Finished::Again(again)
                    }
                }
                Retry::Redelivered => Finished::Done { handed_back: true },
            };
        }
        tracing::error!(
            listener = %self.name(),
            event = envelope.name(),
            event_id = %envelope.id(),
            attempts = attempt,
            error = %error,
            "handler failed; recorded a dead letter",
        );
        self.dead_letter(delivery, error, attempt, panicked, clock, || {})
            .await;
        Finished::Done { handed_back: false }
    }
}

/// Where [`Supervisor::concurrently`] takes its work from.
pub(crate) trait Feed<E> {
    type Unit;

    /// The next unit of work; `None` once the source ended.
    fn next(&mut self) -> impl Future<Output = Option<Self::Unit>>;

    /// Something went back to the source, which yields it again even if it
    /// had ended.
    fn reopen(&mut self) {}
}

/// A source's deliveries, one at a time.
struct Deliveries<'a, S>(&'a mut S);

impl<E: Event, S: Source<E>> Feed<E> for Deliveries<'_, S> {
    type Unit = Result<S::Delivery, Undecodable>;

    fn next(&mut self) -> impl Future<Output = Option<Self::Unit>> {
        std::future::poll_fn(|cx| self.0.poll_next(cx))
    }
}

/// How an attempt failed.
struct Failure {
    error: String,
    panicked: bool,
}

/// What follows an attempt.
enum Finished<D> {
    /// Attempt it again, now: its retry's delay was waited out in place.
    Again(D),
    /// Finished, or back with the source (`handed_back`).
    Done { handed_back: bool },
}

/// The error text of a handler that panicked with `payload`.
pub(crate) fn panicked(payload: &(dyn Any + Send)) -> String {
    let message = if let Some(message) = payload.downcast_ref::<&'static str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "non-string panic payload"
    };
    format!("panicked: {message}")
}
