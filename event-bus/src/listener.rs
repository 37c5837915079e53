//! The [`Listener`] trait and the options a listener runs with.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::envelope::Envelope;
use crate::error::HandlerError;
use crate::event::{Event, KindSet};
use crate::meta::Meta;

/// A background consumer of events, run and supervised by the bus.
///
/// Spawn one with [`EventBus::spawn`](crate::EventBus::spawn). Each listener
/// gets its own queue and its own task; its errors, panics and slowness never
/// reach the emitter or another listener.
///
/// Implement `handle` with `async fn`. Return an error with `?` from any
/// error type: the runtime logs it, counts it, retries per the listener's
/// [`RetryPolicy`] and records a [`DeadLetter`](crate::DeadLetter) after the
/// last attempt.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use event_bus::{Envelope, Event, EventKind, HandlerError, KindSet, Listener};
/// # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
/// # enum AppEventKind { UserCreated, PostPublished }
/// # impl EventKind for AppEventKind {
/// #     const ALL: &'static [Self] = &[Self::UserCreated, Self::PostPublished];
/// #     fn index(self) -> usize { self as usize }
/// #     fn name(self) -> &'static str { "x" }
/// # }
/// # #[derive(Debug)]
/// # enum AppEvent { UserCreated(u64), PostPublished(u64) }
/// # impl Event for AppEvent {
/// #     type Kind = AppEventKind;
/// #     fn kind(&self) -> AppEventKind { match self {
/// #         Self::UserCreated(_) => AppEventKind::UserCreated,
/// #         Self::PostPublished(_) => AppEventKind::PostPublished } }
/// # }
///
/// struct WelcomeMailer;
///
/// impl Listener<AppEvent> for WelcomeMailer {
///     fn name(&self) -> &str {
///         "welcome-mailer"
///     }
///
///     fn interests(&self) -> KindSet<AppEventKind> {
///         KindSet::from(AppEventKind::UserCreated)
///     }
///
///     async fn handle(&self, event: Arc<Envelope<AppEvent>>, _: event_bus::Meta) -> Result<(), HandlerError> {
///         if let AppEvent::UserCreated(id) = **event {
///             println!("welcome, user {id}");
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Listener<E: Event>: Send + Sync + 'static {
    /// The name the listener has in logs, metrics, dead letters and reports.
    ///
    /// Defaults to the implementing type's name.
    fn name(&self) -> &str {
        type_name::<Self>()
    }

    /// The kinds the listener receives. It is never woken for others.
    ///
    /// Read once, at spawn. Defaults to every kind.
    fn interests(&self) -> KindSet<E::Kind> {
        KindSet::all()
    }

    /// Handles one event; `meta` says which attempt this is.
    ///
    /// With the default concurrency of 1, calls are sequential and in emit
    /// order. A retried event is handled again with the same envelope, and
    /// a [`Meta::attempt`] one higher.
    fn handle(
        &self,
        event: Arc<Envelope<E>>,
        meta: Meta,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// The last segment of `T`'s path, without generic arguments: a listener's
/// default name.
pub(crate) fn type_name<T: ?Sized>() -> &'static str {
    let path = std::any::type_name::<T>();
    let path = path.split('<').next().unwrap_or(path);
    path.rsplit("::").next().unwrap_or(path)
}

/// How a listener runs: its queue, its concurrency and its retries.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use event_bus::{LagPolicy, ListenerOptions, RetryPolicy};
///
/// let options = ListenerOptions::new()
///     .capacity(4096)
///     .lag_policy(LagPolicy::Backpressure)
///     .concurrency(4)
///     .retry(RetryPolicy::exponential(5).initial_backoff(Duration::from_millis(50)));
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    pub(crate) capacity: Option<usize>,
    pub(crate) lag_policy: LagPolicy,
    pub(crate) fairness: Option<usize>,
    pub(crate) retry: RetryPolicy,
    pub(crate) concurrency: usize,
    pub(crate) max_batch: usize,
    pub(crate) max_wait: Duration,
    pub(crate) batch_failure: BatchFailure,
    pub(crate) scope: Scope,
}

impl ListenerOptions {
    /// The defaults: the bus's queue capacity and fairness bound,
    /// [`LagPolicy::DropOldest`], no retries, concurrency 1, and for a
    /// [`BatchListener`](crate::BatchListener) batches of up to [`DEFAULT_MAX_BATCH`] events that do
    /// not wait for more, whose failed events are retried
    /// [independently](BatchFailure::Independent).
    pub fn new() -> Self {
        Self {
            capacity: None,
            lag_policy: LagPolicy::default(),
            fairness: None,
            retry: RetryPolicy::none(),
            concurrency: 1,
            max_batch: DEFAULT_MAX_BATCH,
            max_wait: Duration::ZERO,
            batch_failure: BatchFailure::Independent,
            scope: Scope::Group,
        }
    }

