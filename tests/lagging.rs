//! Rule 2: a full queue drops its oldest events under the default policy, and
//! never silently: the consumer is told the exact count, it is logged as a
//! warning, and it is counted.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use event_bus::{EventBus, LagPolicy, ListenerOptions, RecvError, TryRecvError};
use support::{
    DEADLINE, Gate, Gated, SlowSink, TestEvent, TestKind, capture_logs, emit_until_stopped, within,
};

#[tokio::test]
async fn drop_oldest_reports_the_exact_lag_then_the_newest_events() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, 4, LagPolicy::DropOldest);
    for i in 0..10 {
        bus.emit(TestEvent::A(i));
    }

    assert_eq!(subscription.recv().await.unwrap_err(), RecvError::Lagged(6));
    for i in 6..10 {
        assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(i));
    }
    assert_eq!((subscription.delivered(), subscription.dropped()), (4, 6));
}

#[tokio::test]
async fn each_gap_is_reported_where_it_is() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, 2, LagPolicy::DropOldest);
    for i in 0..3 {
        bus.emit(TestEvent::A(i));
    }
    assert_eq!(subscription.recv().await.unwrap_err(), RecvError::Lagged(1));
    // The receive takes the queued [1, 2] as its batch; they can no longer
    // be dropped.
    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(1));
    for i in 3..6 {
        bus.emit(TestEvent::A(i));
    }
    // The queue held [3, 4] when 5 arrived: 3 was dropped. The gap lies
    // between the batch's 2 and the queue's 4.
    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(2));
    assert_eq!(subscription.recv().await.unwrap_err(), RecvError::Lagged(1));
    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(4));
    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(5));
    assert_eq!(subscription.delivered() + subscription.dropped(), 6);
}

#[tokio::test(flavor = "current_thread")]
async fn lag_is_logged_as_a_warning_with_the_count() {
    let (logs, _guard) = capture_logs();
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, 1, LagPolicy::DropOldest);
    for i in 0..4 {
        bus.emit(TestEvent::A(i));
    }
    assert_eq!(subscription.recv().await.unwrap_err(), RecvError::Lagged(3));

    let warnings = logs.find(tracing::Level::WARN, "lagged");
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains(&("dropped".into(), "3".into())));
}

#[tokio::test]
async fn slow_listener_accounts_for_every_event() {
    let bus = EventBus::new();
    let gate = Gate::closed();
    let listener = bus.spawn_with(Gated(gate.clone()), ListenerOptions::new().capacity(8));

    for i in 0..1_000 {
        bus.emit(TestEvent::A(i));
    }
    gate.open();
    within("quiesce", bus.quiesce()).await;

    let metrics = listener.metrics();
    assert_eq!(metrics.delivered + metrics.dropped, 1_000);
    assert_eq!(metrics.handled, metrics.delivered);
    // At most the queue and the one event in the handler survive the burst.
    assert!(metrics.delivered <= 9, "{metrics:?}");
    assert_eq!(metrics.queue_depth, 0);
}

#[test]
fn a_stalled_log_sink_on_a_lagging_subscriber_never_blocks_an_emit() {
    let bus = EventBus::new();
    let mut lagging = bus.subscribe_with(TestKind::A, 1, LagPolicy::DropOldest);
    let _unrelated = bus.subscribe(TestKind::B);
    // The lagging subscriber's thread logs into a sink that stalls on its
    // lag warning until the test lets it go.
    let sink = SlowSink::held("lagged");
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = std::thread::spawn({
        let (sink, stop) = (sink.clone(), stop.clone());
        move || {
            let _default = sink.set_default();
            let mut lags = 0u64;
            for _ in 0..100_000_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match lagging.try_recv() {
                    Err(TryRecvError::Lagged(_)) => lags += 1,
                    Err(TryRecvError::Closed) => break,
                    Ok(_) | Err(TryRecvError::Empty) => {}
                }
            }
            lags
        }
    });
    let lagger = emit_until_stopped(&bus, &stop, 100_000_000);

    // While the sink holds the warning, emits go on: to the unrelated
    // subscriber, and to the lagging one itself.
    let warned = sink.wait_entered(DEADLINE);
    let emits_finished = warned
        && support::finishes_on_its_own({
            let bus = bus.clone();
            move || {
                for i in 0..1_000 {
                    bus.emit(TestEvent::B(i));
                    bus.emit(TestEvent::A(i));
                }
            }
        });
    sink.release();
    stop.store(true, Ordering::Relaxed);
    lagger.join().unwrap();
    let lags = consumer.join().unwrap();

    assert!(warned, "no lag warning was logged within {DEADLINE:?}");
    assert!(lags > 0);
    assert!(
        emits_finished,
        "emits waited on the lagging subscriber's stalled log sink"
    );
}

#[tokio::test]
async fn a_full_lane_drops_its_oldest_queued_event_never_the_newest_nor_a_taken_one() {
    const CAPACITY: usize = 8;
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, CAPACITY, LagPolicy::DropOldest);
    for i in 0..CAPACITY as u64 {
        bus.emit(TestEvent::A(i));
    }
    // The consumer takes the whole lane as a batch and hands out one: the
    // seven it still holds cannot be dropped any more.
    assert_eq!(**subscription.try_recv().unwrap(), TestEvent::A(0));
    for i in 8..30 {
        bus.emit(TestEvent::A(i));
        // The capacity bounds what is queued; the taken batch is on top.
        assert!(
            subscription.len() <= CAPACITY + 7,
            "{} held",
            subscription.len()
        );
    }
    for i in 1..8 {
        assert_eq!(**subscription.try_recv().unwrap(), TestEvent::A(i));
    }
    // 8 to 21 went, oldest first; the 8 newest are all there.
    assert_eq!(
        subscription.try_recv().unwrap_err(),
        TryRecvError::Lagged(14)
    );
    for i in 22..30 {
        assert_eq!(**subscription.try_recv().unwrap(), TestEvent::A(i));
    }
    assert_eq!(subscription.delivered() + subscription.dropped(), 30);
}

#[test]
fn a_lagging_consumer_racing_its_emitter_never_loses_the_newest_event() {
    // Each round emits two events and waits until the consumer has drained
    // the queue: whatever the interleaving, the round's newest (second)
    // event must be among what it received.
    const ROUNDS: u64 = 5_000;
    let bus = EventBus::<TestEvent>::new();
    let mut subscription = bus.subscribe_with(TestKind::A, 1, LagPolicy::DropOldest);
    let (sent, rounds) = std::sync::mpsc::channel::<u64>();
    let (drained, done) = std::sync::mpsc::channel::<bool>();
    let consumer = std::thread::spawn(move || {
        for round in rounds {
            let newest = 2 * round + 1;
            let mut seen_newest = false;
            loop {
                match subscription.try_recv() {
                    Ok(event) => seen_newest |= event.value() == newest,
                    Err(TryRecvError::Lagged(_)) => {}
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            drained.send(seen_newest).unwrap();
        }
    });
    let mut lost = Vec::new();
    for round in 0..ROUNDS {
        bus.emit(TestEvent::A(2 * round));
        bus.emit(TestEvent::A(2 * round + 1));
        sent.send(round).unwrap();
        if !done.recv_timeout(DEADLINE).expect("the consumer drains") {
            lost.push(round);
        }
    }
    drop(sent);
    consumer.join().unwrap();
    assert!(
        lost.is_empty(),
        "the newest event was lost in rounds {lost:?}"
    );
}
