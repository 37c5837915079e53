//! Rule 3: a listener's error, panic or slowness never reaches the emitter
//! and never delays another listener.

mod support;

use std::sync::Arc;

use event_bus::{Envelope, EventBus, HandlerError, KindSet, Listener, ListenerOptions};
use support::{Gate, Gated, Recorder, TestEvent, TestKind, capture_logs, within};

/// Fails on odd values, panics on multiples of 10, handles the rest.
struct Faulty;

impl Listener<TestEvent> for Faulty {
    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        match event.value() {
            v if v % 10 == 0 => panic!("faulty listener panicked on {v}"),
            v if v % 2 == 1 => Err(format!("odd value {v}").into()),
            _ => Ok(()),
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn errors_and_panics_are_logged_counted_and_the_listener_goes_on() {
    let (logs, _guard) = capture_logs();
    let bus = EventBus::new();
    let faulty = bus.spawn(Faulty);
    let healthy = Recorder::new("healthy", KindSet::all());
    bus.spawn(healthy.clone());

    for i in 0..100 {
        bus.emit(TestEvent::A(i));
    }
    within("quiesce", bus.quiesce()).await;

    let metrics = faulty.metrics();
    assert_eq!(metrics.delivered, 100);
    assert_eq!(metrics.panicked, 10);
    assert_eq!(metrics.failed, 60); // 50 odd values + 10 panics
    assert_eq!(metrics.handled, 40);
    assert_eq!(metrics.dead_lettered, 60);
    assert!(!faulty.is_finished());
    assert_eq!(healthy.events().len(), 100);

    let errors = logs.find(tracing::Level::ERROR, "handler failed");
    assert_eq!(errors.len(), 60);
    let first = &errors[0];
    for field in ["listener", "event", "event_id", "error"] {
        assert!(
            first.iter().any(|(k, _)| k == field),
            "{field} missing: {first:?}"
        );
    }
    assert!(first.contains(&("listener".into(), "Faulty".into())));
    assert!(first.contains(&("event".into(), "test.a".into())));
    assert!(first.contains(&(
        "error".into(),
        "panicked: faulty listener panicked on 0".into()
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_listener_delays_neither_the_emitter_nor_other_listeners() {
    let bus = EventBus::new();
    let gate = Gate::closed();
    let stuck = bus.spawn_with(Gated(gate.clone()), ListenerOptions::new().capacity(8));
    let fast = Recorder::new("fast", KindSet::all());
    bus.spawn(fast.clone());

    // `emit` is synchronous: it returns with the stuck listener's queue full.
    for i in 0..500 {
        bus.emit(TestEvent::B(i));
    }
    fast.wait_for(500).await;
    assert_eq!(fast.events().len(), 500);

    let metrics = stuck.metrics();
    assert_eq!(metrics.handled, 0);
    assert_eq!(
        metrics.delivered + metrics.dropped + metrics.queue_depth as u64,
        500
    );

    gate.open();
    within("quiesce", bus.quiesce()).await;
    assert_eq!(stuck.metrics().handled, stuck.metrics().delivered);
}

#[tokio::test(start_paused = true)]
async fn a_retrying_listener_does_not_delay_other_listeners() {
    struct AlwaysFails;
    impl Listener<TestEvent> for AlwaysFails {
        async fn handle(
            &self,
            _: Arc<Envelope<TestEvent>>,
            _: event_bus::Meta,
        ) -> Result<(), HandlerError> {
            Err("down".into())
        }
    }

    let bus = EventBus::new();
    let retry = event_bus::RetryPolicy::exponential(10)
        .initial_backoff(std::time::Duration::from_secs(3600))
        .jitter(false);
    let failing = bus.spawn_with(AlwaysFails, ListenerOptions::new().retry(retry));
    let fast = Recorder::new("fast", TestKind::C);
    bus.spawn(fast.clone());

    let start = tokio::time::Instant::now();
    bus.emit(TestEvent::C(1));
    bus.emit(TestEvent::C(2));
    fast.wait_for(2).await;
    // Done before the failing listener's first hour-long backoff ended.
    assert!(start.elapsed() < std::time::Duration::from_secs(3600));
    let metrics = failing.metrics();
    assert_eq!((metrics.handled, metrics.dead_lettered), (0, 0));
}

/// A handler future that is done at once and, when `armed`, panics as it is
/// dropped: after the handler returned, outside the handler's own poll.
struct PanicsOnDrop {
    armed: bool,
}

impl std::future::Future for PanicsOnDrop {
    type Output = Result<(), HandlerError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if self.armed && !std::thread::panicking() {
            panic!("{}: handler future dropped", support::INJECTED_PANIC);
        }
    }
}

/// Its handler future for event 0 panics when dropped.
struct DropPanics;

impl Listener<TestEvent> for DropPanics {
    fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> impl std::future::Future<Output = Result<(), HandlerError>> + Send {
        PanicsOnDrop {
            armed: event.value() == 0,
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_listener_whose_task_panics_is_reported_not_silently_gone() {
    support::quiet_injected_panics();
    let (logs, _guard) = capture_logs();
    let bus = EventBus::new();
    let listener = bus.spawn(DropPanics);
    for i in 0..3 {
        bus.emit(TestEvent::A(i));
    }
    within("quiesce", bus.quiesce()).await;

    if !listener.is_finished() {
        // The runtime caught the panic as a handler's, and went on.
        let metrics = listener.metrics();
        assert!(metrics.handled >= 2, "{metrics:?}");
        assert_eq!(metrics.handled + metrics.dead_lettered, 3, "{metrics:?}");
        return;
    }
    // Or the listener ended: then it must say so, and what it left.
    let errors: Vec<_> = logs
        .find(tracing::Level::ERROR, "")
        .into_iter()
        .filter(|fields| fields.contains(&("listener".into(), "DropPanics".into())))
        .collect();
    let report = bus.shutdown(support::DEADLINE).await;
    assert!(
        !errors.is_empty(),
        "the listener's task panicked and ended without an error logged; report: {report}"
    );
    let reported = report.listener("DropPanics").expect("reported at shutdown");
    assert!(!reported.drained, "{reported:?}");
    assert!(reported.undelivered >= 2, "{reported:?}");
    assert_eq!(
        reported.handled + reported.dead_lettered + reported.undelivered,
        3,
        "{reported:?}"
    );
}
