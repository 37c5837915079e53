//! Batching listeners: [`BatchListener`], the [`Batch`] it is handed and the
//! [`BatchError`] that says which of its events failed.

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
use crate::runtime::{FinishGuard, Supervisor, panicked};

/// A listener that handles its events in batches, run and supervised by the
/// bus like a [`Listener`](crate::Listener).
///
/// Spawn one with [`EventBus::spawn_batch`](crate::EventBus::spawn_batch).
/// The runtime hands it up to [`max_batch`](ListenerOptions::max_batch)
/// events at once: whatever its queue holds when it is free, and, with a
/// [`max_wait`](ListenerOptions::max_wait), whatever else arrives until that
/// long after the batch's first event. A batch is in the order the queue
/// hands events out: by priority, then emit order. A high-priority event
/// ends the wait at once.
///
/// # Failures
///
/// `handle_batch` says which events failed:
///
/// - `Ok(())`: every event of the batch was handled.
/// - an error naming events ([`BatchError::event`], [`BatchError::events`]):
///   those failed and every other event of the batch was handled;
/// - any other error (`?` on any error type, [`BatchError::all`]), or a
///   panic: the whole batch failed.
///
/// Failed events are retried together, as a smaller batch, per the
/// listener's [`RetryPolicy`](crate::RetryPolicy); those still failing after
/// the last attempt become dead letters, one per event, each with its own
/// error. Counters count events, not batches: `failed`, `retried`,
/// `dead_lettered` and `handled` in the listener's
/// [metrics](crate::metrics::ListenerMetrics) add up as for a `Listener`.
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
    /// hands over the events that failed, in the same order, with
    /// [`Batch::attempt`] raised.
    fn handle_batch(&self, batch: &Batch<E>)
    -> impl Future<Output = Result<(), BatchError>> + Send;
}

/// The events a [`BatchListener`] handles in one call: a slice of envelopes,
/// in the order the queue handed them out.
///
/// Dereferences to `[Arc<Envelope<E>>]`; a [`BatchError`] names failed
/// events by their index in it.
#[derive(Debug)]
pub struct Batch<E> {
    events: Vec<Arc<Envelope<E>>>,
    attempt: u32,
}

impl<E> Batch<E> {
    /// A first attempt at `events`: for testing a batch listener's handler
    /// directly.
    pub fn new(events: Vec<Arc<Envelope<E>>>) -> Self {
        Self { events, attempt: 1 }
    }

    /// Which attempt this is at these events: 1 at first, 2 on the first
    /// retry.
    pub fn attempt(&self) -> u32 {
        self.attempt
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
        }
    }

    /// The next batch, or `None` once the queue is closed and drained.
    async fn next(&mut self, receiver: &mut Receiver<E>) -> Option<Vec<Arc<Envelope<E>>>> {
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
            if self.urgent {
                return self.take();
            }
            let next = match self.deadline {
                None => receiver.recv(true).await,
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, receiver.recv(true)).await {
                        Ok(next) => next,
                        Err(_elapsed) => return self.take(),
                    }
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

    fn take(&mut self) -> Option<Vec<Arc<Envelope<E>>>> {
        self.deadline = None;
        self.urgent = false;
        if self.pending.is_empty() {
            return None;
        }
        Some(std::mem::replace(
            &mut self.pending,
            Vec::with_capacity(self.max_batch.min(1024)),
        ))
    }
}

impl<E: Event, L: BatchListener<E>> Supervisor<E, L> {
    pub(crate) async fn run_batches(
        self,
        mut receiver: Receiver<E>,
        options: ListenerOptions,
        _finished: FinishGuard<E>,
    ) {
        let mut collector = Collector::new(&options);
        if options.concurrency <= 1 {
            while let Some(events) = collector.next(&mut receiver).await {
                self.process_batch(events).await;
            }
        } else {
            let mut running = FuturesUnordered::new();
            loop {
                tokio::select! {
                    biased;
                    Some(()) = running.next(), if !running.is_empty() => {}
                    next = collector.next(&mut receiver), if running.len() < options.concurrency => {
                        match next {
                            Some(events) => running.push(self.process_batch(events)),
                            None => break,
                        }
                    }
                }
            }
            while running.next().await.is_some() {}
        }
    }

    async fn process_batch(&self, events: Vec<Arc<Envelope<E>>>) {
        let count = events.len();
        let span = tracing::info_span!(
            "event_bus.handle_batch",
            listener = %self.name(),
            events = count,
        );
        if span.is_disabled() {
            self.attempt_batch(events).await;
        } else {
            for envelope in &events {
                span.follows_from(envelope.span());
            }
            self.attempt_batch(events).instrument(span).await;
        }
        self.complete(count);
    }

    async fn attempt_batch(&self, events: Vec<Arc<Envelope<E>>>) {
        let retry = self.state.retry;
        let mut started = Instant::now();
        for envelope in &events {
            self.waited(envelope, started);
        }
        let mut batch = Batch::new(events);
        loop {
            let outcome = AssertUnwindSafe(self.listener.handle_batch(&batch))
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
            let total = batch.len();
            let (failed, errors): (Vec<_>, Vec<_>) = batch
                .events
                .into_iter()
                .zip(errors)
                .filter_map(|(envelope, error)| error.map(|error| (envelope, error)))
                .unzip();
            self.handled(total - failed.len());
            self.failed(failed.len(), panicked);
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
                self.retried(failed.len());
                tokio::time::sleep(delay).await;
                batch = Batch {
                    events: failed,
                    attempt: batch.attempt + 1,
                };
                started = Instant::now();
                continue;
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
                self.dead_letter(envelope, error, batch.attempt);
            }
            return;
        }
    }
}
