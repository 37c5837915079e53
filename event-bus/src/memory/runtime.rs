//! The listener runtime: one supervised task per listener, quiescence and
//! draining shutdown.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::AbortHandle;

use super::bus::Shared;
use super::dead_letters::Store;
use super::queue::{Queue, QueueCounts};
use super::source::MemorySource;
use crate::event::Event;
use crate::listener::{ListenerOptions, RetryPolicy};
use crate::metrics::ListenerMetrics;
use crate::metrics::ListenerStatus;
use crate::runner::{ListenerCore, ListenerCounts as RunnerCounts, Run, Spawnable, panicked};
use crate::sync::{
    AtomicU8, AtomicU64, AtomicUsize, Mutex, Notify, Ordering, dekker_fence, lock, wait_until,
};

/// How long [`EventBus::shutdown`](crate::EventBus::shutdown) waits, past
/// its deadline, for the listeners it stopped to end: a handler that blocks
/// its thread cannot be stopped before it returns.
pub const ABORT_GRACE: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// On a listener's task: the address of its bus's `Shared`, so that an
    /// emit can tell whether it comes from one of the bus's listeners (which
    /// may still emit while the bus drains).
    static LISTENER_OF: usize;
}

/// Whether the current task is a listener of `shared`'s bus.
pub(crate) fn in_listener_of<E: Event>(shared: &Shared<E>) -> bool {
    let bus = shared as *const Shared<E> as usize;
    LISTENER_OF.try_with(|of| *of == bus).unwrap_or(false)
}

/// The listeners of one bus, and what `quiesce` waits on.
pub(crate) struct Runtime<E: Event> {
    listeners: Mutex<Listed<E>>,
    /// Events left undelivered by listeners that left the list.
    abandoned: AtomicU64,
    idle: Notify,
    quiesce_waiters: AtomicUsize,
}

struct Listed<E: Event> {
    /// Running listeners, crashed ones, and those that ended once the bus
    /// closed, in spawn order. One stopped while the bus is open leaves the
    /// list, so that spawning and aborting in a loop cannot grow it.
    listeners: Vec<Arc<ListenerState<E>>>,
    /// Set when shutdown begins: from then on no listener leaves the list,
    /// so that the report covers every one of them once.
    keep: bool,
    bus_closed: bool,
}

impl<E: Event> Runtime<E> {
    pub(crate) fn new() -> Self {
        Self {
            listeners: Mutex::new(Listed {
                listeners: Vec::new(),
                keep: false,
                bus_closed: false,
            }),
            abandoned: AtomicU64::new(0),
            idle: Notify::new(),
            quiesce_waiters: AtomicUsize::new(0),
        }
    }

    /// Events left undelivered by listeners aborted while the bus was open,
    /// which are no longer listed. Written under the listeners' lock.
    fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// The listed listeners and what those that left the list abandoned,
    /// read together.
    pub(crate) fn listed(&self) -> (Vec<Arc<ListenerState<E>>>, u64) {
        let listed = lock(&self.listeners);
        (listed.listeners.clone(), self.abandoned())
    }

    /// Shutdown begins: the listeners to report, and what those that left
    /// the list abandoned; from now on none leaves it.
    fn begin_shutdown(&self) -> (Vec<Arc<ListenerState<E>>>, u64) {
        lock(&self.listeners).keep = true;
        self.listed()
    }

    pub(crate) fn listeners(&self) -> Vec<Arc<ListenerState<E>>> {
        lock(&self.listeners).listeners.clone()
    }

    /// Lists a new listener, unless the bus has closed: one spawned then
    /// never receives an event, and listing it would let the list grow.
    pub(crate) fn add(&self, listener: &Arc<ListenerState<E>>) {
        let mut listed = lock(&self.listeners);
        if !listed.bus_closed {
            listed.listeners.push(listener.clone());
        }
    }

    fn all_idle(&self) -> bool {
        lock(&self.listeners)
            .listeners
            .iter()
            .all(|l| l.is_finished() || l.queue.is_idle())
    }

    /// Wakes `quiesce` callers to check again; free when none waits.
    pub(crate) fn notify_idle(&self) {
        dekker_fence();
        if self.quiesce_waiters.load(Ordering::SeqCst) > 0 {
            self.idle.notify_waiters();
        }
    }

    /// The bus closed: once every listener has finished, no dead letter can
    /// come any more.
    pub(crate) fn closed(&self, dead_letters: &Store<E>) {
        let done = {
            let mut listed = lock(&self.listeners);
            listed.bus_closed = true;
            listed.listeners.iter().all(|l| l.is_finished())
        };
        if done {
            dead_letters.close();
        }
    }

