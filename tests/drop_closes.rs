//! Rule 4, second half: dropping every bus handle closes the bus; listeners
//! finish their queues and end.

mod support;

use std::sync::Arc;

use event_bus::{Envelope, EventBus, HandlerError, KindSet, Listener, RecvError};
use support::{Gate, Recorder, TestEvent, TestKind, within};

struct Gated(Gate, Recorder);

impl Listener<TestEvent> for Gated {
    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        meta: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        self.0.pass().await;
        self.1.handle(event, meta).await
    }
}

#[tokio::test]
async fn dropping_every_handle_lets_listeners_finish_their_queues_and_end() {
    let bus = EventBus::new();
    let clone = bus.clone();
    let gate = Gate::closed();
    let recorder = Recorder::new("recorder", KindSet::all());
    let listener = bus.spawn(Gated(gate.clone(), recorder.clone()));
    for i in 0..50 {
        clone.emit(TestEvent::C(i));
    }

    drop(bus);
    tokio::task::yield_now().await;
    assert!(!listener.is_finished(), "one handle is still alive");
    drop(clone);

    gate.open();
    within("listener to end", listener.finished()).await;
    assert_eq!(recorder.events().len(), 50);
    let metrics = listener.metrics();
    assert_eq!((metrics.handled, metrics.queue_depth), (50, 0));
}

#[tokio::test]
async fn dropping_every_handle_closes_subscriptions_after_their_queues() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe(TestKind::D);
    bus.emit(TestEvent::D(1));
    drop(bus);

    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::D(1));
    assert_eq!(subscription.recv().await.unwrap_err(), RecvError::Closed);
}

#[tokio::test]
async fn dropping_the_last_handle_ends_dead_letter_subscriptions_once_listeners_end() {
    let bus = EventBus::<TestEvent>::new();
    let mut letters = bus.dead_letters().subscribe();
    let listener = bus.spawn(Recorder::new("recorder", KindSet::all()));
    drop(bus);
    within("listener to end", listener.finished()).await;
    assert!(
        within("dead letters to end", letters.recv())
            .await
            .is_none()
    );
}