    /// The capacity of each of the listener's queue lanes (events). Defaults
    /// to the bus's [capacity](crate::Builder::capacity); 0 is raised to 1.
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity.max(1));
        self
    }

    /// What happens when the listener's queue is full.
    #[must_use]
    pub fn lag_policy(mut self, policy: LagPolicy) -> Self {
        self.lag_policy = policy;
        self
    }

    /// The listener's fairness bound: while a lane of its queue has events
    /// waiting, at most this many events of higher priority are handed out
    /// before the lane's oldest.
    /// Defaults to the bus's [fairness](crate::Builder::fairness); 0 is
    /// raised to 1.
    #[must_use]
    pub fn fairness(mut self, bound: usize) -> Self {
        self.fairness = Some(bound.max(1));
        self
    }

    /// How failed events are retried before they become dead letters.
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How many handler calls (events, or batches for a [`BatchListener`](crate::BatchListener))
    /// the listener runs at once; 0 is raised to 1.
    ///
    /// With 1 (the default) they run one at a time in the order the queue
    /// hands events out. Above 1, up to that many run concurrently on the
    /// listener's task, and they may finish in any order.
    #[must_use]
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The most events in one batch of a [`BatchListener`](crate::BatchListener). Default
    /// [`DEFAULT_MAX_BATCH`]; 0 is raised to 1. Ignored by a [`Listener`].
    #[must_use]
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    /// How long a [`BatchListener`](crate::BatchListener)'s batch waits for more events after its
    /// first, unless it fills up or takes a high-priority event first.
    /// Default zero: a batch is what is queued when the listener is free, so
    /// batching adds no latency and batches grow only under load. Ignored by
    /// a [`Listener`].
    ///
    /// [`Duration::MAX`] (or any wait too long for the clock to represent)
    /// means "until full": a batch then goes when it holds
    /// [`max_batch`](Self::max_batch) events, when it takes a high-priority
    /// event, or when the bus closes, and never on a timer.
    #[must_use]
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// How a [`BatchListener`](crate::BatchListener)'s partly failed batch
    /// is retried. Ignored by a [`Listener`].
    ///
    /// - [`BatchFailure::Independent`] (the default): the events the handler
    ///   did not name are handled, and the failed ones are retried together,
    ///   in their batch order, after the events that followed them were
    ///   handled.
    /// - [`BatchFailure::StopAtFirst`]: the events before the first failed
    ///   one are handled, and that event and every event after it are
    ///   retried, in order; after its last attempt the first failed event
    ///   becomes a dead letter and the events after it go on as a new batch.
    ///   With concurrency 1, events are handled in the order they were
    ///   delivered, failures and retries included.
    ///
    /// Either way, every delivered event ends handled or dead-lettered,
    /// once, and `failed == retried + dead_lettered`.
    #[must_use]
    pub fn batch_failure(mut self, mode: BatchFailure) -> Self {
        self.batch_failure = mode;
        self
    }

    /// Whether the listener handles each event once across all the
    /// processes that run it ([`Scope::Group`], the default) or once in
    /// every process ([`Scope::Instance`]). The memory tier treats both
    /// alike: it has one process.
    #[must_use]
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// The [concurrency](Self::concurrency): for a tier's source, how many
    /// unfinished deliveries (batches, for a batch listener) it may have out
    /// at once.
    pub fn get_concurrency(&self) -> usize {
        self.concurrency
    }

    /// The [`max_batch`](Self::max_batch).
    pub fn get_max_batch(&self) -> usize {
        self.max_batch
    }

    /// The [retry policy](Self::retry).
    pub fn get_retry(&self) -> RetryPolicy {
        self.retry
    }

    /// The [scope](Self::scope).
    pub fn get_scope(&self) -> Scope {
        self.scope
    }
}

/// Who handles an event when a listener runs in several processes.
///
/// A listener has a name; the processes that spawn a listener of that name
/// run instances of it. Its scope says how they share the events:
///
/// | | memory | durable (SQL log) | distributed (NATS JetStream) |
/// |---|---|---|---|
/// | [`Group`](Scope::Group) | the one process handles every event | one checkpoint per listener name; instances lease positions, so each event is handled by one of them | one durable consumer per listener name, pulled by every instance: each event goes to one |
/// | [`Instance`](Scope::Instance) | the same | one checkpoint per listener name and process, so every process handles every event | one consumer per process (ordered, or durable with the process's id), so every process sees every event |
///
/// A mailer, a payment capture, a projection into a shared database are
/// group listeners: their effect must happen once. A local cache, a local
/// search index, a websocket fan-out are instance listeners: each process
/// keeps its own copy of the state they update.
///
/// # Examples
///
/// ```
/// use event_bus::{DomainEvent, EventBus, HandlerError, ListenerOptions, Scope, listener};
///
/// #[derive(Debug, DomainEvent)]
/// enum Catalog {
///     PostUpdated(u64),
/// }
///
/// // Every process keeps its own cache: each must see every update.
/// struct PageCache;
///
/// #[listener]
/// impl CatalogHandler for PageCache {
///     async fn on_post_updated(&self, id: &u64) -> Result<(), HandlerError> {
///         println!("evict post {id}");
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let bus = EventBus::<Catalog>::new();
/// bus.spawn_with(PageCache, ListenerOptions::new().scope(Scope::Instance));
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Scope {
    /// Each event is handled once by one of the listener's instances,
    /// whichever process it runs in. The default.
    #[default]
    Group,
    /// Each event is handled once in every process that runs the listener.
    Instance,
}

