//! Batching listeners: [`BatchListener`], the [`Batch`] it is handed, the
//! [`BatchError`] that says which of its events failed, and the
//! [`BatchFailure`] mode that says how those are retried.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, Range};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::Instrument;

use crate::envelope::Envelope;
use crate::error::{HandlerError, RecvError, TryRecvError, chain};
use crate::event::{Event, KindSet, Priority};
use crate::listener::ListenerOptions;
use crate::queue::Receiver;
use crate::runtime::{Supervisor, panicked};

/// A listener that handles its events in batches, run and supervised by the
/// bus like a [`Listener`](crate::Listener).
///
/// Spawn one with [`EventBus::spawn_batch`](crate::EventBus::spawn_batch).
/// The runtime hands it up to [`max_batch`](ListenerOptions::max_batch)
/// events at once: whatever its queue holds when it is free, and, with a
/// [`max_wait`](ListenerOptions::max_wait), whatever else arrives until that
/// long after the batch's first event. A high-priority event ends the wait
/// at once.
///
/// A batch is in the order the queue hands events out: the highest priority
/// first, except that the [fairness bound](ListenerOptions::fairness) lets a
/// waiting lower-priority event go after at most that many higher ones (see
/// [Priority](crate#priority)), and events of one priority in emit order.
/// The queue orders what it holds at the moment it is asked, so an event
/// that arrives while a batch is being collected goes after the events
/// already collected, whatever its priority.
///
/// # Failures
///
/// `handle_batch` says which events failed:
///
/// - `Ok(())`: every event of the batch was handled.
/// - an error naming events ([`BatchError::event`], [`BatchError::events`]):
///   those failed and every other event of the batch was handled (under
///   [`BatchFailure::StopAtFirst`], only the events before the first of
///   them count as handled);
/// - any other error (`?` on any error type, [`BatchError::all`]), or a
///   panic: the whole batch failed.
///
/// The listener's [`batch_failure`](ListenerOptions::batch_failure) mode
/// decides what is retried, per its [`RetryPolicy`](crate::RetryPolicy):
///
/// - [`BatchFailure::Independent`] (the default): the failed events are
///   retried together, as a smaller batch in their batch order, after the
///   events that followed them in the batch were handled. Those still
///   failing after the last attempt become dead letters, one per event,
///   each with its own error.
/// - [`BatchFailure::StopAtFirst`]: the events before the first failed one
///   are handled; that event and every event after it, in order, are the
///   next attempt, whatever the handler reported for the later ones. When
///   the first failed event has had every attempt, it becomes a dead letter
///   and the events after it go on as a new batch, at attempt 1. Events are
///   handled in the order the batch holds them.
///
/// With the default concurrency of 1, the listener waits out a retry's
/// backoff before its next batch, so no later batch overtakes a retried
/// event. Counters count events, not batches: `failed`, `retried`,
/// `dead_lettered` and `handled` in the listener's
/// [metrics](crate::metrics::ListenerMetrics) add up as for a `Listener`
/// (`failed == retried + dead_lettered`, and every delivered event ends
/// handled or dead-lettered, once). Under `StopAtFirst` a failed attempt
/// counts one failed event, the first: the events after it were not
/// attempted.
///
/// # Examples
///
/// ```
/// use event_bus::{Batch, BatchError, BatchListener, DomainEvent, EventBus, ListenerOptions};
/// use std::time::Duration;
///
/// #[derive(Debug, DomainEvent)]
/// enum AppEvent {
///     PostPublished(u64),
/// }
///
/// struct Indexer;
///
/// impl BatchListener<AppEvent> for Indexer {
///     async fn handle_batch(&self, batch: &Batch<AppEvent>) -> Result<(), BatchError> {
///         let ids: Vec<u64> = batch
///             .iter()
///             .map(|event| match *event.event() {
///                 AppEvent::PostPublished(id) => id,
///             })
///             .collect();
///         println!("indexing {ids:?} in one commit");
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let bus = EventBus::new();
/// let options = ListenerOptions::new()
///     .max_batch(100)
///     .max_wait(Duration::from_millis(20));
/// let indexer = bus.spawn_batch_with(Indexer, options);
/// for id in 0..250 {
///     bus.emit(AppEvent::PostPublished(id));
/// }
/// bus.quiesce().await;
/// assert_eq!(indexer.metrics().handled, 250);
/// # }
/// ```
pub trait BatchListener<E: Event>: Send + Sync + 'static {
    /// The name the listener has in logs, metrics, dead letters and reports.
    ///
    /// Defaults to the implementing type's name.
    fn name(&self) -> &str {
        crate::listener::type_name::<Self>()
    }

    /// The kinds the listener receives. Read once, at spawn. Defaults to
    /// every kind.
    fn interests(&self) -> KindSet<E::Kind> {
        KindSet::all()
    }

    /// Handles one batch (never empty).
    ///
    /// With the default concurrency of 1, calls are sequential. A retry
    /// hands over, in the same order and with [`Batch::attempt`] raised, the
    /// events that failed ([`BatchFailure::Independent`]) or the first
    /// failed event and every event after it ([`BatchFailure::StopAtFirst`],
    /// which [`Batch::failure_mode`] tells: a handler in that mode may stop
    /// at its first failure and name only it).
    fn handle_batch(&self, batch: &Batch<E>)
    -> impl Future<Output = Result<(), BatchError>> + Send;
}

