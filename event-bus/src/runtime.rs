//! The listener runtime: one supervised task per listener, quiescence and
//! draining shutdown.

use std::any::Any;
use std::fmt;
use std::future::Future;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::bus::Shared;
use crate::dead_letter::{DeadLetter, Store};
use crate::envelope::Envelope;
use crate::error::{RecvError, chain};
use crate::event::Event;
use crate::listener::{Listener, ListenerOptions, RetryPolicy};
use crate::metrics::{Histogram, LaneMetrics, ListenerExport, ListenerMetrics, bump};
use crate::queue::{Queue, Receiver, lock};

/// The listeners of one bus, and what `quiesce` waits on.
pub(crate) struct Runtime<E: Event> {
    listeners: Mutex<Vec<Arc<ListenerState<E>>>>,
    idle: Notify,
    quiesce_waiters: AtomicUsize,
    bus_closed: AtomicBool,
}

impl<E: Event> Runtime<E> {
    pub(crate) fn new() -> Self {
        Self {
            listeners: Mutex::new(Vec::new()),
            idle: Notify::new(),
            quiesce_waiters: AtomicUsize::new(0),
            bus_closed: AtomicBool::new(false),
        }
    }

    pub(crate) fn metrics(&self) -> Vec<ListenerMetrics> {
        self.listeners().iter().map(|l| l.metrics()).collect()
    }

    fn listeners(&self) -> Vec<Arc<ListenerState<E>>> {
        lock(&self.listeners).clone()
    }

    fn all_idle(&self) -> bool {
        lock(&self.listeners)
            .iter()
            .all(|l| l.is_finished() || l.queue.is_idle())
    }

    /// Wakes `quiesce` callers to check again; free when none waits.
    fn notify_idle(&self) {
        if self.quiesce_waiters.load(Ordering::SeqCst) > 0 {
            self.idle.notify_waiters();
        }
    }

    /// The bus closed: once every listener has finished, no dead letter can
    /// come any more.
    pub(crate) fn closed(&self, dead_letters: &Store<E>) {
        self.bus_closed.store(true, Ordering::SeqCst);
        self.close_dead_letters_when_done(dead_letters);
    }

    fn close_dead_letters_when_done(&self, dead_letters: &Store<E>) {
        let done = self.bus_closed.load(Ordering::SeqCst)
            && lock(&self.listeners).iter().all(|l| l.is_finished());
        if done {
            dead_letters.close();
        }
    }
}

/// What a listener's task, its handle and the bus share. Only the task
/// writes the counters and histograms.
pub(crate) struct ListenerState<E: Event> {
    queue: Arc<Queue<E>>,
    handled: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    panicked: AtomicU64,
    queue_latency: Histogram,
    handle_latency: Histogram,
    pub(crate) retry: RetryPolicy,
    finished: AtomicBool,
    done: Notify,
    abort: OnceLock<AbortHandle>,
    export: ListenerExport,
}

impl<E: Event> ListenerState<E> {
    fn new(queue: Arc<Queue<E>>, retry: RetryPolicy) -> Self {
        let export = ListenerExport::new(&queue.name);
        Self {
            queue,
            handled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            queue_latency: Histogram::new(),
            handle_latency: Histogram::new(),
            retry,
            finished: AtomicBool::new(false),
            done: Notify::new(),
            abort: OnceLock::new(),
            export,
        }
    }

    fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    async fn wait_finished(&self) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_finished() {
                return;
            }
            notified.await;
        }
    }

    fn abort(&self) {
        if let Some(abort) = self.abort.get() {
            abort.abort();
        }
    }

    fn metrics(&self) -> ListenerMetrics {
        let counts = self.queue.counts();
        ListenerMetrics {
            name: self.queue.name.to_string(),
            delivered: counts.delivered(),
            handled: self.handled.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            panicked: self.panicked.load(Ordering::Relaxed),
            dropped: counts.dropped(),
            overflowed: counts.overflowed(),
            queue_depth: counts.depth(),
            in_flight: counts.in_flight,
            lanes: LaneMetrics::from_counts(&counts),
            queue_latency: self.queue_latency.summary(),
            handle_latency: self.handle_latency.summary(),
            finished: self.is_finished(),
        }
    }

    fn report(&self, drained: bool) -> ListenerReport {
        let metrics = self.metrics();
        ListenerReport {
            undelivered: (metrics.queue_depth + metrics.in_flight) as u64,
            name: metrics.name,
            handled: metrics.handled,
            failed: metrics.failed,
            dead_lettered: metrics.dead_lettered,
            dropped: metrics.dropped,
            drained,
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

    /// A snapshot of the listener's counters.
    pub fn metrics(&self) -> ListenerMetrics {
        self.state.metrics()
    }

    /// Whether the listener's task has ended.
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }

    /// Waits until the listener's task has ended: after the bus closed and
    /// the listener drained its queue, or after [`abort`](Self::abort).
    pub async fn finished(&self) {
        self.state.wait_finished().await;
    }

    /// Stops the listener at its next await point. Events still queued or in
    /// flight are not handled; they show as `queue_depth` and `in_flight` in
    /// its metrics.
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
            .field("finished", &self.is_finished())
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
    /// Events emitted after shutdown began, which reached nobody.
    pub rejected: u64,
}