/// The default [`ListenerOptions::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 256;

impl Default for ListenerOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// How a failed handler is retried.
///
/// The delay before retry `n` (1-based) is `initial_backoff * 2^(n-1)`,
/// capped at `max_backoff`; with jitter (the default) it is a random value
/// between half that delay and all of it, so retries of many events spread
/// out instead of arriving together.
///
/// A listener with concurrency 1 waits out the backoff before its next
/// event, which keeps its events in order; raise the concurrency to let
/// other events pass a retrying one.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use event_bus::RetryPolicy;
///
/// // 1 attempt and 3 retries, 100ms, 200ms and 400ms apart, without jitter.
/// let policy = RetryPolicy::exponential(4)
///     .initial_backoff(Duration::from_millis(100))
///     .jitter(false);
/// assert_eq!(policy.backoff(3), Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    jitter: bool,
}

impl RetryPolicy {
    /// One attempt, no retry: a failed event becomes a dead letter at once.
    /// The default.
    pub fn none() -> Self {
        Self::exponential(1)
    }

    /// Up to `max_attempts` attempts in all (0 is raised to 1), with
    /// exponential backoff from 100ms up to 30s, jittered.
    pub fn exponential(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            jitter: true,
        }
    }

    /// The delay before the first retry.
    #[must_use]
    pub fn initial_backoff(mut self, delay: Duration) -> Self {
        self.initial_backoff = delay;
        self
    }

    /// The longest delay between two attempts.
    #[must_use]
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.max_backoff = delay;
        self
    }

    /// Whether delays are randomised (between half and all of the nominal
    /// delay).
    #[must_use]
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The number of attempts, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The nominal delay before retry `retry` (1-based), without jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1 << exponent)
            .min(self.max_backoff)
    }

    /// The delay actually waited before retry `retry`: [`backoff`] with
    /// jitter applied.
    ///
    /// [`backoff`]: RetryPolicy::backoff
    pub(crate) fn delay(&self, retry: u32) -> Duration {
        let nominal = self.backoff(retry);
        if !self.jitter {
            return nominal;
        }
        let half = nominal / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::none()
    }
}

/// What a subscription's queue does when an event arrives and it is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum LagPolicy {
    /// Drop the oldest queued event to make room, count it, and report the
    /// gap to the consumer as [`RecvError::Lagged`](crate::RecvError::Lagged) before the next event.
    ///
    /// The emitter never waits. The default: a slow consumer loses its oldest
    /// events, never the newest, and never silently.
    #[default]
    DropOldest,
    /// Never drop to make room for what
    /// [`EventBus::emit_wait`](crate::EventBus::emit_wait) queues: it waits
    /// until the lane has room, and never takes it past its capacity.
    ///
    /// [`EventBus::emit`](crate::EventBus::emit), which must not block,
    /// queues past the capacity and counts the event as overflowed, up to a
    /// hard ceiling of [`OVERFLOW_FACTOR`] times the capacity; past that it
    /// drops the lane's oldest event as `DropOldest` does (counted as
    /// dropped, reported as [`RecvError::Lagged`](crate::RecvError::Lagged)), so memory stays bounded
    /// whatever the emitter does.
    Backpressure,
}

/// How many times its capacity a [`LagPolicy::Backpressure`] lane may queue
/// when plain [`emit`](crate::EventBus::emit) overflows it, before its
/// oldest queued events are dropped. (The batch its consumer has taken, at
/// most `min(32, capacity)` events, comes on top, as for every lane.)
pub const OVERFLOW_FACTOR: usize = 2;

impl LagPolicy {
    /// The most events a lane of `capacity` queues before it drops its
    /// oldest.
    pub(crate) fn ceiling(self, capacity: usize) -> usize {
        match self {
            LagPolicy::DropOldest => capacity,
            LagPolicy::Backpressure => capacity.saturating_mul(OVERFLOW_FACTOR),
        }
    }
}

/// How a [`BatchListener`](crate::BatchListener)'s partly failed batch is retried: which events
/// count as handled, and which go again. Set with
/// [`ListenerOptions::batch_failure`](crate::ListenerOptions::batch_failure).
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