/// How a [`BatchListener`]'s partly failed batch is retried: which events
/// count as handled, and which go again. Set with
/// [`ListenerOptions::batch_failure`].
///
/// # Examples
///
/// A store whose writes must apply in order retries from its first failed
/// write:
///
/// ```
/// use event_bus::{BatchFailure, ListenerOptions, RetryPolicy};
///
/// let options = ListenerOptions::new()
///     .batch_failure(BatchFailure::StopAtFirst)
///     .retry(RetryPolicy::exponential(5));
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BatchFailure {
    /// Each event stands alone. The events the handler did not name are
    /// handled; the failed ones are retried together, as a smaller batch in
    /// their batch order, after the events that followed them were handled;
    /// each one still failing after the last attempt becomes a dead letter.
    /// For events that do not depend on each other, such as documents of
    /// distinct rows. The default.
    #[default]
    Independent,
    /// Events are handled in batch order, a failure included. The events
    /// before the first failed one (the lowest index the error names) are
    /// handled; that event and every event after it, in order, are the next
    /// attempt. When the first failed event has had every attempt of the
    /// [`RetryPolicy`](crate::RetryPolicy), it becomes a dead letter and the
    /// events after it go on as a new batch, at attempt 1. An error for the
    /// whole batch, or a panic, is a failure of its first event.
    ///
    /// For writes whose order matters (set, clear, set of one key). The
    /// derived batch handler calls no run of events after the first that
    /// fails; a hand-written one may stop at its first failure too, since
    /// what it reports about the events after it is not read. One that goes
    /// on past its failure is handed those events again: they count once,
    /// but its side effects on them happen twice.
    StopAtFirst,
}

/// The events a [`BatchListener`] handles in one call: a slice of envelopes,
/// in the order the queue handed them out, with the attempt this is and the
/// listener's [`BatchFailure`] mode.
///
/// Dereferences to `[Arc<Envelope<E>>]`; a [`BatchError`] names failed
/// events by their index in it.
#[derive(Debug)]
pub struct Batch<E> {
    events: Vec<Arc<Envelope<E>>>,
    attempt: u32,
    failure_mode: BatchFailure,
}

impl<E> Batch<E> {
    /// A first attempt at `events`, in the default
    /// [`BatchFailure::Independent`] mode: for testing a batch listener's
    /// handler directly.
    pub fn new(events: Vec<Arc<Envelope<E>>>) -> Self {
        Self {
            events,
            attempt: 1,
            failure_mode: BatchFailure::default(),
        }
    }

