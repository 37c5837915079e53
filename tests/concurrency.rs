//! Per-listener concurrency: 1 by default (one handler at a time, in order);
//! configurable to run several handlers at once.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use event_bus::{Envelope, EventBus, HandlerError, Listener, ListenerOptions};
use support::{TestEvent, within};
use tokio::sync::Barrier;

/// Tracks the most handler calls that ran at the same time.
#[derive(Clone, Default)]
struct Overlap {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Listener<TestEvent> for Overlap {
    async fn handle(
        &self,
        _: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_concurrency_runs_one_handler_at_a_time() {
    let bus = EventBus::new();
    let overlap = Overlap::default();
    bus.spawn(overlap.clone());
    for i in 0..200 {
        bus.emit(TestEvent::A(i));
    }
    within("quiesce", bus.quiesce()).await;
    assert_eq!(overlap.most.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bounds_the_handlers_running_at_once() {
    let bus = EventBus::new();
    let overlap = Overlap::default();
    let handle = bus.spawn_with(overlap.clone(), ListenerOptions::new().concurrency(3));
    for i in 0..200 {
        bus.emit(TestEvent::A(i));
    }
    within("quiesce", bus.quiesce()).await;
    assert_eq!(overlap.most.load(Ordering::SeqCst), 3);
    assert_eq!(handle.metrics().handled, 200);
}

/// Every call waits until four calls have arrived: it can only finish if
/// four run at once.
struct NeedsFour(Arc<Barrier>);

impl Listener<TestEvent> for NeedsFour {
    async fn handle(
        &self,
        _: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        self.0.wait().await;
        Ok(())
    }
}

#[tokio::test]
async fn concurrent_handlers_really_run_together() {
    let bus = EventBus::new();
    let handle = bus.spawn_with(
        NeedsFour(Arc::new(Barrier::new(4))),
        ListenerOptions::new().concurrency(4),
    );
    for i in 0..8 {
        bus.emit(TestEvent::A(i));
    }
    within("quiesce", bus.quiesce()).await;
    assert_eq!(handle.metrics().handled, 8);
}
