//! How listeners are run, whatever carries their events: the seam between a
//! tier (where events are stored and carried) and the runner (supervision,
//! retries, dead letters, batching, concurrency, cooperative yielding,
//! cancellation and draining).
//!
//! A tier hands the runner a [`Source`] per listener (or per group of
//! listener instances). The source yields [`Delivery`]s: an envelope, the
//! number of the attempt it is on, and the way to finish it. The runner calls
//! the listener's handler and finishes every delivery exactly once, in one of
//! three ways:
//!
//! - [`ack`](Delivery::ack): handled; the source forgets it.
//! - [`retry`](Delivery::retry): the attempt failed and the listener's
//!   [`RetryPolicy`](crate::RetryPolicy) allows another after `delay`. The
//!   source either keeps the retry with the runner ([`Retry::InPlace`]: the
//!   runner holds the delivery, waits, and attempts it again, its slot of
//!   the listener's concurrency held meanwhile) or takes it back
//!   ([`Retry::Redelivered`]: it comes again through the source, no sooner
//!   than `delay`, with its attempt one higher, and a durable source makes
//!   that survive a crash).
//! - [`terminate`](Delivery::terminate): the last attempt failed; the runner
//!   has recorded a [`DeadLetter`](crate::DeadLetter) in its [`DeadLetterSink`] with the reason,
//!   and the source never delivers the event to this listener again.
//!
//! [`Delivery::attempt`] is what the handler sees as the attempt, and what
//! the runner measures the retry policy against, so a source that counts
//! redeliveries (a durable log, a broker) keeps the count across processes.
//!
//! # How the tiers map onto it
//!
//! | | memory | SQL log | NATS JetStream pull consumer |
//! |---|---|---|---|
//! | source | the listener's queue | rows past the listener's checkpoint, leased | a durable consumer (per group) or an ordered/ephemeral one (per instance) |
//! | attempt | counted by the runner (in place) | the delivery row's `attempts` | the message's `num_delivered` |
//! | `ack` | the event leaves the queue's in-flight count | the position is done; the checkpoint moves past the lowest unfinished position | `ack` |
//! | `retry(delay)` | [`Retry::InPlace`] | `attempts + 1`, `next_try = now + delay` persisted; in place while the lease holds, else redelivered | `nak` with `delay`: [`Retry::Redelivered`] |
//! | `terminate` | the event leaves the queue's in-flight count | the delivery row is marked dead with its last error; the checkpoint moves past it | `term` |
//! | [`in_progress`](Delivery::in_progress) | nothing to do | the lease is extended | `in_progress` (resets `ack_wait`) |
//! | concurrency | handlers run at once, each delivery held until finished | leases taken at once; finished out of order, the checkpoint waits for the lowest | `max_ack_pending` |
//!
//! With a concurrency of 1, a delivery retried in place holds back the ones
//! after it: events are handled in their source's order. A source that takes
//! retries back keeps that order only if it delivers nothing past an
//! unfinished event (JetStream's `max_ack_pending = 1`, a SQL source that
//! leases one position at a time).
//!
//! Some semantics belong to one tier and are documented there: priority
//! lanes, fairness, lag policies, the bus-wide sequence and
//! [`quiesce`](crate::EventBus::quiesce) are the memory tier's.

mod attempt;
mod batch;
mod core;
#[cfg(any(feature = "sql", feature = "nats"))]
mod spawn;
mod supervisor;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use uuid::Uuid;

use crate::batch::BatchListener;
use crate::envelope::Envelope;
use crate::event::{Event, KindSet};
use crate::listener::{Listener, ListenerOptions};
use crate::metrics::ListenerStatus;

pub(crate) use self::core::{ListenerCore, ListenerCounts};
#[cfg(any(feature = "sql", feature = "nats"))]
pub(crate) use self::spawn::spawn_run;
pub(crate) use self::supervisor::{Supervisor, panicked};
pub use crate::dead_letter::{DeadLetterSink, UndecodableLetter};