    /// This batch in failure mode `mode`: for testing how a handler behaves
    /// in it.
    #[must_use]
    pub fn with_failure_mode(mut self, mode: BatchFailure) -> Self {
        self.failure_mode = mode;
        self
    }

    /// Which attempt this is: 1 at first, 2 on the first retry.
    ///
    /// Under [`BatchFailure::Independent`] it is the attempt at every event
    /// of the batch. Under [`BatchFailure::StopAtFirst`] it is the attempt
    /// at the batch's first event; the events after it are at their first
    /// attempt, since those that followed a failure were not attempted.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How a failure of this batch is retried: the listener's
    /// [`batch_failure`](ListenerOptions::batch_failure).
    pub fn failure_mode(&self) -> BatchFailure {
        self.failure_mode
    }

    /// The batch's events.
    pub fn events(&self) -> &[Arc<Envelope<E>>] {
        &self.events
    }
}

impl<E> Deref for Batch<E> {
    type Target = [Arc<Envelope<E>>];

    fn deref(&self) -> &Self::Target {
        &self.events
    }
}

impl<'a, E> IntoIterator for &'a Batch<E> {
    type Item = &'a Arc<Envelope<E>>;
    type IntoIter = std::slice::Iter<'a, Arc<Envelope<E>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.iter()
    }
}

/// The error of a [`BatchListener`]: which events of the batch failed, and
/// why.
///
/// `?` turns any error into one that fails the whole batch, as
/// [`BatchError::all`] does. Name the events that failed with
/// [`event`](BatchError::event) and [`events`](BatchError::events), and
/// combine several with [`and`](BatchError::and): the events not named were
/// handled and are not retried.
///
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself, so
/// that `?` can convert every error into it.
///
/// # Examples
///
/// ```
/// use event_bus::BatchError;
///
/// // Events 0 and 3 failed; the rest of the batch was handled.
/// let error = BatchError::event(0, "row locked").and(BatchError::event(3, "row locked"));
/// assert_eq!(error.to_string(), "event 0: row locked; event 3: row locked");
/// ```
pub struct BatchError {
    failures: Vec<Failure>,
}

struct Failure {
    /// The indices of the events that failed; `None` for the whole batch.
    events: Option<Vec<usize>>,
    error: HandlerError,
}

impl BatchError {
    /// Every event of the batch failed with `error`.
    pub fn all(error: impl Into<HandlerError>) -> Self {
        Self {
            failures: vec![Failure {
                events: None,
                error: error.into(),
            }],
        }
    }

    /// The event at `index` in the batch failed with `error`.
    pub fn event(index: usize, error: impl Into<HandlerError>) -> Self {
        Self::events([index], error)
    }

    /// The events at `indices` in the batch failed with `error`.
    pub fn events(
        indices: impl IntoIterator<Item = usize>,
        error: impl Into<HandlerError>,
    ) -> Self {
        Self {
            failures: vec![Failure {
                events: Some(indices.into_iter().collect()),
                error: error.into(),
            }],
        }
    }

    /// Both errors' failures: the events either names failed.
    #[must_use]
    pub fn and(mut self, other: BatchError) -> Self {
        self.failures.extend(other.failures);
        self
    }

    /// This error, for the run `part` of a batch, as an error of the whole:
    /// event `i` of the run is event `part.start + i` of the batch. Used by
    /// the batch handlers `#[derive(DomainEvent)]` writes, which hand each
    /// run of consecutive events of one kind to that kind's method.
    #[doc(hidden)]
    #[must_use]
    pub fn within(self, part: Range<usize>) -> Self {
        let failures = self
            .failures
            .into_iter()
            .map(|failure| {
                let events = match failure.events {
                    None => part.clone().collect(),
                    Some(events) => events
                        .into_iter()
                        // An index past the run stays past the whole.
                        .map(|i| {
                            if i < part.len() {
                                part.start + i
                            } else {
                                usize::MAX
                            }
                        })
                        .collect(),
                };
                Failure {
                    events: Some(events),
                    error: failure.error,
                }
            })
            .collect();
        Self { failures }
    }

