//! The backpressure policy never drops: `emit_wait` waits for room, `emit`
//! queues past capacity and counts it.

mod support;

use std::sync::{Arc, Mutex};

use event_bus::{
    Envelope, EventBus, HandlerError, KindSet, LagPolicy, Listener, ListenerOptions, RecvError,
};
use futures::FutureExt;
use support::{TestEvent, TestKind, within};

/// Yields before each event so the emitter keeps finding the queue full.
#[derive(Clone, Default)]
struct SlowSum(Arc<Mutex<Vec<u64>>>);

impl Listener<TestEvent> for SlowSum {
    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        tokio::task::yield_now().await;
        self.0.lock().unwrap().push(event.value());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_loses_nothing_with_a_slow_listener_and_100_000_events() {
    const EVENTS: u64 = 100_000;
    let bus = EventBus::new();
    let seen = SlowSum::default();
    let listener = bus.spawn_with(
        seen.clone(),
        ListenerOptions::new()
            .capacity(16)
            .lag_policy(LagPolicy::Backpressure),
    );

    let emitter = tokio::spawn({
        let bus = bus.clone();
        async move {
            for i in 0..EVENTS {
                bus.emit_wait(TestEvent::A(i)).await;
            }
        }
    });
    within("emitter", emitter).await.unwrap();
    within("quiesce", bus.quiesce()).await;

    let metrics = listener.metrics();
    assert_eq!(
        (metrics.handled, metrics.dropped, metrics.overflowed),
        (EVENTS, 0, 0)
    );
    assert_eq!(*seen.0.lock().unwrap(), (0..EVENTS).collect::<Vec<_>>());
}

#[tokio::test]
async fn emit_wait_waits_for_room() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, 2, LagPolicy::Backpressure);
    bus.emit_wait(TestEvent::A(0)).await;
    bus.emit_wait(TestEvent::A(1)).await;

    let mut third = Box::pin(bus.emit_wait(TestEvent::A(2)));
    assert!((&mut third).now_or_never().is_none(), "queue is full");
    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(0));
    within("emit_wait after room", third).await;

    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(1));
    assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(2));
    assert_eq!((subscription.dropped(), subscription.overflowed()), (0, 0));
}

#[tokio::test]
async fn emit_never_blocks_and_counts_overflow_past_capacity() {
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, 2, LagPolicy::Backpressure);
    // Up to twice the capacity: queued, nothing dropped.
    for i in 0..4 {
        bus.emit(TestEvent::A(i));
    }
    assert_eq!(subscription.len(), 4);
    assert_eq!((subscription.dropped(), subscription.overflowed()), (0, 2));
    for i in 0..4 {
        assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(i));
    }
}

#[tokio::test]
async fn emit_past_twice_the_capacity_drops_the_oldest_and_reports_the_lag() {
    const CAPACITY: usize = 8;
    const EMITTED: u64 = 100_000;
    const CEILING: u64 = 2 * CAPACITY as u64;
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, CAPACITY, LagPolicy::Backpressure);
    for i in 0..EMITTED {
        bus.emit(TestEvent::A(i));
    }

    let queued = subscription.len();
    assert!(
        queued as u64 <= CEILING,
        "{queued} queued in a lane of {CAPACITY}"
    );
    assert_eq!(
        subscription.delivered() + subscription.dropped() + queued as u64,
        EMITTED
    );
    assert_eq!(subscription.dropped(), EMITTED - CEILING);
    assert!(subscription.overflowed() >= CEILING - CAPACITY as u64);
    assert_eq!(
        subscription.recv().await.unwrap_err(),
        RecvError::Lagged(EMITTED - CEILING)
    );
    for i in EMITTED - CEILING..EMITTED {
        assert_eq!(**subscription.recv().await.unwrap(), TestEvent::A(i));
    }
    assert!(subscription.is_empty());
}

