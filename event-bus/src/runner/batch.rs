//! The run loop of a [`BatchListener`]: assembles batches from its source,
//! calls the batch handler, retries what failed per its [`BatchFailure`]
//! mode and records dead letters.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::attempt::attempt;
use super::attempt::{Clock, KeepAlive, held, in_progress};
use super::supervisor::Feed;
use super::{DeadLetterSink, Delivery, Retry, Source, Supervisor, Undecodable, panicked};
use crate::batch::{Batch, BatchListener};
use crate::event::{Event, Priority};
use crate::listener::BatchFailure;
use crate::listener::ListenerOptions;

/// Assembles batches from a source. Cancel safe: what it has taken stays in
/// `pending` when the future of [`next`](Collector::next) is dropped.
struct Collector<D> {
    pending: Vec<D>,
    /// Events that did not decode, handed over with the next batch.
    undecodable: Vec<Undecodable>,
    /// When the pending batch stops waiting for more; `None` while nothing
    /// is pending, or when `max_wait` reaches past the clock's range (the
    /// batch then waits until full, urgent or ended).
    deadline: Option<tokio::time::Instant>,
    /// The pending batch holds a high-priority event: hand it over now.
    urgent: bool,
    /// Keeps the pending batch alive, from its first event on.
    clock: Clock,
    ended: bool,
    max_batch: usize,
    max_wait: Duration,
}

impl<D> Collector<D> {
    fn new(options: &ListenerOptions) -> Self {
        Self {
            pending: Vec::new(),
            undecodable: Vec::new(),
            deadline: None,
            urgent: false,
            clock: None,
            ended: false,
            max_batch: options.max_batch,
            max_wait: options.max_wait,
        }
    }

    /// The next batch with the undecodable events met while collecting it,
    /// or `None` once the source has ended and is drained.
    async fn next<E, S>(&mut self, source: &mut S) -> Option<Collected<D>>
    where
        E: Event,
        S: Source<E, Delivery = D>,
        D: Delivery<E>,
    {
        loop {
            if self.pending.len() >= self.max_batch || self.ended {
                return self.take();
            }
            // Take what is ready already, without waiting.
            match source.try_next() {
                Ok(Some(Ok(delivery))) => {
                    self.add(delivery);
                    continue;
                }
                Ok(Some(Err(undecodable))) => {
                    self.undecodable.push(undecodable);
                    continue;
                }
                Ok(None) => {}
                Err(_) => {
                    self.ended = true;
                    continue;
                }
            }
            // A shutting-down tier waits for no batch to fill up, and an
            // undecodable event for none at all.
            if self.urgent
                || !self.undecodable.is_empty()
                || (!self.pending.is_empty() && source.is_draining())
            {
                return self.take();
            }
            let next = if self.pending.is_empty() {
                std::future::poll_fn(|cx| source.poll_next(cx)).await
            } else {
                let deadline = self.deadline;
                let waited_out = async move {
                    match deadline {
                        Some(deadline) => tokio::time::sleep_until(deadline).await,
                        None => std::future::pending().await,
                    }
                };
                let drained = source.draining();
                let pending = &self.pending;
                let kept_alive = held(
                    &mut self.clock,
                    || in_progress(pending),
                    std::future::pending::<()>(),
                );
                tokio::select! {
                    next = std::future::poll_fn(|cx| source.poll_next(cx)) => next,
                    () = waited_out => return self.take(),
                    () = drained => return self.take(),
                    () = kept_alive => unreachable!("never ready"),
                }
            };
            match next {
                Some(Ok(delivery)) => self.add(delivery),
                Some(Err(undecodable)) => self.undecodable.push(undecodable),
                None => self.ended = true,
            }
        }
    }

    fn add<E>(&mut self, delivery: D)
    where
        E: Event,
        D: Delivery<E>,
    {
        if self.pending.is_empty() {
            // `Duration::MAX` is how a user says "until full".
            self.deadline = tokio::time::Instant::now().checked_add(self.max_wait);
        }
        self.urgent |= delivery.envelope().priority() == Priority::High;
        KeepAlive::add(&mut self.clock, &delivery);
        self.pending.push(delivery);
    }