    /// `listener`'s task is ending as `status`, which is not published yet:
    /// it leaves the list if it was stopped while the bus is open (a crashed
    /// one stays, so that the crash shows), with what it left undelivered
    /// counted; then its status is published, and the dead letters close if
    /// it was the last one of a closed bus. Leaving the list first means that
    /// whoever sees it finished no longer sees it listed.
    fn ended(
        &self,
        listener: &Arc<ListenerState<E>>,
        status: ListenerStatus,
        dead_letters: &Store<E>,
    ) {
        let done = {
            let mut listed = lock(&self.listeners);
            if !listed.keep && !listed.bus_closed && status == ListenerStatus::Aborted {
                listed.listeners.retain(|l| !Arc::ptr_eq(l, listener));
                // Its counts are final: its task is ending.
                let left = listener.report().undelivered;
                self.abandoned.fetch_add(left, Ordering::Relaxed);
            }
            listener.status.store(status.as_u8(), Ordering::SeqCst);
            listed.bus_closed && listed.listeners.iter().all(|l| l.is_finished())
        };
        if done {
            dead_letters.close();
        }
    }
}

/// What a listener's task, its handle and the bus share: what the runner
/// records of it, and its queue.
pub(crate) struct ListenerState<E: Event> {
    pub(crate) core: Arc<ListenerCore>,
    queue: Arc<Queue<E>>,
    status: AtomicU8,
    done: Notify,
    abort: OnceLock<AbortHandle>,
}

/// A listener's counters read together; see [`ListenerState::counts`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListenerCounts {
    status: ListenerStatus,
    runner: RunnerCounts,
    queue: QueueCounts,
}

impl<E: Event> ListenerState<E> {
    pub(crate) fn new(queue: Arc<Queue<E>>, retry: RetryPolicy) -> Self {
        Self {
            core: Arc::new(ListenerCore::new(queue.name.clone(), retry)),
            queue,
            status: AtomicU8::new(ListenerStatus::Running.as_u8()),
            done: Notify::new(),
            abort: OnceLock::new(),
        }
    }

    fn status(&self) -> ListenerStatus {
        ListenerStatus::from_u8(self.status.load(Ordering::SeqCst))
    }

    fn is_finished(&self) -> bool {
        self.status() != ListenerStatus::Running
    }

    fn is_cancelled(&self) -> bool {
        self.core.is_cancelled()
    }

    async fn wait_finished(&self) {
        wait_until(&self.done, || self.is_finished()).await;
    }

    /// Stops the listener: no event is started after this, and the task is
    /// dropped at its next await.
    fn abort(&self) {
        self.core.cancel();
        if let Some(abort) = self.abort.get() {
            abort.abort();
        }
    }

    /// The counters, read so that the identities of [`ListenerMetrics`]
    /// hold: the runner's outcomes first, then the queue's counts, whose
    /// `delivered` is written before any outcome of the events it counts
    /// (the task hands an event out, then handles it; release stores,
    /// acquire loads), so no outcome is seen without its delivery.
    /// The status is read first: a listener ends only after its last
    /// count, so an ended status comes with its final counts.
    pub(crate) fn counts(&self) -> ListenerCounts {
        let status = self.status();
        let runner = self.core.counts();
        ListenerCounts {
            status,
            runner,
            queue: self.queue.counts(),
        }
    }

    fn metrics(&self) -> ListenerMetrics {
        self.metrics_from(self.counts())
    }

    pub(crate) fn metrics_from(&self, counts: ListenerCounts) -> ListenerMetrics {
        let delivered = counts.queue.delivered();
        let runner = counts.runner;
        let finished = runner.handled + runner.dead_lettered;
        ListenerMetrics {
            name: self.queue.name.to_string(),
            delivered,
            handled: runner.handled,
            // Every failed attempt was retried or became a dead letter, in
            // the same step: counting those two counts the failures.
            failed: runner.retried + runner.dead_lettered,
            retried: runner.retried,
            dead_lettered: runner.dead_lettered,
            panicked: runner.panicked,
            dropped: counts.queue.dropped(),
            overflowed: counts.queue.overflowed(),
            queue_depth: counts.queue.depth(),
            in_flight: usize::try_from(delivered.saturating_sub(finished)).unwrap_or(usize::MAX),
            lanes: counts.queue.lane_metrics(),
            queue_latency: self.core.queue_latency(),
            handle_latency: self.core.handle_latency(),
            finished: counts.status != ListenerStatus::Running,
            status: counts.status,
        }
    }

