//! the memory tier over the new runner: quiesce returns only once
//! every event is finished, a draining shutdown finishes everything, a stop
//! starts nothing more, and the listener counters' identities hold.

mod scripted;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use event_bus::{
    Batch, BatchError, BatchFailure, BatchListener, Envelope, EventBus, HandlerError,
    ListenerHandle, ListenerMetrics, ListenerOptions, ListenerStatus, Meta, RetryPolicy,
};
use scripted::matrix::act;
use scripted::{Act, Ev, Scripted, id_of};

const N: u64 = 60;

fn policy() -> RetryPolicy {
    RetryPolicy::exponential(3).initial_backoff(Duration::from_millis(20))
}

fn identities(m: &ListenerMetrics) {
    assert_eq!(
        m.delivered,
        m.handled + m.dead_lettered + m.in_flight as u64,
        "{m:?}"
    );
    assert_eq!(m.failed, m.retried + m.dead_lettered, "{m:?}");
    assert!(m.panicked <= m.failed, "{m:?}");
}

/// Names the events whose act fails; panics the batch when one panics.
#[derive(Clone, Default)]
struct Batcher;

impl BatchListener<Ev> for Batcher {
    fn name(&self) -> &str {
        "batcher"
    }

    async fn handle_batch(&self, batch: &Batch<Ev>) -> Result<(), BatchError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut failed = Vec::new();
        for (i, (event, attempt)) in batch.iter().zip(batch.attempts()).enumerate() {
            match act(id_of(event), *attempt) {
                Act::Ok | Act::Sleep(_) => {}
                Act::Fail => failed.push(i),
                _ => panic!("batch panics"),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::events(failed, "failed"))
        }
    }
}

async fn spawn_all(bus: &EventBus<Ev>) -> Vec<ListenerHandle<Ev>> {
    let mut handles = Vec::new();
    for concurrency in [1, 3] {
        handles.push(
            bus.spawn_with(
                Named(Scripted::new(act), format!("one-by-one-{concurrency}")),
                ListenerOptions::new()
                    .retry(policy())
                    .concurrency(concurrency),
            ),
        );
        for failure in [BatchFailure::Independent, BatchFailure::StopAtFirst] {
            handles.push(
                bus.spawn_with(
                    NamedBatch(Batcher, format!("batch-{concurrency}-{failure:?}")),
                    ListenerOptions::new()
                        .retry(policy())
                        .concurrency(concurrency)
                        .max_batch(4)
                        .max_wait(Duration::from_millis(30))
                        .batch_failure(failure),
                ),
            );
        }
    }
    handles
}

struct Named(Scripted, String);

impl event_bus::Listener<Ev> for Named {
    fn name(&self) -> &str {
        &self.1
    }

    fn handle(
        &self,
        event: Arc<Envelope<Ev>>,
        meta: Meta,
    ) -> impl std::future::Future<Output = Result<(), HandlerError>> + Send {
        event_bus::Listener::handle(&self.0, event, meta)
    }
}

struct NamedBatch(Batcher, String);

impl BatchListener<Ev> for NamedBatch {
    fn name(&self) -> &str {
        &self.1
    }

    fn handle_batch(
        &self,
        batch: &Batch<Ev>,
    ) -> impl std::future::Future<Output = Result<(), BatchError>> + Send {
        self.0.handle_batch(batch)
    }
}