    /// The error of each of a batch's `len` events: `Some` for those that
    /// failed. An error that names no event, or one outside the batch, is
    /// taken for the whole batch: a wrong index must not mark an event
    /// handled that may not have been.
    fn resolve(&self, len: usize) -> Vec<Option<String>> {
        let mut errors = vec![None; len];
        for failure in &self.failures {
            let message = chain(&*failure.error);
            match &failure.events {
                Some(events) if events.iter().all(|&i| i < len) => {
                    for &i in events {
                        errors[i].get_or_insert_with(|| message.clone());
                    }
                }
                Some(events) => {
                    // The guard above failed: some index is outside.
                    let outside = events.iter().find(|&&i| i >= len);
                    let place = match outside {
                        Some(&i) if i != usize::MAX => format!("index {i}"),
                        _ => "past the end".to_string(),
                    };
                    let message = format!(
                        "batch handler named an event outside its batch of {len} ({place}): {message}"
                    );
                    for error in &mut errors {
                        error.get_or_insert_with(|| message.clone());
                    }
                }
                None => {
                    for error in &mut errors {
                        error.get_or_insert_with(|| message.clone());
                    }
                }
            }
        }
        if errors.iter().all(Option::is_none) {
            let message = format!("batch handler returned an error naming no event: {self}");
            errors.fill(Some(message));
        }
        errors
    }
}

impl<T: StdError + Send + Sync + 'static> From<T> for BatchError {
    fn from(error: T) -> Self {
        Self::all(error)
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, failure) in self.failures.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            match &failure.events {
                None => write!(f, "every event: {}", chain(&*failure.error))?,
                Some(events) => {
                    let indices: Vec<String> = events.iter().map(usize::to_string).collect();
                    let noun = if events.len() == 1 { "event" } else { "events" };
                    write!(
                        f,
                        "{noun} {}: {}",
                        indices.join(", "),
                        chain(&*failure.error)
                    )?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchError")
            .field("failures", &self.to_string())
            .finish()
    }
}

/// Assembles batches from a receiver. Cancel safe: what it has taken stays
/// in `pending` when the future of [`next`](Collector::next) is dropped.
struct Collector<E: Event> {
    pending: Vec<Arc<Envelope<E>>>,
    /// When the pending batch stops waiting for more; `None` while nothing
    /// is pending, or when `max_wait` reaches past the clock's range (the
    /// batch then waits until full, urgent or closed).
    deadline: Option<tokio::time::Instant>,
    /// The pending batch holds a high-priority event: hand it over now.
    urgent: bool,
    closed: bool,
    max_batch: usize,
    max_wait: std::time::Duration,
    failure_mode: BatchFailure,
}

impl<E: Event> Collector<E> {
    fn new(options: &ListenerOptions) -> Self {
        Self {
            pending: Vec::new(),
            deadline: None,
            urgent: false,
            closed: false,
            max_batch: options.max_batch,
            max_wait: options.max_wait,
            failure_mode: options.batch_failure,
        }
    }

