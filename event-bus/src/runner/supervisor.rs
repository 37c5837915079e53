//! The run loop of a listener that handles one event at a time: takes
//! deliveries from its source, calls the handler, contains its failures,
//! retries and records dead letters.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::Instrument;

use super::{DeadLetterSink, Delivery, ListenerCore, Retry, Source, Undecodable};
use crate::dead_letter::DeadLetter;
use crate::dead_letter::UndecodableLetter;
use crate::envelope::Envelope;
use crate::error::chain;
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

    pub(crate) fn name(&self) -> &Arc<str> {
        &self.core.name
    }

    /// Records `envelope` as a dead letter after `attempts` attempts, the
    /// last of which failed with `error` (a panic if `panicked`), and
    /// terminates its delivery.
    pub(crate) async fn dead_letter<E, D>(
        &self,
        delivery: D,
        error: String,
        attempts: u32,
        panicked: bool,
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
        self.sink.record(letter).await;
        delivery.terminate(&reason).await;
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
                    // What `process` hands back is the source's to yield
                    // again before it ends.
                    Some(Ok(delivery)) => _ = self.process(delivery).await,
                    Some(Err(undecodable)) => self.undecodable(undecodable).await,
                    None => break,
                }
            }
        } else {
            let mut running = FuturesUnordered::new();
            // A source that ended yields again what the runner hands back
            // to it afterwards: it is polled again once a running delivery
            // went back, and the run ends when it has ended with nothing
            // running.
            let mut ended = false;
            while !self.is_cancelled() {
                tokio::select! {
                    biased;
                    Some(handed_back) = running.next(), if !running.is_empty() => {
                        let handed_back: bool = handed_back;
                        ended &= !handed_back;
                    }
                    next = std::future::poll_fn(|cx| source.poll_next(cx)), if !ended && running.len() < concurrency => match next {
                        Some(_) if self.is_cancelled() => break,
                        Some(Ok(delivery)) => running.push(Either::Left(self.process(delivery))),
                        Some(Err(undecodable)) => running.push(Either::Right(async {
                            self.undecodable(undecodable).await;
                            false
                        })),
                        None => ended = true,
                    },
                    else => break,
                }
            }
            while running.next().await.is_some() {}
        }
        self.ended();
    }

    /// Handles `delivery` to its end; `true` if it went back to the source
    /// to be redelivered.
    async fn process<E, D>(&self, delivery: D) -> bool
    where
        E: Event,
        L: Listener<E>,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        let envelope = delivery.envelope();
        let span = tracing::info_span!(
            "event_bus.handle",
            listener = %self.core.name,
            event = envelope.name(),
            event_id = %envelope.id(),
            sequence = envelope.sequence(),
        );
        if span.is_disabled() {
            // Nobody collects the span: skip entering it on every poll.
            self.attempt_all(delivery).await
        } else {
            span.follows_from(envelope.span());
            self.attempt_all(delivery).instrument(span).await
        }
    }

    async fn attempt_all<E, D>(&self, mut delivery: D) -> bool
    where
        E: Event,
        L: Listener<E>,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        let retry = self.core.retry;
        let mut started = Instant::now();
        if delivery.attempt() <= 1 {
            self.core.waited(delivery.envelope(), started);
        }
        loop {
            let envelope: Arc<Envelope<E>> = delivery.envelope().clone();
            let attempt = delivery.attempt();
            let meta = Meta::new(&envelope, attempt);
            // The handler's future is made, run and dropped inside the
            // catch: a panic in any of the three is the handler's.
            let handled = AssertUnwindSafe(async { self.listener.handle(envelope, meta).await })
                .catch_unwind();
            let outcome = keeping_alive(std::slice::from_ref(&delivery), handled).await;
            self.core.took(started.elapsed());
            let (error, panicked) = match outcome {
                Ok(Ok(())) => {
                    self.core.handled(1);
                    delivery.ack().await;
                    return false;
                }
                Ok(Err(error)) => (chain(&*error), false),
                Err(payload) => (panicked(&*payload), true),
            };
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
                match delivery.retry(delay).await {
                    Retry::InPlace(again) => {
                        self.wait_out(&again, delay).await;
                        if self.is_cancelled() {
                            // A stop is final: the retry stays unattempted.
                            return false;
                        }
                        delivery = again;
                        started = Instant::now();
                        continue;
                    }
                    Retry::Redelivered => return true,
                }
            }
            tracing::error!(
                listener = %self.name(),
                event = envelope.name(),
                event_id = %envelope.id(),
                attempts = attempt,
                error = %error,
                "handler failed; recorded a dead letter",
            );
            self.dead_letter(delivery, error, attempt, panicked).await;
            return false;
        }
    }
}

impl<L, K> Supervisor<L, K> {
    /// Waits out the `delay` before an in-place retry of `delivery`,
    /// keeping it alive meanwhile.
    pub(crate) async fn wait_out<E: Event, D: Delivery<E>>(&self, delivery: &D, delay: Duration) {
        keeping_alive(std::slice::from_ref(delivery), tokio::time::sleep(delay)).await;
    }
}

/// Runs `work`, telling `deliveries` every
/// [`progress_interval`](Delivery::progress_interval) that they are still
/// being worked on.
pub(crate) async fn keeping_alive<E: Event, D: Delivery<E>, F: Future>(
    deliveries: &[D],
    work: F,
) -> F::Output {
    let Some(every) = deliveries
        .iter()
        .filter_map(Delivery::progress_interval)
        .min()
    else {
        return work.await;
    };
    let mut work = std::pin::pin!(work);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            output = &mut work => return output,
            _ = ticks.tick() => deliveries.iter().for_each(Delivery::in_progress),
        }
    }
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