#[tokio::test]
async fn cancelled_emit_wait_emits_nothing_and_releases_its_room() {
    let bus = EventBus::new();
    let mut roomy = bus.subscribe_with(TestKind::A, 1, LagPolicy::Backpressure);
    let mut full = bus.subscribe_with(TestKind::A, 1, LagPolicy::Backpressure);
    bus.emit_wait(TestEvent::A(0)).await;
    assert_eq!(**roomy.recv().await.unwrap(), TestEvent::A(0));

    // Reserves `roomy`'s only place, then waits on `full`; then is dropped.
    let mut cancelled = Box::pin(bus.emit_wait(TestEvent::A(1)));
    assert!((&mut cancelled).now_or_never().is_none());
    drop(cancelled);

    assert_eq!(**full.recv().await.unwrap(), TestEvent::A(0));
    within(
        "emit_wait into released room",
        bus.emit_wait(TestEvent::A(2)),
    )
    .await;
    assert_eq!(**roomy.recv().await.unwrap(), TestEvent::A(2));
    assert_eq!(**full.recv().await.unwrap(), TestEvent::A(2));
}

#[tokio::test]
async fn emit_wait_does_not_wait_for_drop_oldest_subscribers() {
    let bus = EventBus::new();
    let mut lossy = bus.subscribe_with(KindSet::all(), 1, LagPolicy::DropOldest);
    for i in 0..3 {
        within("emit_wait", bus.emit_wait(TestEvent::B(i))).await;
    }
    assert_eq!(lossy.recv().await.unwrap_err(), RecvError::Lagged(2));
}

#[tokio::test]
async fn shutdown_releases_a_waiting_emitter() {
    let bus = EventBus::new();
    let _full = bus.subscribe_with(TestKind::A, 1, LagPolicy::Backpressure);
    bus.emit_wait(TestEvent::A(0)).await;

    let waiting = tokio::spawn({
        let bus = bus.clone();
        async move { bus.emit_wait(TestEvent::A(1)).await }
    });
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    bus.shutdown(support::DEADLINE).await;
    within("released emitter", waiting).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_emit_wait_callers_never_take_a_queue_past_its_capacity() {
    const CAPACITY: usize = 4;
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, CAPACITY, LagPolicy::Backpressure);
    let emitters: Vec<_> = (0..4)
        .map(|e| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..2_000 {
                    bus.emit_wait(TestEvent::A(e * 10_000 + i)).await;
                }
            })
        })
        .collect();

    let mut most_queued = 0;
    for _ in 0..8_000 {
        most_queued = most_queued.max(subscription.len());
        within("an event", subscription.recv()).await.unwrap();
        if most_queued == CAPACITY {
            tokio::task::yield_now().await;
        }
    }
    for emitter in emitters {
        emitter.await.unwrap();
    }
    assert!(most_queued <= CAPACITY, "{most_queued} queued");
    assert_eq!((subscription.dropped(), subscription.overflowed()), (0, 0));
}

#[tokio::test]
async fn an_aborted_backpressure_listener_does_not_hold_emitters() {
    let bus = EventBus::new();
    let stuck = bus.spawn_with(
        support::Gated(support::Gate::closed()),
        ListenerOptions::new()
            .capacity(2)
            .lag_policy(LagPolicy::Backpressure),
    );
    for i in 0..3 {
        within("emit_wait", bus.emit_wait(TestEvent::A(i))).await;
    }
    let mut blocked = Box::pin(bus.emit_wait(TestEvent::A(3)));
    assert!((&mut blocked).now_or_never().is_none(), "the queue is full");

    stuck.abort();
    within("aborted listener to end", stuck.finished()).await;
    within("emit_wait after the abort", blocked).await;
    within("emit_wait to nobody", bus.emit_wait(TestEvent::A(4))).await;
    let metrics = stuck.metrics();
    assert_eq!(metrics.handled, 0);
    assert_eq!(metrics.queue_depth + metrics.in_flight, 3);
}

