//! Rule 1, second half: a subscriber is never queued for, nor woken by, an
//! event outside its interest set.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use event_bus::{EventBus, KindSet, TryRecvError};
use support::{Recorder, TestEvent, TestKind, within};

/// A waker that counts how often it is woken.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn uninterested_subscriber_is_never_woken() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe(TestKind::A);

    let counter = Arc::new(CountingWaker::default());
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut recv = Box::pin(subscription.recv());
    assert!(recv.as_mut().poll(&mut cx).is_pending());

    for i in 0..1_000 {
        bus.emit(TestEvent::of(TestKind::ALL_KINDS[1 + (i % 3) as usize], i));
    }
    assert_eq!(counter.0.load(Ordering::SeqCst), 0, "woken for other kinds");

    bus.emit(TestEvent::A(7));
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    match recv.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(envelope)) => assert_eq!(**envelope, TestEvent::A(7)),
        other => panic!("expected the A event, got {other:?}"),
    }
    drop(recv);
    assert_eq!(subscription.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(subscription.delivered(), 1);
}

#[tokio::test]
async fn listener_receives_only_its_interests() {
    let bus = EventBus::new();
    let recorder = Recorder::new("b-only", TestKind::B);
    bus.spawn(recorder.clone());

    for i in 0..400 {
        bus.emit(TestEvent::of(TestKind::ALL_KINDS[(i % 4) as usize], i));
    }
    within("quiesce", bus.quiesce()).await;

    let expected: Vec<TestEvent> = (0..400).filter(|i| i % 4 == 1).map(TestEvent::B).collect();
    assert_eq!(recorder.events(), expected);
    let metrics = bus.metrics();
    assert_eq!(metrics.listener("b-only").unwrap().delivered, 100);
}

#[tokio::test]
async fn event_nobody_wants_is_counted_and_takes_no_sequence_number() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe(TestKind::D);

    bus.emit(TestEvent::D(0));
    for i in 0..10 {
        bus.emit(TestEvent::A(i));
    }
    bus.emit(TestEvent::D(1));

    let metrics = bus.metrics();
    assert_eq!(metrics.emitted, 12);
    assert_eq!(metrics.emitted_of("test.a"), 10);
    assert_eq!(metrics.emitted_of("test.d"), 2);
    let first = subscription.try_recv().unwrap();
    let second = subscription.try_recv().unwrap();
    assert_eq!(second.sequence(), first.sequence() + 1);
}

#[tokio::test]
async fn empty_interest_set_receives_nothing_and_still_closes() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe(KindSet::empty());
    for kind in TestKind::ALL_KINDS {
        bus.emit(TestEvent::of(kind, 0));
    }
    assert_eq!(subscription.try_recv().unwrap_err(), TryRecvError::Empty);
    drop(bus);
    assert_eq!(subscription.try_recv().unwrap_err(), TryRecvError::Closed);
}