    fn report(&self) -> ListenerReport {
        let metrics = self.metrics();
        let status = metrics.status;
        let undelivered = (metrics.queue_depth + metrics.in_flight) as u64;
        ListenerReport {
            undelivered,
            name: metrics.name,
            handled: metrics.handled,
            failed: metrics.failed,
            dead_lettered: metrics.dead_lettered,
            dropped: metrics.dropped,
            drained: status == ListenerStatus::Drained && undelivered == 0,
            status,
        }
    }
}

/// A handle to a spawned listener.
///
/// Dropping it does not stop the listener; the bus owns it.
pub struct ListenerHandle<E: Event> {
    state: Arc<ListenerState<E>>,
}

impl<E: Event> ListenerHandle<E> {
    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.state.queue.name
    }

    /// A snapshot of the listener's counters, consistent as
    /// [`EventBus::metrics`](crate::EventBus::metrics)'s is.
    pub fn metrics(&self) -> ListenerMetrics {
        self.state.metrics()
    }

    /// Where the listener's task stands.
    pub fn status(&self) -> ListenerStatus {
        self.state.status()
    }

    /// Whether the listener's task has ended.
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }

    /// Waits until the listener's task has ended: after the bus closed and
    /// the listener drained its queue, or after [`abort`](Self::abort). From
    /// then on its metrics are final.
    pub async fn finished(&self) {
        self.state.wait_finished().await;
    }

    /// Stops the listener.
    ///
    /// It starts no event after this call, even one already queued or taken
    /// (the check is made between events, so a handler that never awaits
    /// cannot outrun it), and its task is dropped at its next await point: a
    /// handler in the middle of an event is cancelled there. One that
    /// finishes before that point still counts as handled. Events left
    /// unhandled show as `queue_depth` and `in_flight` in its metrics, which
    /// are final once [`finished`](Self::finished) returns; its status is
    /// then [`ListenerStatus::Aborted`].
    pub fn abort(&self) {
        self.state.abort();
    }
}

impl<E: Event> Clone for ListenerHandle<E> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
        }
    }
}

impl<E: Event> fmt::Debug for ListenerHandle<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerHandle")
            .field("name", &self.name())
            .field("status", &self.status())
            .finish()
    }
}

/// What [`EventBus::shutdown`](crate::EventBus::shutdown) did, per listener.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ShutdownReport {
    /// One report per listener, in spawn order.
    pub listeners: Vec<ListenerReport>,
    /// Events emitted after shutdown began, which reached nobody, counted by
    /// the time the report was made. (An `emit_wait` that the shutdown woke
    /// may count its refusal a moment later, in
    /// [`BusMetrics::rejected`](crate::BusMetrics).)
    pub rejected: u64,
    /// Events left undelivered by listeners aborted before shutdown began,
    /// while the bus was open: they are no longer listed (see
    /// [`BusMetrics::listeners`](crate::BusMetrics)), and are counted here.
    pub abandoned: u64,
}

impl ShutdownReport {
    /// Whether every listener finished its queue before the deadline, and
    /// none aborted earlier left events undelivered.
    pub fn drained(&self) -> bool {
        self.abandoned == 0 && self.listeners.iter().all(|l| l.drained)
    }

    /// Events left unhandled in listener queues or in flight, over all
    /// listeners, those aborted earlier included.
    pub fn undelivered(&self) -> u64 {
        self.abandoned + self.listeners.iter().map(|l| l.undelivered).sum::<u64>()
    }

    /// The report of the listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&ListenerReport> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

impl fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let drained = self.listeners.iter().filter(|l| l.drained).count();
        write!(
            f,
            "{drained} of {} listeners drained, {} events undelivered, {} rejected",
            self.listeners.len(),
            self.undelivered(),
            self.rejected
        )?;
        if self.abandoned > 0 {
            write!(
                f,
                " ({} left by listeners aborted before shutdown)",
                self.abandoned
            )?;
        }
        Ok(())
    }
}