#[tokio::test]
async fn emit_wait_completes_once_the_lane_has_room_though_others_hold_reservations() {
    let bus = EventBus::new();
    // `shared` wants A and B; `stuck` wants A only and is never read.
    let mut shared = bus.subscribe_with([TestKind::A, TestKind::B], 4, LagPolicy::Backpressure);
    let stuck = bus.subscribe_with(TestKind::A, 4, LagPolicy::Backpressure);
    for i in 0..4 {
        within("emit_wait with room", bus.emit_wait(TestEvent::A(i))).await;
    }
    for i in 0..4 {
        assert_eq!(**shared.recv().await.unwrap(), TestEvent::A(i));
    }
    assert_eq!((shared.len(), stuck.len()), (0, 4));

    // Three callers reserve a place in `shared` each, then wait for `stuck`.
    let mut waiting_for_stuck: Vec<_> = (10..13)
        .map(|i| Box::pin(bus.emit_wait(TestEvent::A(i))))
        .collect();
    for waiting in &mut waiting_for_stuck {
        assert!(waiting.now_or_never().is_none(), "`stuck` is full");
    }
    // `shared` is now full: one event queued, three places reserved.
    bus.emit(TestEvent::B(0));
    assert_eq!(shared.overflowed(), 0);
    let mut b = Box::pin(bus.emit_wait(TestEvent::B(1)));
    assert!((&mut b).now_or_never().is_none(), "`shared` is full");

    // One place is free again; `stuck` is not on B's way.
    assert_eq!(**shared.recv().await.unwrap(), TestEvent::B(0));
    within("emit_wait(B) into the freed place", b).await;
    assert_eq!(**shared.recv().await.unwrap(), TestEvent::B(1));
    assert_eq!((shared.dropped(), shared.overflowed()), (0, 0));
    for waiting in &mut waiting_for_stuck {
        assert!(waiting.now_or_never().is_none(), "`stuck` is still full");
    }
}

#[tokio::test]
async fn emit_wait_waits_for_room_in_a_subscriber_that_joined_while_it_waited() {
    let bus = EventBus::new();
    let mut first = bus.subscribe_with(TestKind::A, 1, LagPolicy::Backpressure);
    within("emit_wait with room", bus.emit_wait(TestEvent::A(0))).await;
    let mut waiting = Box::pin(bus.emit_wait(TestEvent::A(1)));
    assert!((&mut waiting).now_or_never().is_none(), "`first` is full");

    // Joins while the emitter waits, and fills up at once.
    let mut late = bus.subscribe_with([TestKind::A, TestKind::B], 1, LagPolicy::Backpressure);
    bus.emit(TestEvent::B(0));
    assert_eq!((late.len(), late.overflowed()), (1, 0));

    // `first` has room now, `late` still has none.
    assert_eq!(**first.recv().await.unwrap(), TestEvent::A(0));
    let done = (&mut waiting).now_or_never().is_some();
    assert!(
        late.len() <= late.capacity(),
        "emit_wait left `late` holding {} events, past its capacity of 1 (done: {done})",
        late.len()
    );
    assert_eq!(late.overflowed(), 0, "emit_wait counted as an overflow");

    assert_eq!(**late.recv().await.unwrap(), TestEvent::B(0));
    if !done {
        within("emit_wait once `late` has room", waiting).await;
    }
    assert_eq!(**first.recv().await.unwrap(), TestEvent::A(1));
    assert_eq!(**late.recv().await.unwrap(), TestEvent::A(1));
    assert_eq!((late.dropped(), late.overflowed()), (0, 0));
}

