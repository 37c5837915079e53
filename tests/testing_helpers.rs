//! `event_bus::testing`: the recorder waits on conditions with a deadline and
//! its assertions say what was recorded.

mod support;

use std::sync::Arc;
use std::time::Duration;

use event_bus::testing::EventRecorder;
use event_bus::{Envelope, EventBus, HandlerError, Listener};
use support::{TestEvent, TestKind};

/// Emits a `B` for every `A`, as a handler under test would.
struct FollowUp(EventBus<TestEvent>);

impl Listener<TestEvent> for FollowUp {
    fn interests(&self) -> event_bus::KindSet<TestKind> {
        TestKind::A.into()
    }

    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        self.0.emit(TestEvent::B(event.value() * 10));
        Ok(())
    }
}

#[tokio::test]
async fn recorder_waits_for_events_that_listeners_emit() {
    let bus = EventBus::new();
    let mut recorder = EventRecorder::with_interests(&bus, TestKind::B);
    bus.spawn(FollowUp(bus.clone()));

    bus.emit(TestEvent::A(1));
    bus.emit(TestEvent::A(2));
    let events = recorder.wait_for_count(2, support::DEADLINE).await.unwrap();
    let values: Vec<u64> = events.iter().map(|e| e.value()).collect();
    assert_eq!(values, [10, 20]);
    recorder.assert_kinds(&[TestKind::B, TestKind::B]);
    assert_eq!(recorder.count(TestKind::B), 2);
}

#[tokio::test(start_paused = true)]
async fn wait_for_gives_up_at_the_deadline_and_says_what_it_saw() {
    let bus = EventBus::new();
    let mut recorder = EventRecorder::new(&bus);
    bus.emit(TestEvent::C(1));

    let started = tokio::time::Instant::now();
    let error = recorder
        .wait_for(Duration::from_secs(3), |events| events.len() == 2)
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert_eq!(error.recorded, ["test.c"]);
    assert_eq!(
        error.to_string(),
        "condition not met within 3s; recorded [\"test.c\"]"
    );
}

#[tokio::test]
async fn take_starts_a_fresh_record() {
    let bus = EventBus::new();
    let mut recorder = EventRecorder::new(&bus);
    bus.emit(TestEvent::A(1));
    assert_eq!(recorder.take().len(), 1);
    recorder.assert_empty();
    bus.emit(TestEvent::D(2));
    recorder.assert_names(&["test.d"]);
}

#[tokio::test]
#[should_panic(
    expected = "recorded events differ\n  expected: [\"test.a\"]\n  recorded: [\"test.b\"]"
)]
async fn assert_names_shows_both_lists_on_mismatch() {
    let bus = EventBus::new();
    let mut recorder = EventRecorder::new(&bus);
    bus.emit(TestEvent::B(1));
    recorder.assert_names(&["test.a"]);
}

#[tokio::test]
async fn recorder_never_drops_even_past_its_capacity() {
    let bus = EventBus::new();
    let mut recorder = EventRecorder::with_interests(&bus, TestKind::A);
    let total = EventRecorder::<TestEvent>::CAPACITY as u64 + 10;
    for i in 0..total {
        bus.emit(TestEvent::A(i));
    }
    assert_eq!(recorder.events().len() as u64, total);
}

#[tokio::test]
async fn recorder_keeps_events_in_emit_order_across_priorities() {
    let bus = EventBus::new();
    let mut recorder = EventRecorder::new(&bus);
    bus.emit(TestEvent::A(1));
    bus.with_priority(event_bus::Priority::High)
        .emit(TestEvent::B(2));
    bus.with_priority(event_bus::Priority::Low)
        .emit(TestEvent::C(3));
    bus.emit(TestEvent::D(4));

    let sequences: Vec<u64> = recorder.events().iter().map(|e| e.sequence()).collect();
    assert!(
        sequences.is_sorted(),
        "recorded out of emit order: sequences {sequences:?}"
    );
    recorder.assert_names(&["test.a", "test.b", "test.c", "test.d"]);

    // Events that arrive while the recorder waits are kept in emit order too.
    bus.emit(TestEvent::A(5));
    bus.with_priority(event_bus::Priority::High)
        .emit(TestEvent::B(6));
    let events = recorder.wait_for_count(6, support::DEADLINE).await.unwrap();
    let values: Vec<u64> = events.iter().map(|e| e.value()).collect();
    assert_eq!(values, [1, 2, 3, 4, 5, 6]);
}
