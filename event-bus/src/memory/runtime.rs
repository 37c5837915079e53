//! The listener runtime: one supervised task per listener, quiescence and
//! draining shutdown.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use super::listeners::{ListenerHandle, ListenerState, ShutdownReport};
use super::queue::Queue;
use super::shared::{LISTENER_OF, Shared};
use super::source::MemorySource;
use crate::event::Event;
use crate::listener::{ListenerOptions, RetryPolicy};
use crate::metrics::ListenerStatus;
use crate::runner::{ListenerCore, Run, Spawnable, panicked};
use crate::sync::{AtomicUsize, Ordering, dekker_fence};

/// How long [`EventBus::shutdown`](crate::EventBus::shutdown) waits, past
/// its deadline, for the listeners it stopped to end: a handler that blocks
/// its thread cannot be stopped before it returns.
pub const ABORT_GRACE: Duration = Duration::from_secs(1);

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