/// One listener's part of a [`ShutdownReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ListenerReport {
    /// The listener's name.
    pub name: String,
    /// Events handled successfully over the listener's life.
    pub handled: u64,
    /// Failed handler attempts.
    pub failed: u64,
    /// Events recorded as dead letters.
    pub dead_lettered: u64,
    /// Events dropped from its full queue.
    pub dropped: u64,
    /// Events still queued or in flight when it was stopped.
    pub undelivered: u64,
    /// Whether it finished its queue: it ended by draining, with nothing
    /// undelivered.
    pub drained: bool,
    /// How its task ended (or [`ListenerStatus::Running`], for a handler
    /// that blocked its thread past the deadline and [`ABORT_GRACE`]).
    pub status: ListenerStatus,
}

pub(crate) fn spawn<E: Event, M, L: Spawnable<E, M>>(
    shared: &Arc<Shared<E>>,
    queue: Arc<Queue<E>>,
    listener: L,
    options: ListenerOptions,
) -> ListenerHandle<E> {
    let sink = shared.dead_letters.clone();
    spawn_task(shared, queue, options.retry, move |core, source| {
        listener.run(Run {
            core,
            source,
            sink,
            options,
        })
    })
}

/// Lists `listener`, routes its `queue` (made, not yet routed) and spawns
/// the task `run` makes of its supervisor over the queue's source.
///
/// The listener is listed before its queue is routed, so that a bus that
/// closes meanwhile does not close its dead letters before the listener is
/// known. The task runs in the bus's listener scope (its emits are accepted
/// while the bus drains) and catches a panic of the runtime's own code: the
/// listener is then logged and reported [`ListenerStatus::Crashed`], never
/// silently gone.
pub(crate) fn spawn_task<E: Event, F>(
    shared: &Arc<Shared<E>>,
    queue: Arc<Queue<E>>,
    retry: RetryPolicy,
    run: impl FnOnce(Arc<ListenerCore>, MemorySource<E>) -> F,
) -> ListenerHandle<E>
where
    F: Future<Output = ()> + Send + 'static,
{
    let state = Arc::new(ListenerState::new(queue, retry));
    shared.runtime.add(&state);
    shared.route(&state.queue);
    // The guard moves into the task's future, so it runs even when the task
    // is aborted before its first poll.
    let finished = FinishGuard {
        shared: shared.clone(),
        state: state.clone(),
    };
    let source = MemorySource::new(shared.clone(), state.queue.clone());
    let run = run(state.core.clone(), source);
    let task = async move {
        let finished = finished;
        if let Err(payload) = AssertUnwindSafe(run).catch_unwind().await {
            let error = panicked(&*payload);
            tracing::error!(
                listener = %finished.state.queue.name,
                error = %error,
                "the event bus's listener runtime panicked; the listener stopped (its unhandled events are reported undelivered)",
            );
            finished.state.core.end(ListenerStatus::Crashed);
        }
    };
    let bus = Arc::as_ptr(shared) as usize;
    let task = tokio::spawn(LISTENER_OF.scope(bus, task));
    // The task may already have ended; an abort handle to it is harmless.
    let _ = state.abort.set(task.abort_handle());
    if state.is_cancelled() {
        // Aborted before the handle was set.
        task.abort();
    }
    ListenerHandle { state }
}

/// Marks the listener finished however its task ends: drained, aborted,
/// crashed, or dropped with its runtime.
struct FinishGuard<E: Event> {
    shared: Arc<Shared<E>>,
    state: Arc<ListenerState<E>>,
}

impl<E: Event> Drop for FinishGuard<E> {
    fn drop(&mut self) {
        // Nobody will drain the queue any more: stop routing to it, so that
        // an aborted backpressure listener cannot hold `emit_wait` forever.
        // What it held stays counted as undelivered.
        self.shared.unregister(&self.state.queue);
        // Dropped here, on the listener's task, not by an emitter that may
        // hold the queue a moment longer; the counts keep what it left.
        drop(self.state.queue.discard());
        let runtime = &self.shared.runtime;
        runtime.ended(
            &self.state,
            self.state.core.outcome(),
            &self.shared.dead_letters,
        );
        self.state.done.notify_waiters();
        runtime.notify_idle();
    }
}

impl<E: Event> Shared<E> {
    /// Waits until every listener is idle at one moment.
    ///
    /// Numbering an emit and queueing it happen under the emit lock, and an
    /// emit queued for a listener moves `listener_sequence`: an unchanged
    /// value across the scan means no listener was handed new work while it
    /// was being checked, so a chain of listeners that emit to each other
    /// cannot slip past. When it did move, the listener it went to is busy,
    /// and its finishing wakes this (the wake-up is armed before the scan).
    pub(crate) async fn quiesce(&self) {
        let runtime = &self.runtime;
        runtime.quiesce_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = DecrementOnDrop(&runtime.quiesce_waiters);
        dekker_fence();
        loop {
            let notified = runtime.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let before = self.listener_sequence();
            if runtime.all_idle() {
                if self.listener_sequence() == before {
                    return;
                }
                // Work arrived during the scan: look again.
                continue;
            }
            notified.await;
        }
    }