#[tokio::test]
async fn the_ceiling_bounds_what_is_queued_with_the_taken_batch_on_top() {
    const CAPACITY: usize = 32;
    let ceiling = CAPACITY * event_bus::OVERFLOW_FACTOR;
    let bus = EventBus::new();
    let mut subscription = bus.subscribe_with(TestKind::A, CAPACITY, LagPolicy::Backpressure);
    let mut emitted = 0;
    for _ in 0..ceiling {
        bus.emit(TestEvent::A(emitted));
        emitted += 1;
    }
    // The consumer takes a batch of 32 and hands out its first event.
    assert_eq!(**subscription.try_recv().unwrap(), TestEvent::A(0));
    for _ in 0..ceiling {
        bus.emit(TestEvent::A(emitted));
        emitted += 1;
        assert!(
            subscription.len() < ceiling + CAPACITY,
            "{} held",
            subscription.len()
        );
    }
    let lane = subscription.lane(event_bus::Priority::Normal);
    assert_eq!(lane.queue_depth, ceiling + CAPACITY - 1);
    assert_eq!(
        lane.delivered + lane.dropped + lane.queue_depth as u64,
        emitted
    );
    // The newest events are all there: the drops were of the oldest queued.
    let mut last = 0;
    loop {
        match subscription.try_recv() {
            Ok(event) => last = event.value(),
            Err(event_bus::TryRecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
    assert_eq!(last, emitted - 1);
}

#[tokio::test]
async fn an_emit_wait_push_never_drops_an_event_when_plain_emits_filled_the_lane() {
    let bus = EventBus::new();
    let mut both = bus.subscribe_with([TestKind::A, TestKind::B], 2, LagPolicy::Backpressure);
    let mut full = bus.subscribe_with(TestKind::B, 1, LagPolicy::Backpressure);
    bus.emit_wait(TestEvent::B(0)).await;
    assert_eq!(**both.recv().await.unwrap(), TestEvent::B(0));
    bus.emit_wait(TestEvent::A(1)).await;
    // Reserves `both`'s last place, then waits for `full`.
    let mut waiting = Box::pin(bus.emit_wait(TestEvent::B(2)));
    assert!((&mut waiting).now_or_never().is_none());
    // Plain emits overflow `both` up to its ceiling, which counts the place
    // promised to the waiting emit.
    for i in 10..20 {
        bus.emit(TestEvent::A(i));
    }
    let dropped_by_plain_emits = both.dropped();
    assert!(
        both.len() < 2 * event_bus::OVERFLOW_FACTOR,
        "{}",
        both.len()
    );
    assert_eq!(**full.recv().await.unwrap(), TestEvent::B(0));
    within("the waiting emit_wait", waiting).await;
    // Its push found the place it was promised: it dropped nothing.
    assert_eq!(both.dropped(), dropped_by_plain_emits);

    let mut received = Vec::new();
    loop {
        match both.try_recv() {
            Ok(next) => received.push(next.value()),
            Err(event_bus::TryRecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
    assert_eq!(received.last(), Some(&2), "{received:?}");
}

#[derive(Debug, event_bus::DomainEvent)]
enum Tracked {
    Item(DropProbe),
}

/// Each drop of a probe: its tag and the name of the thread it ran on.
type Drops = Arc<Mutex<Vec<(u64, Option<String>)>>>;

/// Records the name of the thread its value is dropped on.
#[derive(Debug)]
struct DropProbe {
    tag: u64,
    drops: Drops,
}

impl Drop for DropProbe {
    fn drop(&mut self) {
        let thread = std::thread::current().name().map(str::to_owned);
        self.drops.lock().unwrap().push((self.tag, thread));
    }
}

#[test]
fn a_dropped_subscription_drops_its_events_itself_not_a_waiting_emitter() {
    let drops = Arc::new(Mutex::new(Vec::new()));
    let item = |tag| {
        Tracked::Item(DropProbe {
            tag,
            drops: drops.clone(),
        })
    };
    let bus = EventBus::new();
    let subscription = bus.subscribe_with(TrackedKind::Item, 1, LagPolicy::Backpressure);
    bus.emit(item(0));
    bus.emit(item(1)); // overflows: two queued
    let (waiting_tx, waiting) = std::sync::mpsc::channel();
    let (dropped_tx, dropped) = std::sync::mpsc::channel::<()>();
    let emitter = std::thread::Builder::new()
        .name("emitter".into())
        .spawn({
            let bus = bus.clone();
            let last = item(99);
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    // Waits for room in the full subscription, holding it.
                    let mut emit = Box::pin(bus.emit_wait(last));
                    assert!((&mut emit).now_or_never().is_none());
                    waiting_tx.send(()).unwrap();
                    dropped.recv().unwrap();
                    drop(emit); // the emitter lets go of the queue last
                });
            }
        })
        .unwrap();
    waiting.recv().unwrap();
    drop(subscription);
    dropped_tx.send(()).unwrap();
    emitter.join().unwrap();

    let drops = drops.lock().unwrap();
    let queued: Vec<_> = drops.iter().filter(|(tag, _)| *tag < 99).collect();
    assert_eq!(queued.len(), 2, "{drops:?}");
    assert!(
        queued
            .iter()
            .all(|(_, thread)| thread.as_deref() != Some("emitter")),
        "queued events were dropped on the emitter's thread: {drops:?}"
    );
}