impl ShutdownReport {
    /// Whether every listener finished its queue before the deadline.
    pub fn drained(&self) -> bool {
        self.listeners.iter().all(|l| l.drained)
    }

    /// Events left unhandled in listener queues or in flight, over all
    /// listeners.
    pub fn undelivered(&self) -> u64 {
        self.listeners.iter().map(|l| l.undelivered).sum()
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
        )
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
    /// Whether it finished its queue before the deadline.
    pub drained: bool,
}

pub(crate) fn spawn<E: Event, L: Listener<E>>(
    shared: &Arc<Shared<E>>,
    queue: Arc<Queue<E>>,
    listener: L,
    options: ListenerOptions,
) -> ListenerHandle<E> {
    spawn_task(
        shared,
        queue,
        listener,
        options.retry,
        |supervisor, receiver, finished| supervisor.run(receiver, options.concurrency, finished),
    )
}

/// Registers `listener` and spawns the task `run` makes of its supervisor.
pub(crate) fn spawn_task<E: Event, L, F>(
    shared: &Arc<Shared<E>>,
    queue: Arc<Queue<E>>,
    listener: L,
    retry: RetryPolicy,
    run: impl FnOnce(Supervisor<E, L>, Receiver<E>, FinishGuard<E>) -> F,
) -> ListenerHandle<E>
where
    F: Future<Output = ()> + Send + 'static,
{
    let state = Arc::new(ListenerState::new(queue, retry));
    lock(&shared.runtime.listeners).push(state.clone());
    let supervisor = Supervisor {
        shared: shared.clone(),
        state: state.clone(),
        listener,
    };
    // The guard moves into the task's future, so it runs even when the task
    // is aborted before its first poll.
    let finished = FinishGuard {
        shared: shared.clone(),
        state: state.clone(),
    };
    let receiver = Receiver::new(state.queue.clone());
    let task = tokio::spawn(run(supervisor, receiver, finished));
    // The task may already have ended; an abort handle to it is harmless.
    let _ = state.abort.set(task.abort_handle());
    ListenerHandle { state }
}

/// Runs one listener: takes its events, calls its handler, contains its
/// failures.
pub(crate) struct Supervisor<E: Event, L> {
    pub(crate) shared: Arc<Shared<E>>,
    pub(crate) state: Arc<ListenerState<E>>,
    pub(crate) listener: L,
}

impl<E: Event, L> Supervisor<E, L> {
    /// Counts events whose attempt succeeded.
    pub(crate) fn handled(&self, events: usize) {
        bump(&self.state.handled, events as u64);
        self.state.export.handled(events as u64);
    }

    /// Counts events whose attempt failed.
    pub(crate) fn failed(&self, events: usize, panicked: bool) {
        let state = &*self.state;
        bump(&state.failed, events as u64);
        if panicked {
            bump(&state.panicked, events as u64);
        }
        state.export.failed(events as u64, panicked);
    }

    /// Counts events about to be attempted again.
    pub(crate) fn retried(&self, events: usize) {
        bump(&self.state.retried, events as u64);
        self.state.export.retried(events as u64);
    }

    /// Records `envelope` as a dead letter after `attempts` attempts.
    pub(crate) fn dead_letter(&self, envelope: Arc<Envelope<E>>, error: String, attempts: u32) {
        let state = &*self.state;
        bump(&state.dead_lettered, 1);
        state.export.dead_lettered(1);
        self.shared.dead_letters.record(DeadLetter {
            envelope,
            listener: state.queue.name.clone(),
            error,
            attempts,
            failed_at: SystemTime::now(),
        });
    }

    /// Records how long an event waited between its emit and its first
    /// attempt, `started`.
    pub(crate) fn waited(&self, envelope: &Envelope<E>, started: Instant) {
        self.state
            .queue_latency
            .record(started.saturating_duration_since(envelope.emitted()));
    }

    /// Records how long one handler attempt took.
    pub(crate) fn took(&self, took: Duration) {
        self.state.handle_latency.record(took);
        self.state.export.latency(took);
    }

    /// Marks `events` tracked events finished and lets `quiesce` look again.
    pub(crate) fn complete(&self, events: usize) {
        self.state.queue.complete(events);
        self.shared.runtime.notify_idle();
    }