    /// The next batch, or `None` once the queue is closed and drained.
    async fn next(&mut self, receiver: &mut Receiver<E>) -> Option<Batch<E>> {
        loop {
            if self.pending.len() >= self.max_batch || self.closed {
                return self.take();
            }
            // Take what is queued already, without waiting.
            match receiver.try_recv(true) {
                Ok(envelope) => {
                    self.add(envelope);
                    continue;
                }
                Err(TryRecvError::Lagged(_)) => continue,
                Err(TryRecvError::Closed) => {
                    self.closed = true;
                    continue;
                }
                Err(TryRecvError::Empty) => {}
            }
            // A shutting-down bus waits for no batch to fill up.
            if self.urgent || (!self.pending.is_empty() && receiver.queue.is_draining()) {
                return self.take();
            }
            let next = if self.pending.is_empty() {
                receiver.recv(true).await
            } else {
                let queue = receiver.queue.clone();
                let deadline = self.deadline;
                let waited_out = async move {
                    match deadline {
                        Some(deadline) => tokio::time::sleep_until(deadline).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    next = receiver.recv(true) => next,
                    () = waited_out => return self.take(),
                    () = queue.draining() => return self.take(),
                }
            };
            match next {
                Ok(envelope) => self.add(envelope),
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => self.closed = true,
            }
        }
    }

    fn add(&mut self, envelope: Arc<Envelope<E>>) {
        if self.pending.is_empty() {
            // `Duration::MAX` is how a user says "until full".
            self.deadline = tokio::time::Instant::now().checked_add(self.max_wait);
        }
        self.urgent |= envelope.priority() == Priority::High;
        self.pending.push(envelope);
    }

    fn take(&mut self) -> Option<Batch<E>> {
        self.deadline = None;
        self.urgent = false;
        if self.pending.is_empty() {
            return None;
        }
        let events = std::mem::replace(
            &mut self.pending,
            Vec::with_capacity(self.max_batch.min(1024)),
        );
        Some(Batch::new(events).with_failure_mode(self.failure_mode))
    }
}

impl<E: Event, L: BatchListener<E>> Supervisor<E, L> {
    pub(crate) async fn run_batches(self, mut receiver: Receiver<E>, options: ListenerOptions) {
        let mut collector = Collector::new(&options);
        if options.concurrency <= 1 {
            while !self.is_cancelled() {
                // The collector takes what is queued without waiting: spend
                // budget per batch, so a listener that never waits still
                // lets other tasks run (and can be stopped) between batches.
                tokio::task::coop::consume_budget().await;
                match collector.next(&mut receiver).await {
                    // A stop is final: the batch stays unhandled.
                    Some(_) if self.is_cancelled() => break,
                    Some(events) => self.process_batch(events).await,
                    None => break,
                }
            }
        } else {
            let mut running = FuturesUnordered::new();
            while !self.is_cancelled() {
                tokio::select! {
                    biased;
                    Some(()) = running.next(), if !running.is_empty() => {}
                    next = async {
                        tokio::task::coop::consume_budget().await;
                        collector.next(&mut receiver).await
                    }, if running.len() < options.concurrency => {
                        match next {
                            Some(_) if self.is_cancelled() => break,
                            Some(events) => running.push(self.process_batch(events)),
                            None => break,
                        }
                    }
                }
            }
            while running.next().await.is_some() {}
        }
        self.ended();
    }

    async fn process_batch(&self, batch: Batch<E>) {
        let count = batch.len();
        let span = tracing::info_span!(
            "event_bus.handle_batch",
            listener = %self.name(),
            events = count,
        );
        if span.is_disabled() {
            self.attempt_batch(batch).await;
        } else {
            for envelope in &batch {
                span.follows_from(envelope.span());
            }
            self.attempt_batch(batch).instrument(span).await;
        }
        self.complete(count);
    }

    async fn attempt_batch(&self, mut batch: Batch<E>) {
        let mut started = Instant::now();
        for envelope in &batch {
            self.waited(envelope, started);
        }
        loop {
            // The handler's future is made, run and dropped inside the
            // catch: a panic in any of the three is the handler's.
            let outcome = AssertUnwindSafe(async { self.listener.handle_batch(&batch).await })
                .catch_unwind()
                .await;
            self.took(started.elapsed());
            let (errors, panicked) = match outcome {
                Ok(Ok(())) => {
                    self.handled(batch.len());
                    return;
                }
                Ok(Err(error)) => (error.resolve(batch.len()), false),
                Err(payload) => (vec![Some(panicked(&*payload)); batch.len()], true),
            };
            let next = match batch.failure_mode {
                BatchFailure::Independent => self.retry_failed(batch, errors, panicked),
                BatchFailure::StopAtFirst => self.retry_from_first(batch, errors, panicked),
            };
            let Some(Next { batch: next, delay }) = next else {
                return;
            };
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            batch = next;
            started = Instant::now();
        }
    }