/// Where a listener's deliveries come from: one per listener, or per group
/// of listener instances sharing the work.
///
/// A source is polled by one runner task only. It ends
/// (`Poll::Ready(None)`) once it is closed and every delivery it holds has
/// been yielded; deliveries yielded and not yet finished are the runner's.
pub trait Source<E: Event>: Send + 'static {
    /// What the source yields.
    type Delivery: Delivery<E>;

    /// Polls for the next delivery: `Ready(Some)` with one, `Pending` (the
    /// waker registered) while there is none yet, `Ready(None)` once the
    /// source has ended.
    ///
    /// A source whose deliveries are all ready should take part in tokio's
    /// cooperative budget ([`tokio::task::coop`]), as tokio's channels do,
    /// so that a listener whose handler never awaits still lets other tasks
    /// run.
    ///
    /// An event the source cannot decode comes as `Err`: the runner records
    /// it as a dead letter with the reason and terminates it, and never
    /// calls the handler with it.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Self::Delivery, Undecodable>>>;

    /// The next delivery if one is ready now, without waiting: `Ok(None)`
    /// when none is, `Err(Ended)` once the source has ended. Batching
    /// listeners collect what is ready through this.
    ///
    /// Defaults to polling once with a waker that does nothing.
    #[allow(clippy::type_complexity)]
    fn try_next(&mut self) -> Result<Option<Result<Self::Delivery, Undecodable>>, Ended> {
        match self.poll_next(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Some(next)) => Ok(Some(next)),
            Poll::Ready(None) => Err(Ended),
            Poll::Pending => Ok(None),
        }
    }

    /// Whether the source is draining (its tier is shutting down): a batch
    /// being collected is handed to its listener at once rather than waiting
    /// to fill. Defaults to `false`.
    fn is_draining(&self) -> bool {
        false
    }

    /// Completes once the source starts draining; owns what it waits on,
    /// so that it can be awaited while the source is polled. Defaults to
    /// never.
    fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }
}

/// The shortest [`Delivery::progress_interval`] the runner keeps: a
/// shorter one (zero, say: a lease configured as 0 or rounded down) is
/// taken as this.
pub const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(1);

/// The source has ended: it will yield nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ended;

/// One event delivered to one listener, for one attempt, finished by the
/// runner exactly once.
///
/// Dropping a delivery without finishing it (the runner was stopped
/// mid-handler) leaves the event unfinished: a durable source delivers it
/// again after its lease or `ack_wait` expires; the memory tier reports it
/// undelivered.
pub trait Delivery<E: Event>: Send + Sync + Sized + 'static {
    /// The event and its metadata.
    fn envelope(&self) -> &Arc<Envelope<E>>;

    /// Which attempt this is: 1 for the first.
    fn attempt(&self) -> u32;

    /// The attempt succeeded.
    fn ack(self) -> impl Future<Output = ()> + Send;

    /// The attempt failed with `error` (its source chain, or
    /// `"panicked: …"`) and another may follow after `delay`: kept in place,
    /// or taken back by the source. See [`Retry`]. A durable source records
    /// the error with the attempt count, so that an operator sees why an
    /// event is being retried.
    fn retry(self, delay: Duration, error: &str) -> impl Future<Output = Retry<Self>> + Send;

    /// The last attempt failed with `reason`; the runner has recorded the
    /// dead letter. The source never delivers this event to this listener
    /// again.
    fn terminate(self, reason: &str) -> impl Future<Output = ()> + Send;

    /// The handler is still working (or the runner is waiting out the
    /// delay of an in-place retry): a source whose deliveries expire (a
    /// lease, an `ack_wait`) extends this one's. The runner calls it every
    /// [`progress_interval`](Delivery::progress_interval) while it holds
    /// the delivery, on one clock from the source's yield to the finish:
    /// through a batch being collected, every attempt, the delays of
    /// in-place retries, dead-letter records and the finishing of the
    /// events beside it in a batch. A delivery retried in place is a new
    /// one, whose own interval counts from then on. The delivery's own
    /// `ack`, `retry`, `terminate` and `release` calls are the source's:
    /// they consume it, and the runner keeps alive only what is held
    /// beside it meanwhile. Defaults to nothing.
    fn in_progress(&self) {}

    /// How often the runner calls [`in_progress`](Delivery::in_progress)
    /// while it holds this delivery: well within the source's lease or
    /// `ack_wait`. `None` (the default) for a delivery that does not expire.
    /// An interval shorter than [`MIN_PROGRESS_INTERVAL`] is taken as that.
    fn progress_interval(&self) -> Option<Duration> {
        None
    }

    /// The runner gives the delivery back without attempting it: under
    /// [`BatchFailure::StopAtFirst`](crate::BatchFailure::StopAtFirst), the
    /// events after a failed one that the source took back go back too, so
    /// that they stay after it. The source delivers it again as it is, with
    /// the same attempt, where it can (a log releases its lease; a broker's
    /// `nak` may count a delivery regardless).
    fn release(self) -> impl Future<Output = ()> + Send;
}

/// How a source carries a retry: see [`Delivery::retry`].
#[derive(Debug)]
pub enum Retry<D> {
    /// The runner keeps the delivery: it waits the delay and attempts it
    /// again with this delivery, whose [`attempt`](Delivery::attempt) is now
    /// one higher.
    InPlace(D),
    /// The source took the delivery back and will yield it again, no sooner
    /// than the delay, with its attempt one higher.
    Redelivered,
}

