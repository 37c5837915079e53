//! Batching listeners: [`BatchListener`], the [`Batch`] it is handed, the
//! [`BatchError`] that says which of its events failed, and the
//! [`BatchFailure`] mode that says how those are retried.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, Range};
use std::sync::Arc;

use crate::envelope::Envelope;
use crate::error::{HandlerError, chain};
use crate::event::{Event, KindSet};
use crate::listener::BatchFailure;

/// A listener that handles its events in batches, run and supervised by the
/// bus like a [`Listener`](crate::Listener).
///
/// Spawn one with [`EventBus::spawn`](crate::EventBus::spawn).
/// The runtime hands it up to [`max_batch`](crate::ListenerOptions::max_batch)
/// events at once: whatever its queue holds when it is free, and, with a
/// [`max_wait`](crate::ListenerOptions::max_wait), whatever else arrives until that
/// long after the batch's first event. A high-priority event ends the wait
/// at once.
///
/// A batch is in the order the queue hands events out: the highest priority
/// first, except that the [fairness bound](crate::ListenerOptions::fairness) lets a
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
/// The listener's [`batch_failure`](crate::ListenerOptions::batch_failure) mode
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
/// let indexer = bus.spawn_with(Indexer, options);
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

/// The events a [`BatchListener`] handles in one call: a slice of envelopes,
/// in the order the queue handed them out, with the attempt this is and the
/// listener's [`BatchFailure`] mode.
///
/// Dereferences to `[Arc<Envelope<E>>]`; a [`BatchError`] names failed
/// events by their index in it.
#[derive(Debug)]
pub struct Batch<E> {
    pub(crate) events: Vec<Arc<Envelope<E>>>,
    pub(crate) attempt: u32,
    /// Each event's attempt, in batch order.
    pub(crate) attempts: Vec<u32>,
    pub(crate) failure_mode: BatchFailure,
}

impl<E> Batch<E> {
    /// A first attempt at `events`, in the default
    /// [`BatchFailure::Independent`] mode: for testing a batch listener's
    /// handler directly.
    pub fn new(events: Vec<Arc<Envelope<E>>>) -> Self {
        Self {
            attempts: vec![1; events.len()],
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

    /// Each event's attempt, in batch order: under
    /// [`BatchFailure::StopAtFirst`] the first event may be on a retry while
    /// those after it are at their first attempt, and a source that
    /// redelivers may batch a retried event with new ones.
    pub fn attempts(&self) -> &[u32] {
        &self.attempts
    }

    /// How a failure of this batch is retried: the listener's
    /// [`batch_failure`](crate::ListenerOptions::batch_failure).
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
    pub(crate) fn resolve(&self, len: usize) -> Vec<Option<String>> {
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
