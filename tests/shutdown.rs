//! Rule 4: shutdown stops accepting, drains within a deadline, and reports
//! what each listener handled and what was left undelivered.

mod support;

use std::sync::Arc;
use std::time::Duration;

use event_bus::{Envelope, EventBus, HandlerError, KindSet, Listener, RecvError};
use support::{Gate, Gated, Recorder, TestEvent, TestKind, stuck_listener, until, within};

/// Takes a little time per event, so a queue is still full at shutdown.
struct Yielding;

impl Listener<TestEvent> for Yielding {
    async fn handle(
        &self,
        _: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn shutdown_drains_every_queue_and_reports() {
    let bus = EventBus::new();
    bus.spawn(Yielding);
    let recorder = Recorder::new("recorder", TestKind::A);
    bus.spawn(recorder.clone());
    for i in 0..500 {
        bus.emit(TestEvent::A(i));
    }

    let report = bus.shutdown(support::DEADLINE).await;
    assert!(report.drained(), "{report}");
    assert_eq!(report.undelivered(), 0);
    let yielding = report.listener("Yielding").unwrap();
    assert_eq!((yielding.handled, yielding.undelivered), (500, 0));
    assert_eq!(report.listener("recorder").unwrap().handled, 500);
    assert_eq!(recorder.events().len(), 500);
    assert!(bus.metrics().listeners.iter().all(|l| l.finished));
}

#[tokio::test(start_paused = true)]
async fn shutdown_past_the_deadline_stops_listeners_and_reports_what_was_left() {
    let bus = EventBus::new();
    let stuck = stuck_listener(&bus, 10);

    let started = tokio::time::Instant::now();
    let report = bus.shutdown(Duration::from_millis(250)).await;
    assert_eq!(started.elapsed(), Duration::from_millis(250));

    assert!(!report.drained());
    let listener = report.listener("Gated").unwrap();
    assert!(!listener.drained);
    // One event in the handler, nine still queued.
    assert_eq!((listener.handled, listener.undelivered), (0, 10));
    assert_eq!(report.undelivered(), 10);
    within("aborted listener to end", stuck.finished()).await;
}

#[tokio::test]
async fn events_emitted_after_shutdown_are_rejected_and_counted() {
    let bus = EventBus::new();
    let recorder = Recorder::new("recorder", KindSet::all());
    bus.spawn(recorder.clone());
    bus.shutdown(support::DEADLINE).await;
    assert!(bus.is_closed());

    bus.emit(TestEvent::A(1));
    bus.emit_wait(TestEvent::B(2)).await;

    let metrics = bus.metrics();
    assert_eq!((metrics.rejected, metrics.emitted), (2, 0));
    assert_eq!(bus.shutdown(support::DEADLINE).await.rejected, 2);
    assert!(recorder.events().is_empty());
}

#[tokio::test]
async fn subscriptions_receive_what_is_queued_then_closed() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe(TestKind::A);
    bus.emit(TestEvent::A(1));
    bus.emit(TestEvent::A(2));
    bus.shutdown(support::DEADLINE).await;

    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(1));
    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(2));
    assert_eq!(subscription.recv().await.unwrap_err(), RecvError::Closed);
}

#[tokio::test]
async fn subscribing_or_spawning_after_shutdown_ends_at_once() {
    let bus = EventBus::new();
    bus.shutdown(support::DEADLINE).await;

    let mut late = bus.subscribe(TestKind::A);
    assert_eq!(late.recv().await.unwrap_err(), RecvError::Closed);
    let listener = bus.spawn(Recorder::new("late", KindSet::all()));
    within("late listener to end", listener.finished()).await;
}

/// Emits a `B` for every `A` it handles, from its handler.
struct FollowUp(EventBus<TestEvent>);