    fn take(&mut self) -> Option<Collected<D>> {
        self.deadline = None;
        self.urgent = false;
        if self.pending.is_empty() && self.undecodable.is_empty() {
            return None;
        }
        Some(Collected {
            deliveries: std::mem::replace(
                &mut self.pending,
                Vec::with_capacity(self.max_batch.min(1024)),
            ),
            undecodable: std::mem::take(&mut self.undecodable),
            clock: self.clock.take(),
        })
    }
}

/// A batch, the events met while collecting it that did not decode, and
/// the clock that keeps it alive.
struct Collected<D> {
    deliveries: Vec<D>,
    undecodable: Vec<Undecodable>,
    clock: Clock,
}

/// What a failed attempt leaves to do: these deliveries again, after
/// `delay` (none for events that were not attempted yet).
struct Next<D> {
    deliveries: Vec<D>,
    delay: Option<Duration>,
}

/// A source's deliveries, collected into batches.
struct Batches<D, S> {
    collector: Collector<D>,
    source: S,
}

impl<E: Event, S: Source<E>> Feed<E> for Batches<S::Delivery, S> {
    type Unit = Collected<S::Delivery>;

    async fn next(&mut self) -> Option<Collected<S::Delivery>> {
        // The collector takes what is ready without waiting: spend budget
        // per batch, so a listener that never waits still lets other tasks
        // run (and can be stopped) between batches.
        tokio::task::coop::consume_budget().await;
        self.collector.next(&mut self.source).await
    }

    fn reopen(&mut self) {
        self.collector.ended = false;
    }
}

impl<L, K> Supervisor<L, K> {
    /// Runs the batch listener until its source ends or it is stopped, with
    /// up to `options.concurrency` batches handled at once.
    pub(crate) async fn run_batches<E, S>(self, source: S, options: ListenerOptions)
    where
        E: Event,
        L: BatchListener<E>,
        K: DeadLetterSink<E>,
        S: Source<E>,
    {
        let mut batches = Batches {
            collector: Collector::new(&options),
            source,
        };
        let mode = options.batch_failure;
        if options.concurrency <= 1 {
            while !self.is_cancelled() {
                match batches.next().await {
                    // A stop is final: the batch stays unhandled.
                    Some(_) if self.is_cancelled() => break,
                    Some(collected) => {
                        if self.process_batch(collected, mode).await {
                            // What went back is the source's to yield again,
                            // even if it had ended.
                            batches.reopen();
                        }
                    }
                    None => break,
                }
            }
        } else {
            self.concurrently(options.concurrency, batches, |collected| {
                self.process_batch(collected, mode)
            })
            .await;
        }
        self.ended();
    }