/// How an [`Undecodable`] is terminated, given the reason.
type Terminate = Box<dyn FnOnce(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// An event a source could not decode into the listener's event type: a
/// payload stored by an older or newer version of the application, or
/// corrupted. The runner records it as an [`UndecodableLetter`] in its sink
/// and terminates it through the callback its source gave.
pub struct Undecodable {
    name: Option<String>,
    id: Option<Uuid>,
    error: String,
    payload: Vec<u8>,
    attempt: u32,
    terminate: Terminate,
}

impl Undecodable {
    /// The event whose `payload` failed to decode with `error`; `terminate`
    /// is called with the reason once the dead letter is recorded, so that
    /// the source never delivers it again (a broker's `term`, a log's dead
    /// mark).
    pub fn new<F, Fut>(error: impl fmt::Display, payload: Vec<u8>, terminate: F) -> Self
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            name: None,
            id: None,
            error: error.to_string(),
            payload,
            attempt: 1,
            terminate: Box::new(move |reason| Box::pin(terminate(reason))),
        }
    }

    /// The event's name, when the source could read it.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The event's id, when the source could read it.
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }

    /// Which delivery of the bytes this is (1 by default).
    #[must_use]
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }
}

impl fmt::Debug for Undecodable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Undecodable")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("error", &self.error)
            .field("payload", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// What [`run`] spawns: a [`Listener`], or a [`BatchListener`].
///
/// Implemented for both; `M` tells the two impls apart and is inferred, so
/// `bus.spawn(indexer)` works for either. A type that implements both
/// traits (by hand: `#[listener]` makes a type one or the other) says which
/// it is spawned as by naming the marker:
/// `bus.spawn_with::<_, InBatches>(listener, options)`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is neither a `Listener<{E}>` nor a `BatchListener<{E}>`",
    label = "not a listener of this bus's events",
    note = "implement `Listener<{E}>`, or mark an `impl` of the derive's handler trait with `#[listener]`"
)]
pub trait Spawnable<E: Event, M>: Send + Sync + 'static {
    /// The listener's name.
    #[doc(hidden)]
    fn listener_name(&self) -> &str;

    /// The listener's interests.
    #[doc(hidden)]
    fn listener_interests(&self) -> KindSet<E::Kind>;

    /// Whether it is handed batches: a tier bounds what it has out at once
    /// by `concurrency`, times `max_batch` for a batch listener.
    #[doc(hidden)]
    fn listener_batches(&self) -> bool {
        false
    }

    /// Runs the listener over `run`'s source until it ends or is stopped.
    #[doc(hidden)]
    fn run<S: Source<E>, K: DeadLetterSink<E>>(
        self,
        run: Run<S, K>,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// [`Spawnable`]'s marker for a [`Listener`]: name it to spawn a type that
/// implements both traits as a `Listener`.
#[derive(Debug)]
pub enum OneByOne {}

/// [`Spawnable`]'s marker for a [`BatchListener`]: name it to spawn a type
/// that implements both traits as a `BatchListener`.
#[derive(Debug)]
pub enum InBatches {}

/// What a listener runs with: its counters, source, dead-letter sink and
/// options.
#[doc(hidden)]
pub struct Run<S, K> {
    pub(crate) core: Arc<ListenerCore>,
    pub(crate) source: S,
    pub(crate) sink: K,
    pub(crate) options: ListenerOptions,
}

impl<S, K> Run<S, K> {
    /// The supervisor of `listener`, and what it runs over.
    fn supervise<L>(self, listener: L) -> (Supervisor<L, K>, S, ListenerOptions) {
        let supervisor = Supervisor {
            core: self.core,
            listener,
            sink: self.sink,
        };
        (supervisor, self.source, self.options)
    }
}

impl<S, K> fmt::Debug for Run<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("listener", &self.core.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<E: Event, L: Listener<E>> Spawnable<E, OneByOne> for L {
    fn listener_name(&self) -> &str {
        self.name()
    }

    fn listener_interests(&self) -> KindSet<E::Kind> {
        self.interests()
    }

    fn run<S: Source<E>, K: DeadLetterSink<E>>(
        self,
        run: Run<S, K>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (supervisor, source, options) = run.supervise(self);
        supervisor.run(source, options.concurrency)
    }
}

impl<E: Event, L: BatchListener<E>> Spawnable<E, InBatches> for L {
    fn listener_name(&self) -> &str {
        self.name()
    }

    fn listener_interests(&self) -> KindSet<E::Kind> {
        self.interests()
    }

    fn listener_batches(&self) -> bool {
        true
    }

    fn run<S: Source<E>, K: DeadLetterSink<E>>(
        self,
        run: Run<S, K>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (supervisor, source, options) = run.supervise(self);
        supervisor.run_batches(source, options)
    }
}

/// Runs `listener` over `source` with `options` until the source ends,
/// recording dead letters in `sink`, and reports what it did.
///
/// This is how a tier of one's own runs listeners: the same supervision,
/// retries, dead letters, batching and concurrency as on the bus. Only the
/// options that shape how a listener runs apply (retry, concurrency,
/// batching); those of the memory tier's queue do not. Dropping the future
/// (or aborting the task it runs on) stops the listener at its next await:
/// the deliveries it holds are dropped unfinished. A source that must not
/// hand out anything once its tier stops the listener checks that itself,
/// as the memory tier's does.
///
/// A source may end (`Ready(None)`) while deliveries it yielded are still
/// with the runner: what the runner then hands back to it
/// ([`Retry::Redelivered`], [`Delivery::release`]) it is polled for again,
/// and the run ends once the source has ended with nothing handed back
/// since.
///
/// # Examples
///
/// ```
/// use std::collections::VecDeque;
/// use std::sync::{Arc, Mutex};
/// use std::task::{Context, Poll};
/// use std::time::Duration;
/// use event_bus::runner::{self, DeadLetterSink, Delivery, Retry, Source, Undecodable, UndecodableLetter};
/// use event_bus::{DeadLetter, DomainEvent, Envelope, HandlerError, ListenerOptions, Meta, listener};
///
/// #[derive(Debug, DomainEvent)]
/// enum Shop {
///     OrderPaid(u64),
/// }
///
/// // A source over a list of events, as a log would be, read to its end.
/// struct Log(VecDeque<Arc<Envelope<Shop>>>);
///
/// struct Entry(Arc<Envelope<Shop>>, u32);
///
/// impl Delivery<Shop> for Entry {
///     fn envelope(&self) -> &Arc<Envelope<Shop>> { &self.0 }
///     fn attempt(&self) -> u32 { self.1 }
///     async fn ack(self) {}
///     async fn retry(self, _delay: Duration, _error: &str) -> Retry<Self> { Retry::InPlace(Entry(self.0, self.1 + 1)) }
///     async fn terminate(self, _reason: &str) {}
///     async fn release(self) {}
/// }
///
/// impl Source<Shop> for Log {
///     type Delivery = Entry;
///     fn poll_next(&mut self, _: &mut Context<'_>) -> Poll<Option<Result<Entry, Undecodable>>> {
///         Poll::Ready(self.0.pop_front().map(|envelope| Ok(Entry(envelope, 1))))
///     }
/// }
///
/// #[derive(Default)]
/// struct Letters(Mutex<Vec<String>>);
///
/// impl DeadLetterSink<Shop> for Letters {
///     async fn record(&self, letter: DeadLetter<Shop>) {
///         self.0.lock().unwrap().push(letter.error);
///     }
///     async fn record_undecodable(&self, letter: UndecodableLetter) {
///         self.0.lock().unwrap().push(letter.error);
///     }
/// }
///
/// struct Receipts;
///
/// #[listener]
/// impl ShopHandler for Receipts {
///     async fn on_order_paid(&self, order: &u64) -> Result<(), HandlerError> {
///         if *order == 13 { return Err("printer jammed".into()) }
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let log = Log([1, 13, 2].map(|order| Arc::new(Envelope::new(Shop::OrderPaid(order)))).into());
/// let letters = Arc::new(Letters::default());
/// let report = runner::run(Receipts, log, letters.clone(), ListenerOptions::new()).await;
/// assert_eq!((report.handled, report.dead_lettered), (2, 1));
/// assert_eq!(*letters.0.lock().unwrap(), ["printer jammed"]);
/// # }
/// ```
pub async fn run<E, M, L, S, K>(
    listener: L,
    source: S,
    sink: K,
    options: ListenerOptions,
) -> RunReport
where
    E: Event,
    L: Spawnable<E, M>,
    S: Source<E>,
    K: DeadLetterSink<E>,
{
    let core = Arc::new(ListenerCore::new(
        listener.listener_name().into(),
        options.retry,
    ));
    listener
        .run(Run {
            core: core.clone(),
            source,
            sink,
            options,
        })
        .await;
    RunReport::of(&core)
}

impl RunReport {
    /// What the run of `core` did so far.
    pub(crate) fn of(core: &ListenerCore) -> Self {
        let counts = core.counts();
        Self {
            name: core.name.to_string(),
            handled: counts.handled,
            failed: counts.retried + counts.dead_lettered,
            retried: counts.retried,
            dead_lettered: counts.dead_lettered,
            panicked: counts.panicked,
            status: core.outcome(),
        }
    }
}

/// What [`run`] did, once its source ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// The listener's name.
    pub name: String,
    /// Events handled successfully.
    pub handled: u64,
    /// Failed attempts: `retried + dead_lettered`.
    pub failed: u64,
    /// Failed attempts that were tried again.
    pub retried: u64,
    /// Events recorded as dead letters, undecodable ones included.
    pub dead_lettered: u64,
    /// Failed attempts that panicked.
    pub panicked: u64,
    /// How the run ended.
    pub status: ListenerStatus,
}