    pub(crate) async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let until = tokio::time::Instant::now().checked_add(deadline);
        let (mut listeners, abandoned) = self.runtime.begin_shutdown();
        // Phase 1: only listeners may emit; wait until they are all idle.
        self.begin_draining();
        let _ = within(until, self.quiesce()).await;
        // Phase 2: close; the listeners end once their queues are empty.
        self.close();
        for listener in self.runtime.listeners() {
            if !listeners.iter().any(|l| Arc::ptr_eq(l, &listener)) {
                listeners.push(listener);
            }
        }
        let all_finished = async {
            for listener in &listeners {
                listener.wait_finished().await;
            }
        };
        if within(until, all_finished).await.is_none() {
            for listener in &listeners {
                if !listener.is_finished() {
                    listener.abort();
                }
            }
            // An aborted task ends at its next await; only a handler that
            // blocks its thread takes longer.
            let _ = tokio::time::timeout(ABORT_GRACE, async {
                for listener in &listeners {
                    listener.wait_finished().await;
                }
            })
            .await;
        }
        let report = ShutdownReport {
            listeners: listeners.iter().map(|listener| listener.report()).collect(),
            rejected: self.rejected(),
            abandoned,
        };
        if report.drained() {
            tracing::info!(%report, "event bus shut down");
        } else {
            tracing::warn!(%report, "event bus shut down before every listener drained");
        }
        report
    }
}

/// `future`'s output, unless `until` passes first; no deadline when `until`
/// is `None`.
async fn within<F: Future>(until: Option<tokio::time::Instant>, future: F) -> Option<F::Output> {
    match until {
        Some(until) => tokio::time::timeout_at(until, future).await.ok(),
        None => Some(future.await),
    }
}

struct DecrementOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::event::{EventKind, KindSet};
    use crate::memory::queue::QueueConfig;
    use crate::runner::Source;
    use crate::{EventBus, LagPolicy};

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    struct Kind;

    impl EventKind for Kind {
        const ALL: &'static [Self] = &[Kind];

        fn index(self) -> usize {
            0
        }

        fn name(self) -> &'static str {
            "tick"
        }
    }

    #[derive(Debug)]
    struct Tick;

    impl Event for Tick {
        type Kind = Kind;

        fn kind(&self) -> Kind {
            Kind
        }
    }

    /// The runtime's own code is not supposed to panic; if it does, the
    /// listener must end as crashed, stay listed, and be reported, with
    /// what it had not handled.
    #[tokio::test]
    async fn a_panic_in_the_runtime_ends_the_listener_as_crashed_and_reported() {
        let bus = EventBus::<Tick>::new();
        let shared = bus.shared().clone();
        let config = QueueConfig {
            capacity: 8,
            policy: LagPolicy::DropOldest,
            fairness: 1,
        };
        let queue = shared.make_queue(Some("broken".into()), KindSet::all(), config);
        let handle = spawn_task(
            &shared,
            queue,
            RetryPolicy::none(),
            |_, mut source| async move {
                let _ = std::future::poll_fn(|cx| source.poll_next(cx)).await;
                panic!("a bug in the runtime");
            },
        );
        bus.emit(Tick);
        bus.emit(Tick);
        tokio::time::timeout(Duration::from_secs(10), handle.finished())
            .await
            .expect("the crashed listener ends");

        assert_eq!(handle.status(), ListenerStatus::Crashed);
        let metrics = bus.metrics();
        let listed = metrics
            .listener("broken")
            .expect("a crashed listener stays listed");
        assert_eq!(listed.status, ListenerStatus::Crashed);
        assert_eq!(
            (listed.delivered, listed.in_flight, listed.queue_depth),
            (1, 1, 1)
        );
        // quiesce does not wait for it: it will never finish its events.
        tokio::time::timeout(Duration::from_secs(10), bus.quiesce())
            .await
            .expect("quiesce returns");

        let report = bus.shutdown(Duration::from_secs(1)).await;
        let broken = report.listener("broken").expect("reported");
        assert_eq!(broken.status, ListenerStatus::Crashed);
        assert!(!broken.drained);
        assert_eq!(broken.undelivered, 2);
    }
}
