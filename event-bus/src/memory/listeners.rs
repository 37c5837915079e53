//! The listeners of one bus: what each listener's task, its handle and the
//! bus share, the list `quiesce` and `shutdown` go through, and the reports
//! made of them.

use std::fmt;
use std::sync::{Arc, OnceLock};

use tokio::task::AbortHandle;

use super::dead_letters::Store;
use super::queue::{Queue, QueueCounts};
use crate::event::Event;
use crate::listener::RetryPolicy;
use crate::metrics::{ListenerMetrics, ListenerStatus};
use crate::runner::{ListenerCore, ListenerCounts as RunnerCounts};
use crate::sync::{
    AtomicU8, AtomicU64, AtomicUsize, Mutex, Notify, Ordering, dekker_fence, lock, wait_until,
};

/// The listeners of one bus, and what `quiesce` waits on.
pub(crate) struct Runtime<E: Event> {
    listeners: Mutex<Listed<E>>,
    /// Events left undelivered by listeners that left the list.
    pub(crate) abandoned: AtomicU64,
    pub(crate) idle: Notify,
    pub(crate) quiesce_waiters: AtomicUsize,
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
    pub(crate) fn abandoned(&self) -> u64 {
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
    pub(crate) fn begin_shutdown(&self) -> (Vec<Arc<ListenerState<E>>>, u64) {
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

    pub(crate) fn all_idle(&self) -> bool {
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
    pub(crate) fn ended(
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
    pub(crate) queue: Arc<Queue<E>>,
    pub(crate) status: AtomicU8,
    pub(crate) done: Notify,
    pub(crate) abort: OnceLock<AbortHandle>,
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

    pub(crate) fn status(&self) -> ListenerStatus {
        ListenerStatus::from_u8(self.status.load(Ordering::SeqCst))
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.status() != ListenerStatus::Running
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.core.is_cancelled()
    }

    pub(crate) async fn wait_finished(&self) {
        wait_until(&self.done, || self.is_finished()).await;
    }

    /// Stops the listener: no event is started after this, and the task is
    /// dropped at its next await.
    pub(crate) fn abort(&self) {
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

    pub(crate) fn metrics(&self) -> ListenerMetrics {
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

    pub(crate) fn report(&self) -> ListenerReport {
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
    pub(crate) state: Arc<ListenerState<E>>,
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
    /// that blocked its thread past the deadline and [`ABORT_GRACE`](crate::ABORT_GRACE)).
    pub status: ListenerStatus,
}
