//! Rule 4: shutdown stops accepting, drains within a deadline, and reports
//! what each listener handled and what was left undelivered.

mod support;

use std::sync::Arc;
use std::time::Duration;

use event_bus::{Envelope, EventBus, HandlerError, KindSet, Listener, RecvError};
use support::{Gate, Gated, Recorder, TestEvent, TestKind, within};

/// Takes a little time per event, so a queue is still full at shutdown.
struct Yielding;

impl Listener<TestEvent> for Yielding {
    async fn handle(&self, _: Arc<Envelope<TestEvent>>) -> Result<(), HandlerError> {
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
    let stuck = bus.spawn(Gated(Gate::closed()));
    for i in 0..10 {
        bus.emit(TestEvent::A(i));
    }

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
