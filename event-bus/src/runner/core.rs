//! What the runner records of one listener: its counters, its latencies,
//! its stop flag and how its run ended. The tier that spawned the listener
//! reads them into its metrics and reports.

use std::time::{Duration, Instant};

use crate::envelope::Envelope;
use crate::listener::RetryPolicy;
use crate::metrics::{Histogram, LatencySummary, ListenerExport, ListenerStatus};
use crate::sync::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::Arc;

/// What the runner writes of one listener, read by its tier. Only the
/// listener's task writes the counters and histograms.
pub(crate) struct ListenerCore {
    pub(crate) name: Arc<str>,
    pub(crate) retry: RetryPolicy,
    handled: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    panicked: AtomicU64,
    queue_latency: Histogram,
    handle_latency: Histogram,
    /// How the run ended, before the tier publishes it as the listener's
    /// status; `Running` until then.
    outcome: AtomicU8,
    /// Set by a stop: the task starts no event after it sees this.
    cancelled: AtomicBool,
    export: ListenerExport,
}

/// The runner's counters of one listener, read together; see
/// [`ListenerCore::counts`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListenerCounts {
    pub(crate) handled: u64,
    pub(crate) retried: u64,
    pub(crate) dead_lettered: u64,
    pub(crate) panicked: u64,
}

impl ListenerCore {
    pub(crate) fn new(name: Arc<str>, retry: RetryPolicy) -> Self {
        Self {
            export: ListenerExport::new(&name),
            name,
            retry,
            handled: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            queue_latency: Histogram::new(),
            handle_latency: Histogram::new(),
            outcome: AtomicU8::new(ListenerStatus::Running.as_u8()),
            cancelled: AtomicBool::new(false),
        }
    }

    /// The outcomes, read so that no outcome is seen without its delivery
    /// when the tier reads its delivery count after this (the task counts a
    /// delivery before its outcome: release stores, acquire loads).
    /// `panicked` is written after the outcome of its attempt and read
    /// before it.
    pub(crate) fn counts(&self) -> ListenerCounts {
        let panicked = self.panicked.load(Ordering::Acquire);
        let handled = self.handled.load(Ordering::Acquire);
        let retried = self.retried.load(Ordering::Acquire);
        let dead_lettered = self.dead_lettered.load(Ordering::Acquire);
        ListenerCounts {
            handled,
            retried,
            dead_lettered,
            panicked,
        }
    }

    pub(crate) fn queue_latency(&self) -> LatencySummary {
        self.queue_latency.summary()
    }

    pub(crate) fn handle_latency(&self) -> LatencySummary {
        self.handle_latency.summary()
    }

    /// Records how the run ended, the first time only; the tier publishes it.
    pub(crate) fn end(&self, outcome: ListenerStatus) {
        let _ = self.outcome.compare_exchange(
            ListenerStatus::Running.as_u8(),
            outcome.as_u8(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// How the run ended; `Aborted` if it did not run to its end.
    pub(crate) fn outcome(&self) -> ListenerStatus {
        match ListenerStatus::from_u8(self.outcome.load(Ordering::SeqCst)) {
            ListenerStatus::Running => ListenerStatus::Aborted,
            outcome => outcome,
        }
    }

    /// Stops the run: no event is started after this.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    #[inline]
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Counts events whose attempt succeeded.
    #[inline]
    pub(crate) fn handled(&self, events: usize) {
        bump(&self.handled, events as u64);
        self.export.handled(events as u64);
    }

    /// Counts events whose attempt failed and that will be attempted again;
    /// `panicked` of them panicked.
    pub(crate) fn retried(&self, events: usize, panicked: usize) {
        self.export.failed(events as u64, panicked as u64);
        bump(&self.retried, events as u64);
        self.export.retried(events as u64);
        // After the outcome: see `counts`.
        bump(&self.panicked, panicked as u64);
    }

    /// Counts an event whose last attempt failed (a panic if `panicked`).
    pub(crate) fn dead_lettered(&self, panicked: bool) {
        self.export.failed(1, u64::from(panicked));
        bump(&self.dead_lettered, 1);
        bump(&self.panicked, u64::from(panicked));
        self.export.dead_lettered(1);
    }

    /// Records how long an event waited between its emit and its first
    /// attempt, `started`.
    pub(crate) fn waited<E>(&self, envelope: &Envelope<E>, started: Instant) {
        self.queue_latency
            .record(started.saturating_duration_since(envelope.emitted()));
    }

    /// Records how long one handler attempt took.
    #[inline]
    pub(crate) fn took(&self, took: Duration) {
        self.handle_latency.record(took);
        self.export.latency(took);
    }
}

/// Adds to a counter that only the listener's task writes, with a release
/// store: a snapshot that sees the new value sees what the task did before.
#[inline]
fn bump(counter: &AtomicU64, by: u64) {
    if by > 0 {
        counter.store(counter.load(Ordering::Relaxed) + by, Ordering::Release);
    }
}