    /// Handles a collected batch to its end; `true` if some of it went back
    /// to the source to be redelivered.
    async fn process_batch<E, D>(&self, collected: Collected<D>, mode: BatchFailure) -> bool
    where
        E: Event,
        L: BatchListener<E>,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        let Collected {
            deliveries,
            undecodable,
            mut clock,
        } = collected;
        for undecodable in undecodable {
            let tick = || in_progress(&deliveries);
            held(&mut clock, tick, self.undecodable(undecodable)).await;
        }
        if deliveries.is_empty() {
            return false;
        }
        let span = tracing::info_span!(
            "event_bus.handle_batch",
            listener = %self.name(),
            events = deliveries.len(),
        );
        if span.is_disabled() {
            self.attempt_batch(deliveries, mode, clock).await
        } else {
            for delivery in &deliveries {
                span.follows_from(delivery.envelope().span());
            }
            self.attempt_batch(deliveries, mode, clock)
                .instrument(span)
                .await
        }
    }

    /// Attempts the batch until every event is handled, dead-lettered or
    /// back with the source, kept alive by `clock` while held; `true` if
    /// some went back.
    async fn attempt_batch<E, D>(
        &self,
        mut deliveries: Vec<D>,
        mode: BatchFailure,
        mut clock: Clock,
    ) -> bool
    where
        E: Event,
        L: BatchListener<E>,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        let mut started = Instant::now();
        for delivery in &deliveries {
            if delivery.attempt() <= 1 {
                self.core.waited(delivery.envelope(), started);
            }
        }
        let mut handed_back = false;
        loop {
            let batch = Batch {
                events: deliveries.iter().map(|d| d.envelope().clone()).collect(),
                // The batch's attempt is its first event's.
                attempt: deliveries.first().map_or(1, Delivery::attempt),
                attempts: deliveries.iter().map(Delivery::attempt).collect(),
                failure_mode: mode,
            };
            // The handler's future is made, run and dropped inside the
            // catch: a panic in any of the three is the handler's.
            let tick = || in_progress(&deliveries);
            let handling = attempt(|| self.listener.handle_batch(&batch));
            let outcome = held(&mut clock, tick, handling).await;
            self.core.took(started.elapsed());
            drop(batch);
            let (errors, panicked) = match outcome {
                Ok(Ok(())) => {
                    self.core.handled(deliveries.len());
                    ack_all(deliveries, &mut clock, || {}).await;
                    return handed_back;
                }
                Ok(Err(error)) => (error.resolve(deliveries.len()), false),
                Err(payload) => (vec![Some(panicked(&*payload)); deliveries.len()], true),
            };
            let (next, back) = match mode {
                BatchFailure::Independent => {
                    self.retry_failed(deliveries, errors, panicked, &mut clock)
                        .await
                }
                BatchFailure::StopAtFirst => {
                    self.retry_from_first(deliveries, errors, panicked, &mut clock)
                        .await
                }
            };
            handed_back |= back;
            let Some(Next {
                deliveries: next,
                delay,
            }) = next
            else {
                return handed_back;
            };
            match delay {
                Some(delay) => {
                    let tick = || in_progress(&next);
                    held(&mut clock, tick, tokio::time::sleep(delay)).await;
                }
                // The events after a dead letter go on at once: still a
                // point to yield and to see a stop, as between batches.
                None => tokio::task::coop::consume_budget().await,
            }
            if self.is_cancelled() {
                // A stop is final: what is left stays unattempted.
                return handed_back;
            }
            deliveries = next;
            started = Instant::now();
        }
    }

    /// [`BatchFailure::Independent`]: acks the events `errors` does not
    /// fail, and retries the failed ones together, each recorded as a dead
    /// letter after its last attempt.
    async fn retry_failed<E, D>(
        &self,
        deliveries: Vec<D>,
        errors: Vec<Option<String>>,
        panicked: bool,
        clock: &mut Clock,
    ) -> (Option<Next<D>>, bool)
    where
        E: Event,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        let retry = self.core.retry;
        let total = deliveries.len();
        let mut failed = Vec::new();
        let mut handled = Vec::new();
        for (delivery, error) in deliveries.into_iter().zip(errors) {
            match error {
                Some(error) => failed.push((delivery, error)),
                None => handled.push(delivery),
            }
        }
        self.core.handled(handled.len());
        ack_all(handled, clock, || {
            in_progress(failed.iter().map(|(d, _)| d))
        })
        .await;
        let (again, last): (Vec<_>, Vec<_>) = failed
            .into_iter()
            .partition(|(delivery, _)| delivery.attempt() < retry.max_attempts());
        if let Some((delivery, error)) = last.first() {
            tracing::error!(
                listener = %self.name(),
                events = total,
                failed = last.len(),
                attempts = delivery.attempt(),
                error = %error,
                "batch handler failed; recorded a dead letter per failed event",
            );
        }
        let mut last = last.into_iter();
        while let Some((delivery, error)) = last.next() {
            let attempts = delivery.attempt();
            let rest = last.as_slice();
            let held_too = || in_progress(rest.iter().chain(&again).map(|(d, _)| d));
            self.dead_letter(delivery, error, attempts, panicked, clock, held_too)
                .await;
        }
        let Some((first, error)) = again.first() else {
            return (None, false);
        };
        let attempt = first.attempt();
        let delay = retry.delay(attempt);
        tracing::warn!(
            listener = %self.name(),
            events = total,
            failed = again.len(),
            attempt,
            retry_in = ?delay,
            error = %error,
            "batch handler failed; retrying the events that failed",
        );
        self.core
            .retried(again.len(), if panicked { again.len() } else { 0 });
        let mut kept = Vec::with_capacity(again.len());
        let mut handed_back = false;
        let mut again = again.into_iter();
        while let Some((delivery, error)) = again.next() {
            let rest = again.as_slice();
            let tick = || in_progress(rest.iter().map(|(d, _)| d).chain(&kept));
            match held(clock, tick, delivery.retry(delay, &error)).await {
                Retry::InPlace(delivery) => {
                    // A new delivery: its interval may be another.
                    KeepAlive::add(clock, &delivery);
                    kept.push(delivery);
                }
                Retry::Redelivered => handed_back = true,
            }
        }
        let next = (!kept.is_empty()).then_some(Next {
            deliveries: kept,
            delay: Some(delay),
        });
        (next, handed_back)
    }

    /// [`BatchFailure::StopAtFirst`]: acks the events before the first that
    /// `errors` fails; retries it and the events after it, or records it as
    /// a dead letter after its last attempt and goes on with the events
    /// after it.
    async fn retry_from_first<E, D>(
        &self,
        mut deliveries: Vec<D>,
        errors: Vec<Option<String>>,
        panicked: bool,
        clock: &mut Clock,
    ) -> (Option<Next<D>>, bool)
    where
        E: Event,
        K: DeadLetterSink<E>,
        D: Delivery<E>,
    {
        let retry = self.core.retry;
        let total = deliveries.len();
        // `resolve` and a panic fail at least one event; were there none,
        // failing the first keeps every event unhandled rather than lost.
        let (first, error) = errors
            .into_iter()
            .enumerate()
            .find_map(|(i, error)| Some((i, error?)))
            .unwrap_or_else(|| (0, "batch handler failed".to_owned()));
        let mut rest = deliveries.split_off(first);
        self.core.handled(first);
        ack_all(deliveries, clock, || in_progress(&rest)).await;
        let failed = rest.remove(0);
        // The events after it were not attempted in this call.
        let attempt = failed.attempt();
        if attempt < retry.max_attempts() {
            let delay = retry.delay(attempt);
            tracing::warn!(
                listener = %self.name(),
                events = total,
                handled = first,
                attempt,
                retry_in = ?delay,
                error = %error,
                "batch handler failed; retrying from the first event that failed, in order",
            );
            self.core.retried(1, usize::from(panicked));
            let retried = held(clock, || in_progress(&rest), failed.retry(delay, &error)).await;
            return match retried {
                Retry::InPlace(failed) => {
                    KeepAlive::add(clock, &failed);
                    let mut kept = Vec::with_capacity(rest.len() + 1);
                    kept.push(failed);
                    kept.extend(rest);
                    let next = Next {
                        deliveries: kept,
                        delay: Some(delay),
                    };
                    (Some(next), false)
                }
                // The source redelivers it: so that the events after it
                // stay after it, they go back too, unattempted.
                Retry::Redelivered => {
                    let mut rest = rest.into_iter();
                    while let Some(delivery) = rest.next() {
                        let still = rest.as_slice();
                        held(clock, || in_progress(still), delivery.release()).await;
                    }
                    (None, true)
                }
            };
        }
        tracing::error!(
            listener = %self.name(),
            events = total,
            handled = first,
            attempts = attempt,
            error = %error,
            "batch handler failed; recorded a dead letter for the first event that failed, going on with those after it",
        );
        self.dead_letter(failed, error, attempt, panicked, clock, || {
            in_progress(&rest)
        })
        .await;
        let next = (!rest.is_empty()).then_some(Next {
            deliveries: rest,
            delay: None,
        });
        (next, false)
    }
}

/// Acks `deliveries` in order, keeping those not acked yet alive with
/// `clock`, and what else is held, which `held_too` tells.
async fn ack_all<E: Event, D: Delivery<E>>(
    deliveries: Vec<D>,
    clock: &mut Clock,
    held_too: impl Fn(),
) {
    let mut deliveries = deliveries.into_iter();
    while let Some(delivery) = deliveries.next() {
        let rest = deliveries.as_slice();
        let tick = || {
            in_progress(rest);
            held_too();
        };
        held(clock, tick, delivery.ack()).await;
    }
}
