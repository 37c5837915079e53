//! Rule 2: a full queue drops its oldest events under the default policy, and
//! never silently: the consumer is told the exact count, it is logged as a
//! warning, and it is counted.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    // The lane of 2 still holds the batch's 2, so it had one place: 3 went
    // for 4, 4 for 5. The gap lies between the batch's 2 and the queue's 5.
    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(2));
    assert_eq!(subscription.recv().await.unwrap_err(), RecvError::Lagged(2));
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
fn a_slow_log_sink_on_a_lagging_subscriber_never_blocks_an_unrelated_emit() {
    const SINK_DELAY: Duration = Duration::from_millis(300);
    let bus = EventBus::new();
    let mut lagging = bus.subscribe_with(TestKind::A, 1, LagPolicy::DropOldest);
    // Another subscriber, of another kind, whose emits are timed.
    let _unrelated = bus.subscribe(TestKind::B);
    let sink = SlowSink::new("lagged", SINK_DELAY);
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

    // Time emits of B while the sink is taking its time over a warning.
    let warned = sink.wait_entered(DEADLINE);
    let mut slowest = Duration::ZERO;
    let mut timed = 0u64;
    let timing = Instant::now();
    while warned && timing.elapsed() < SINK_DELAY * 2 {
        let emit = Instant::now();
        bus.emit(TestEvent::B(timed));
        slowest = slowest.max(emit.elapsed());
        timed += 1;
    }
    stop.store(true, Ordering::Relaxed);
    lagger.join().unwrap();
    let lags = consumer.join().unwrap();

    assert!(warned, "no lag warning was logged within {DEADLINE:?}");
    assert!(lags > 0);
    assert!(
        slowest < SINK_DELAY / 3,
        "the slowest of {timed} emits of B to an unrelated subscriber took {slowest:?}, while \
         the lagging subscriber's log sink took {SINK_DELAY:?} over a warning"
    );
}

#[tokio::test]
async fn a_full_lane_counts_the_batch_the_consumer_has_taken() {
    const CAPACITY: usize = 8;
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, CAPACITY, LagPolicy::DropOldest);
    for i in 0..CAPACITY as u64 {
        bus.emit(TestEvent::A(i));
    }
    // The consumer takes the whole lane as a batch and hands out one: the
    // seven it still holds cannot be dropped any more.
    assert_eq!(**subscription.try_recv().unwrap(), TestEvent::A(0));
    for i in 8..20 {
        bus.emit(TestEvent::A(i));
        assert!(
            subscription.len() <= CAPACITY,
            "{} held",
            subscription.len()
        );
    }
    // 7 taken and one place: 8 to 18 came and went, 19 is queued.
    for i in 1..8 {
        assert_eq!(**subscription.try_recv().unwrap(), TestEvent::A(i));
    }
    assert_eq!(
        subscription.try_recv().unwrap_err(),
        TryRecvError::Lagged(11)
    );
    assert_eq!(**subscription.try_recv().unwrap(), TestEvent::A(19));
    assert_eq!(subscription.delivered() + subscription.dropped(), 20);
}
