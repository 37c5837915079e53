//! Rule 1: every subscriber receives the events of its interest in emit
//! order, and all subscribers agree on that order.

mod support;

use event_bus::{EventBus, KindSet, LagPolicy};
use futures::StreamExt;
use support::{Recorder, TestEvent, TestKind, within};

#[tokio::test]
async fn subscriber_receives_events_of_interest_in_emit_order() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe([TestKind::A, TestKind::C]);

    let emitted: Vec<TestEvent> = (0..300)
        .map(|i| TestEvent::of(TestKind::ALL_KINDS[i % 4], i as u64))
        .collect();
    for event in &emitted {
        bus.emit(event.clone());
    }

    let expected: Vec<TestEvent> = emitted
        .into_iter()
        .filter(|e| matches!(e, TestEvent::A(_) | TestEvent::C(_)))
        .collect();
    let mut received = Vec::new();
    while let Ok(envelope) = subscription.try_recv() {
        received.push(envelope.event().clone());
    }
    assert_eq!(received, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_emitters_give_every_subscriber_the_same_order() {
    const EMITTERS: u64 = 4;
    const PER_EMITTER: u64 = 2_000;
    let bus = EventBus::new();
    let capacity = (EMITTERS * PER_EMITTER) as usize;
    let mut first = bus.subscribe_with(KindSet::all(), capacity, LagPolicy::DropOldest);
    let mut second = bus.subscribe_with(KindSet::all(), capacity, LagPolicy::DropOldest);

    let emitters: Vec<_> = (0..EMITTERS)
        .map(|emitter| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..PER_EMITTER {
                    // The kind names the emitter; the value counts up per emitter.
                    bus.emit(TestEvent::of(TestKind::ALL_KINDS[emitter as usize], i));
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for emitter in emitters {
        emitter.await.unwrap();
    }
    drop(bus);

    let first: Vec<_> = first.by_ref().map(|e| e.unwrap()).collect().await;
    let second: Vec<_> = second.by_ref().map(|e| e.unwrap()).collect().await;
    assert_eq!(first.len() as u64, EMITTERS * PER_EMITTER);

    // One bus-wide order: strictly increasing sequence numbers, the same
    // events in the same order for both subscribers.
    assert!(first.windows(2).all(|w| w[0].sequence() < w[1].sequence()));
    let ids = |events: &[std::sync::Arc<event_bus::Envelope<TestEvent>>]| {
        events.iter().map(|e| e.id()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&first), ids(&second));

    // Each emitter's events keep its own order.
    for kind in TestKind::ALL_KINDS {
        let values: Vec<u64> = first
            .iter()
            .filter(|e| e.kind() == kind)
            .map(|e| e.value())
            .collect();
        assert_eq!(values, (0..PER_EMITTER).collect::<Vec<_>>(), "{kind:?}");
    }
}

#[tokio::test]
async fn listener_handles_events_in_emit_order() {
    let bus = EventBus::new();
    let recorder = Recorder::new("recorder", KindSet::all());
    bus.spawn(recorder.clone());

    let emitted: Vec<TestEvent> = (0..1_000)
        .map(|i| TestEvent::of(TestKind::ALL_KINDS[(i * 7 % 4) as usize], i))
        .collect();
    for event in &emitted {
        bus.emit(event.clone());
    }
    within("quiesce", bus.quiesce()).await;

    assert_eq!(recorder.events(), emitted);
    let sequences = recorder.sequences();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test]
async fn subscription_stream_yields_in_order_and_ends_when_the_bus_closes() {
    let bus = EventBus::new();
    let subscription = bus.subscribe(TestKind::B);
    for i in 0..10 {
        bus.emit(TestEvent::B(i));
        bus.emit(TestEvent::A(i));
    }
    drop(bus);

    let values: Vec<u64> = subscription.map(|e| e.unwrap().value()).collect().await;
    assert_eq!(values, (0..10).collect::<Vec<_>>());
}