    /// [`BatchFailure::Independent`]: counts the events `errors` fails and
    /// the others handled, and retries the failed ones together, or records
    /// them as dead letters after the last attempt.
    fn retry_failed(
        &self,
        batch: Batch<E>,
        errors: Vec<Option<String>>,
        panicked: bool,
    ) -> Option<Next<E>> {
        let retry = self.state.retry;
        let total = batch.len();
        let (failed, errors): (Vec<_>, Vec<_>) = batch
            .events
            .into_iter()
            .zip(errors)
            .filter_map(|(envelope, error)| error.map(|error| (envelope, error)))
            .unzip();
        self.handled(total - failed.len());
        if batch.attempt < retry.max_attempts() {
            let delay = retry.delay(batch.attempt);
            tracing::warn!(
                listener = %self.name(),
                events = total,
                failed = failed.len(),
                attempt = batch.attempt,
                retry_in = ?delay,
                error = %errors[0],
                "batch handler failed; retrying the events that failed",
            );
            self.retried(failed.len(), if panicked { failed.len() } else { 0 });
            return Some(Next {
                batch: Batch {
                    events: failed,
                    attempt: batch.attempt + 1,
                    failure_mode: batch.failure_mode,
                },
                delay: Some(delay),
            });
        }
        tracing::error!(
            listener = %self.name(),
            events = total,
            failed = failed.len(),
            attempts = batch.attempt,
            error = %errors[0],
            "batch handler failed; recorded a dead letter per failed event",
        );
        for (envelope, error) in failed.into_iter().zip(errors) {
            self.dead_letter(envelope, error, batch.attempt, panicked);
        }
        None
    }

    /// [`BatchFailure::StopAtFirst`]: counts the events before the first
    /// that `errors` fails handled, and that one failed; retries it and the
    /// events after it, or records it as a dead letter after its last
    /// attempt and goes on with the events after it.
    fn retry_from_first(
        &self,
        mut batch: Batch<E>,
        errors: Vec<Option<String>>,
        panicked: bool,
    ) -> Option<Next<E>> {
        let retry = self.state.retry;
        let total = batch.len();
        // `resolve` and a panic fail at least one event; were there none,
        // failing the first keeps every event unhandled rather than lost.
        let (first, error) = errors
            .into_iter()
            .enumerate()
            .find_map(|(i, error)| Some((i, error?)))
            .unwrap_or_else(|| (0, "batch handler failed".to_owned()));
        // The batch's attempt is its first event's; the events after it
        // were not attempted before this call.
        let attempt = if first == 0 { batch.attempt } else { 1 };
        let mut rest = batch.events.split_off(first);
        self.handled(first);
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
            self.retried(1, usize::from(panicked));
            return Some(Next {
                batch: Batch {
                    events: rest,
                    attempt: attempt + 1,
                    failure_mode: batch.failure_mode,
                },
                delay: Some(delay),
            });
        }
        tracing::error!(
            listener = %self.name(),
            events = total,
            handled = first,
            attempts = attempt,
            error = %error,
            "batch handler failed; recorded a dead letter for the first event that failed, going on with those after it",
        );
        let envelope = rest.remove(0);
        self.dead_letter(envelope, error, attempt, panicked);
        (!rest.is_empty()).then(|| Next {
            batch: Batch {
                events: rest,
                attempt: 1,
                failure_mode: batch.failure_mode,
            },
            delay: None,
        })
    }
}

/// What a failed attempt leaves to do: `batch` again, after `delay` (none
/// for events that were not attempted yet).
struct Next<E> {
    batch: Batch<E>,
    delay: Option<std::time::Duration>,
}