#[tokio::test(start_paused = true)]
async fn quiesce_returns_once_every_event_is_finished() {
    let bus = EventBus::<Ev>::builder().capacity(1024).build();
    let handles = spawn_all(&bus).await;
    for round in 0..3 {
        for id in 1..=N {
            bus.emit(Ev::Job(round * 1000 + id));
        }
        tokio::time::timeout(Duration::from_secs(3600), bus.quiesce())
            .await
            .expect("quiesce returns");
        for handle in &handles {
            let m = handle.metrics();
            identities(&m);
            assert_eq!((m.in_flight, m.queue_depth), (0, 0), "{m:?}");
            assert_eq!(m.handled + m.dead_lettered, (round + 1) * N, "{m:?}");
        }
        let dead: u64 = handles.iter().map(|h| h.metrics().dead_lettered).sum();
        assert_eq!(bus.dead_letters().len() as u64, dead);
    }
    let report = bus.shutdown(Duration::from_secs(3600)).await;
    assert!(report.drained(), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_draining_shutdown_finishes_every_event() {
    let bus = EventBus::<Ev>::builder().capacity(1024).build();
    let handles = spawn_all(&bus).await;
    for id in 1..=N {
        bus.emit(Ev::Job(id));
    }
    let report = tokio::time::timeout(
        Duration::from_secs(7200),
        bus.shutdown(Duration::from_secs(3600)),
    )
    .await
    .expect("shutdown returns");
    assert!(report.drained(), "{report:?}");
    for handle in &handles {
        let m = handle.metrics();
        identities(&m);
        assert_eq!(m.status, ListenerStatus::Drained);
        assert_eq!(m.handled + m.dead_lettered, N, "{m:?}");
    }
}

/// Stops itself in the handler of event `stop_at` (which never awaits).
#[derive(Clone, Default)]
struct Stopper {
    handle: Arc<OnceLock<ListenerHandle<Ev>>>,
    seen: Arc<Mutex<Vec<u64>>>,
    stop_at: u64,
    fail_first: bool,
}

impl event_bus::Listener<Ev> for Stopper {
    async fn handle(&self, event: Arc<Envelope<Ev>>, meta: Meta) -> Result<(), HandlerError> {
        let id = id_of(&event);
        self.seen.lock().unwrap().push(id);
        if id == self.stop_at {
            self.handle.get().unwrap().abort();
        }
        if self.fail_first && meta.attempt() == 1 {
            return Err("first attempt fails".into());
        }
        Ok(())
    }
}

async fn stop_in_handler(concurrency: usize, fail_first: bool) {
    let bus = EventBus::<Ev>::new();
    let stopper = Stopper {
        stop_at: 3,
        fail_first,
        ..Stopper::default()
    };
    let cell = stopper.handle.clone();
    let seen = stopper.seen.clone();
    // Events queued before the listener's task first runs.
    let handle = bus.spawn_with(
        stopper,
        ListenerOptions::new()
            .concurrency(concurrency)
            .retry(RetryPolicy::exponential(3).initial_backoff(Duration::ZERO)),
    );
    cell.set(handle.clone()).unwrap();
    for id in 1..=20 {
        bus.emit(Ev::Job(id));
    }
    tokio::time::timeout(Duration::from_secs(60), handle.finished())
        .await
        .expect("the stopped listener ends");
    let seen = seen.lock().unwrap().clone();
    let m = handle.metrics();
    identities(&m);
    assert_eq!(m.status, ListenerStatus::Aborted);
    // Nothing started after the stop: the last call is the one that stopped.
    assert_eq!(
        seen.last(),
        Some(&3),
        "started after the stop: {seen:?} {m:?}"
    );
    tokio::time::timeout(Duration::from_secs(60), bus.quiesce())
        .await
        .expect("quiesce does not wait for a stopped listener");
}

#[tokio::test]
async fn a_stop_starts_nothing_more_concurrency_1() {
    stop_in_handler(1, false).await;
}

#[tokio::test]
async fn a_stop_starts_nothing_more_concurrency_3() {
    stop_in_handler(3, false).await;
}

#[tokio::test]
async fn a_stop_starts_no_retry_concurrency_1() {
    stop_in_handler(1, true).await;
}

#[tokio::test]
async fn a_stop_starts_no_retry_concurrency_3() {
    stop_in_handler(3, true).await;
}

/// Aborted from outside mid-handler, at concurrency 3 with retries waiting:
/// the counts are final and consistent once it has finished.
#[tokio::test(start_paused = true)]
async fn an_abort_mid_handler_leaves_consistent_final_counts() {
    let bus = EventBus::<Ev>::new();
    fn slow(id: u64, attempt: u32) -> Act {
        match (id % 3, attempt) {
            (0, 1) => Act::Fail,
            _ => Act::Sleep(Duration::from_millis(100 * (id % 4))),
        }
    }
    let listener = Scripted::new(slow);
    let seen = listener.seen.clone();
    let handle = bus.spawn_with(
        listener,
        ListenerOptions::new()
            .concurrency(3)
            .retry(RetryPolicy::exponential(3).initial_backoff(Duration::from_millis(250))),
    );
    for id in 1..=30 {
        bus.emit(Ev::Job(id));
    }
    tokio::time::sleep(Duration::from_millis(420)).await;
    handle.abort();
    let seen_at_abort = seen.lock().unwrap().len();
    tokio::time::timeout(Duration::from_secs(60), handle.finished())
        .await
        .expect("ends");
    let m = handle.metrics();
    identities(&m);
    assert_eq!(m.status, ListenerStatus::Aborted);
    assert!(m.in_flight <= 3, "{m:?}");
    assert_eq!(seen.lock().unwrap().len(), seen_at_abort);
    assert_eq!(m.delivered + m.queue_depth as u64 + m.dropped, 30, "{m:?}");
    let report = bus.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.undelivered(), (m.in_flight + m.queue_depth) as u64);
}