    pub(crate) fn name(&self) -> &Arc<str> {
        &self.state.queue.name
    }
}

impl<E: Event, L: Listener<E>> Supervisor<E, L> {
    async fn run(self, mut receiver: Receiver<E>, concurrency: usize, _finished: FinishGuard<E>) {
        if concurrency <= 1 {
            loop {
                match receiver.recv(true).await {
                    Ok(envelope) => self.process(envelope).await,
                    // The queue logged and counted the drop.
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                }
            }
        } else {
            let mut running = FuturesUnordered::new();
            loop {
                tokio::select! {
                    biased;
                    Some(()) = running.next(), if !running.is_empty() => {}
                    next = receiver.recv(true), if running.len() < concurrency => match next {
                        Ok(envelope) => running.push(self.process(envelope)),
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => break,
                    },
                }
            }
            while running.next().await.is_some() {}
        }
    }

    async fn process(&self, envelope: Arc<Envelope<E>>) {
        let span = tracing::info_span!(
            "event_bus.handle",
            listener = %self.state.queue.name,
            event = envelope.name(),
            event_id = %envelope.id(),
            sequence = envelope.sequence(),
        );
        if span.is_disabled() {
            // Nobody collects the span: skip entering it on every poll.
            self.attempt_all(envelope).await;
        } else {
            span.follows_from(envelope.span());
            self.attempt_all(envelope).instrument(span).await;
        }
        self.complete(1);
    }

    async fn attempt_all(&self, envelope: Arc<Envelope<E>>) {
        let retry = self.state.retry;
        let mut started = Instant::now();
        self.waited(&envelope, started);
        let mut attempt = 1;
        loop {
            let outcome = AssertUnwindSafe(self.listener.handle(envelope.clone()))
                .catch_unwind()
                .await;
            self.took(started.elapsed());
            let (error, panicked) = match outcome {
                Ok(Ok(())) => {
                    self.handled(1);
                    return;
                }
                Ok(Err(error)) => (chain(&*error), false),
                Err(payload) => (panicked(&*payload), true),
            };
            self.failed(1, panicked);
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
                self.retried(1);
                tokio::time::sleep(delay).await;
                attempt += 1;
                started = Instant::now();
                continue;
            }
            tracing::error!(
                listener = %self.name(),
                event = envelope.name(),
                event_id = %envelope.id(),
                attempts = attempt,
                error = %error,
                "handler failed; recorded a dead letter",
            );
            self.dead_letter(envelope, error, attempt);
            return;
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

/// Marks the listener finished however its task ends: drained, aborted, or
/// dropped with its runtime.
pub(crate) struct FinishGuard<E: Event> {
    shared: Arc<Shared<E>>,
    state: Arc<ListenerState<E>>,
}

impl<E: Event> Drop for FinishGuard<E> {
    fn drop(&mut self) {
        // Nobody will drain the queue any more: stop routing to it, so that
        // an aborted backpressure listener cannot hold `emit_wait` forever.
        // What it held stays counted as undelivered.
        self.shared.unregister(&self.state.queue);
        self.state.finished.store(true, Ordering::SeqCst);
        self.state.done.notify_waiters();
        let runtime = &self.shared.runtime;
        runtime.notify_idle();
        runtime.close_dead_letters_when_done(&self.shared.dead_letters);
    }
}

impl<E: Event> Shared<E> {
    pub(crate) async fn quiesce(&self) {
        let runtime = &self.runtime;
        runtime.quiesce_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = DecrementOnDrop(&runtime.quiesce_waiters);
        loop {
            let notified = runtime.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Emitting numbers and queues an event under one lock, so an
            // unchanged sequence across the scan means no listener was handed
            // new work while it was being checked: a chain of listeners that
            // emit to each other cannot slip past.
            let before = self.sequence();
            if runtime.all_idle() && self.sequence() == before {
                return;
            }
            notified.await;
        }
    }

    pub(crate) async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        self.close();
        let listeners = self.runtime.listeners();
        let all_finished = async {
            for listener in &listeners {
                listener.wait_finished().await;
            }
        };
        let _ = tokio::time::timeout(deadline, all_finished).await;
        let report = ShutdownReport {
            listeners: listeners
                .iter()
                .map(|listener| {
                    let drained = listener.is_finished();
                    if !drained {
                        listener.abort();
                    }
                    listener.report(drained)
                })
                .collect(),
            rejected: self.rejected(),
        };
        if report.drained() {
            tracing::info!(%report, "event bus shut down");
        } else {
            tracing::warn!(%report, "event bus shut down before every listener drained");
        }
        report
    }
}

struct DecrementOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