impl Listener<TestEvent> for FollowUp {
    fn interests(&self) -> KindSet<TestKind> {
        TestKind::A.into()
    }

    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        tokio::task::yield_now().await;
        self.0.emit(TestEvent::B(event.value()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_draining_listeners_emit_follow_up_events() {
    const EVENTS: u64 = 200;
    let bus = EventBus::new();
    let end = Recorder::new("end", TestKind::B);
    bus.spawn(end.clone());
    bus.spawn(FollowUp(bus.clone()));
    for i in 0..EVENTS {
        bus.emit(TestEvent::A(i));
    }

    let report = bus.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained(), "{report}");
    assert_eq!(
        report.rejected, 0,
        "follow-up events were rejected: {report}"
    );
    assert_eq!(report.listener("end").unwrap().handled, EVENTS, "{report}");
    assert_eq!(end.events().len() as u64, EVENTS);
}

#[tokio::test]
async fn shutdown_rejects_emits_from_outside_while_listeners_drain() {
    const EVENTS: u64 = 5;
    let bus = EventBus::new();
    let gate = Gate::closed();
    let end = Recorder::new("end", TestKind::B);
    bus.spawn(end.clone());
    bus.spawn(FollowUp(bus.clone()));
    // Keeps shutdown draining until the gate opens.
    bus.spawn_with(
        Gated(gate.clone()),
        event_bus::ListenerOptions::new().capacity(16),
    );
    for i in 0..EVENTS {
        bus.emit(TestEvent::A(i));
    }

    let mut shutdown = Box::pin(bus.shutdown(support::DEADLINE));
    assert!(
        futures::FutureExt::now_or_never(&mut shutdown).is_none(),
        "the gated listener holds shutdown"
    );
    bus.emit(TestEvent::A(100)); // from outside, after shutdown began
    assert_eq!(bus.metrics().rejected, 1);

    gate.open();
    let report = within("shutdown", shutdown).await;
    assert!(report.drained(), "{report}");
    assert_eq!(report.rejected, 1, "{report}");
    let values: Vec<u64> = end.events().iter().map(TestEvent::value).collect();
    assert_eq!(values, (0..EVENTS).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_listener_aborted_before_shutdown_is_counted_undrained_with_what_it_left() {
    let bus = EventBus::new();
    let stuck = stuck_listener(&bus, 5);
    // Let it take the first event into its handler, where it blocks.
    until("the listener to take an event", || {
        stuck.metrics().in_flight > 0
    })
    .await;
    stuck.abort();
    within("aborted listener to end", stuck.finished()).await;

    // It left the list when it ended (so spawning and aborting in a loop
    // cannot grow it); what it left undelivered stays counted.
    assert!(bus.metrics().listener("Gated").is_none());
    assert_eq!(bus.metrics().abandoned, 5);
    let report = bus.shutdown(support::DEADLINE).await;
    assert!(report.listener("Gated").is_none(), "{report}");
    assert_eq!((report.abandoned, report.undelivered()), (5, 5), "{report}");
    assert!(!report.drained(), "{report}");
}

#[tokio::test]
async fn a_listener_aborted_while_shutdown_drains_is_reported_once_undrained() {
    let bus = EventBus::new();
    let stuck = stuck_listener(&bus, 5);
    let shutdown = tokio::spawn({
        let bus = bus.clone();
        async move { bus.shutdown(support::DEADLINE).await }
    });
    // Shutdown is draining, waiting for the stuck listener; stop it.
    until("shutdown to begin", || bus.is_closed()).await;
    stuck.abort();
    let report = within("shutdown", shutdown).await.unwrap();
    let gated = report.listener("Gated").expect("reported");
    assert!(!gated.drained, "{gated:?}");
    assert_eq!(gated.status, event_bus::ListenerStatus::Aborted);
    assert_eq!((gated.handled, gated.undelivered), (0, 5), "{gated:?}");
    assert_eq!(report.abandoned, 0, "{report}");
    assert_eq!(report.undelivered(), 5, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emit_wait_from_outside_waiting_when_shutdown_begins_is_rejected_at_once() {
    let bus = EventBus::new();
    // A full backpressure subscription that nobody reads: `emit_wait` into
    // it waits for room that never comes.
    let mut full = bus.subscribe_with(TestKind::A, 1, event_bus::LagPolicy::Backpressure);
    bus.emit(TestEvent::A(0));
    // A listener that keeps the first phase of shutdown busy.
    let gate = Gate::closed();
    bus.spawn_with(
        Gated(gate.clone()),
        event_bus::ListenerOptions::new().capacity(1),
    );
    bus.emit(TestEvent::B(0));
    let waiting = tokio::spawn({
        let bus = bus.clone();
        async move { bus.emit_wait(TestEvent::A(1)).await }
    });
    let shutdown = tokio::spawn({
        let bus = bus.clone();
        async move { bus.shutdown(support::DEADLINE).await }
    });
    // The shutdown is draining (the gated listener is busy), and the waiting
    // emit from outside gives up at once rather than at the close.
    within("the waiting emit_wait to be refused", waiting)
        .await
        .unwrap();
    assert!(bus.is_closed());
    assert!(!shutdown.is_finished(), "shutdown is still draining");
    gate.open();
    let report = within("shutdown", shutdown).await.unwrap();
    assert!(report.drained(), "{report}");
    assert_eq!(report.rejected, 1, "{report}");
    assert_eq!(**full.recv().await.unwrap(), TestEvent::A(0));
    assert_eq!(full.recv().await.unwrap_err(), RecvError::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emit_after_shutdown_never_waits_on_the_log_sink() {
    let bus = EventBus::new();
    let _subscription = bus.subscribe(TestKind::A);
    bus.shutdown(support::DEADLINE).await;
    // The emitting thread logs into a sink that stalls on every line until
    // released: a rejected emit must not log there.
    let sink = support::SlowSink::held("");
    let finished = support::finishes_on_its_own({
        let (bus, sink) = (bus.clone(), sink.clone());
        move || {
            let _default = sink.set_default();
            for i in 0..3 {
                bus.emit(TestEvent::A(i));
            }
        }
    });
    sink.release();
    assert!(finished, "a rejected emit waited on the log sink");
    assert_eq!(bus.metrics().rejected, 3);
}

/// Waits at its gate, then emits a follow-up `B` for each `A` it handles.
struct Relay {
    bus: EventBus<TestEvent>,
    gate: Gate,
}

impl Listener<TestEvent> for Relay {
    fn interests(&self) -> KindSet<TestKind> {
        TestKind::A.into()
    }

    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        self.gate.pass().await;
        self.bus.emit(TestEvent::B(event.value()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_listener_spawned_while_shutdown_drains_does_not_wait_for_its_batch_to_fill() {
    let bus = EventBus::new();
    let gate = Gate::closed();
    bus.spawn(Relay {
        bus: bus.clone(),
        gate: gate.clone(),
    });
    bus.emit(TestEvent::A(1));
    let shutdown = tokio::spawn({
        let bus = bus.clone();
        async move { bus.shutdown(support::DEADLINE).await }
    });
    within("shutdown to begin", async {
        while !bus.is_closed() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // Spawned while the bus drains, with batches that would wait an hour.
    let batches = bus.spawn_with(
        Collects,
        event_bus::ListenerOptions::new()
            .max_batch(100)
            .max_wait(Duration::from_secs(3600)),
    );
    gate.open();
    let report = within("shutdown", shutdown).await.unwrap();
    assert!(report.drained(), "{report}");
    assert_eq!(batches.metrics().handled, 1, "{report}");
}

/// A batch listener of `B`s that handles every batch.
struct Collects;

impl event_bus::BatchListener<TestEvent> for Collects {
    fn interests(&self) -> KindSet<TestKind> {
        TestKind::B.into()
    }

    async fn handle_batch(
        &self,
        _: &event_bus::Batch<TestEvent>,
    ) -> Result<(), event_bus::BatchError> {
        Ok(())
    }
}
