//! Priority lanes: higher priority first, emit order within a priority, the
//! fairness bound, and per-lane capacity, lag and backpressure.

mod support;

use std::sync::{Arc, Mutex};

use event_bus::{
    DomainEvent, Envelope, Event, EventBus, EventKind, HandlerError, KindSet, LagPolicy, Listener,
    ListenerOptions, Priority, TryRecvError,
};
use futures::FutureExt;
use support::within;
use tokio::sync::{Semaphore, watch};

#[derive(Debug, Clone, PartialEq, Eq, DomainEvent)]
enum Job {
    Routine(u64),
    #[event(priority = "high")]
    Urgent(u64),
    #[event(priority = "low")]
    Chore(u64),
}

impl Job {
    fn value(&self) -> u64 {
        match *self {
            Job::Routine(v) | Job::Urgent(v) | Job::Chore(v) => v,
        }
    }
}

/// Records what it handles; its first event waits until the test lets it go,
/// so the test can queue events behind it.
struct Held {
    entered: watch::Sender<bool>,
    release: Arc<Semaphore>,
    seen: Arc<Mutex<Vec<Job>>>,
    handled: watch::Sender<usize>,
}

impl Listener<Job> for Held {
    async fn handle(
        &self,
        event: Arc<Envelope<Job>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        if !*self.entered.borrow() {
            self.entered.send_replace(true);
            let _ = self.release.acquire().await?;
        }
        self.seen.lock().unwrap().push(event.event().clone());
        self.handled.send_modify(|n| *n += 1);
        Ok(())
    }
}

#[test]
fn kinds_carry_the_priority_their_variant_declares() {
    assert_eq!(JobKind::Routine.priority(), Priority::Normal);
    assert_eq!(JobKind::Urgent.priority(), Priority::High);
    assert_eq!(JobKind::Chore.priority(), Priority::Low);
    assert_eq!(Envelope::new(Job::Urgent(1)).priority(), Priority::High);
    assert_eq!(
        Envelope::with_priority(Job::Urgent(1), Priority::Low).priority(),
        Priority::Low
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_event_overtakes_ten_thousand_queued_normal_ones() {
    let bus = EventBus::new();
    let (entered, mut entered_rx) = watch::channel(false);
    let (handled, mut handled_rx) = watch::channel(0);
    let release = Arc::new(Semaphore::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = Held {
        entered,
        release: release.clone(),
        seen: seen.clone(),
        handled,
    };
    bus.spawn_with(listener, ListenerOptions::new().capacity(20_000));

    bus.emit(Job::Routine(0));
    within("first event in the handler", entered_rx.wait_for(|&e| e))
        .await
        .unwrap();
    for value in 1..=10_000 {
        bus.emit(Job::Routine(value));
    }
    bus.emit(Job::Urgent(99_999));
    release.add_permits(1);
    within("every event handled", handled_rx.wait_for(|&n| n == 10_002))
        .await
        .unwrap();

    let seen = seen.lock().unwrap();
    // The event already in the handler finishes; the urgent one is next.
    assert_eq!(seen[0], Job::Routine(0));
    assert_eq!(seen[1], Job::Urgent(99_999));
    let rest: Vec<u64> = seen[2..].iter().map(Job::value).collect();
    assert_eq!(rest, (1..=10_000).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_high_priority_event_overtakes_a_batch_the_receiver_already_took() {
    let bus = EventBus::new();
    let mut jobs = bus.subscribe(KindSet::all());
    for value in 0..10 {
        bus.emit(Job::Routine(value));
    }
    // The first receive takes all ten into the receiver's batch.
    assert_eq!(jobs.try_recv().unwrap().value(), 0);
    bus.emit(Job::Urgent(100));
    assert_eq!(jobs.try_recv().unwrap().value(), 100);
    assert_eq!(jobs.try_recv().unwrap().value(), 1);
}

#[test]
fn events_of_one_priority_keep_their_emit_order() {
    // Strictly by priority: every high, then every normal, then every low,
    // each in emit order.
    let bus = EventBus::builder().fairness(usize::MAX).build();
    let mut jobs = bus.subscribe_with(KindSet::all(), 1000, LagPolicy::DropOldest);
    let mut interleaved = Vec::new();
    for value in 0..300u64 {
        bus.emit(match value * 7 % 3 {
            0 => Job::Routine(value),
            1 => Job::Urgent(value),
            _ => Job::Chore(value),
        });
        // Interleave receives with emits, so taken batches and new arrivals mix.
        if value % 5 == 0 {
            interleaved.push(jobs.try_recv().unwrap().event().clone());
        }
    }
    let mut received = Vec::new();
    while let Ok(envelope) = jobs.try_recv() {
        received.push(envelope.event().clone());
    }
    let everything: Vec<&Job> = interleaved.iter().chain(&received).collect();
    assert_eq!(everything.len(), 300);
    for lane in Priority::ALL {
        let got: Vec<u64> = everything
            .iter()
            .filter(|j| j.kind().priority() == lane)
            .map(|j| j.value())
            .collect();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "{lane} events out of emit order: {got:?}"
        );
    }
    // Everything left after the interleaved receives was queued together:
    // highs come out first, lows last.
    let priorities: Vec<Priority> = received.iter().map(|j| j.kind().priority()).collect();
    assert!(
        priorities.windows(2).all(|w| w[0] >= w[1]),
        "not served highest first: {priorities:?}"
    );
}

#[test]
fn the_fairness_bound_serves_waiting_lower_lanes_in_a_fixed_pattern() {
    let bus = EventBus::builder().fairness(2).build();
    let mut jobs = bus.subscribe(KindSet::all());
    for value in 1..=6 {
        bus.emit(Job::Urgent(value));
    }
    for value in 1..=3 {
        bus.emit(Job::Routine(10 + value));
    }
    for value in 1..=2 {
        bus.emit(Job::Chore(20 + value));
    }
    let order: Vec<u64> = std::iter::from_fn(|| jobs.try_recv().ok())
        .map(|e| e.value())
        .collect();
    // Each waiting lane is passed by at most two higher events; when two
    // lanes are due, the lower goes first (it is passed by the other too).
    assert_eq!(order, [1, 2, 21, 11, 3, 22, 4, 12, 5, 6, 13]);
}

/// For every event received, how many events of higher priority were
/// received while it was queued and its lane had nothing received since.
fn longest_wait(received: &[Priority]) -> usize {
    let mut worst = 0;
    for lane in Priority::ALL {
        let mut passed = 0;
        for (at, &priority) in received.iter().enumerate() {
            let lane_waiting = received[at..].contains(&lane);
            if priority == lane {
                passed = 0;
            } else if priority > lane && lane_waiting {
                passed += 1;
                worst = worst.max(passed);
            }
        }
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fairness_bound_holds_under_a_steady_high_priority_stream() {
    let bus = EventBus::builder().fairness(8).build();
    let mut jobs = bus.subscribe_with(KindSet::all(), 100_000, LagPolicy::DropOldest);
    for value in 0..200 {
        bus.emit(Job::Routine(value));
        bus.emit(Job::Chore(value));
        bus.emit(Job::Urgent(value));
    }
    // A steady stream: high events keep arriving from another task while
    // the subscriber receives, so the high lane is never empty for long.
    let emitter = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for value in 0..20_000 {
                bus.emit(Job::Urgent(value));
                if value % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut received = Vec::new();
    let mut lower = 0;
    while lower < 400 {
        let envelope = within("next event", jobs.recv()).await.unwrap();
        if envelope.priority() != Priority::High {
            lower += 1;
        }
        received.push(envelope.priority());
        if received.len() % 16 == 0 {
            // Let the stream in.
            tokio::task::yield_now().await;
        }
    }
    emitter.await.unwrap();
    let worst = longest_wait(&received);
    assert!(worst <= 8, "a waiting event was passed {worst} times");
    let highs = received.iter().filter(|&&p| p == Priority::High).count();
    assert!(
        highs >= 200,
        "the stream never competed: {highs} high events"
    );
}

#[test]
fn each_lane_has_its_own_capacity_and_accounting() {
    let bus = EventBus::new();
    let mut jobs = bus.subscribe_with(KindSet::all(), 2, LagPolicy::DropOldest);
    for value in 0..5 {
        bus.emit(Job::Routine(value));
    }
    bus.emit(Job::Urgent(10));
    bus.emit(Job::Urgent(11));

    // A flood of normal events never pushes out a high one.
    let normal = jobs.lane(Priority::Normal);
    let high = jobs.lane(Priority::High);
    assert_eq!((normal.dropped, normal.queue_depth), (3, 2));
    assert_eq!((high.dropped, high.queue_depth), (0, 2));
    assert_eq!(jobs.dropped(), 3);

    assert_eq!(jobs.try_recv().unwrap_err(), TryRecvError::Lagged(3));
    let rest: Vec<u64> = std::iter::from_fn(|| jobs.try_recv().ok())
        .map(|e| e.value())
        .collect();
    assert_eq!(rest, [10, 11, 3, 4]);
    for lane in Priority::ALL {
        let counts = jobs.lane(lane);
        assert_eq!(counts.priority, lane);
        let emitted = match lane {
            Priority::High => 2,
            Priority::Normal => 5,
            Priority::Low => 0,
        };
        assert_eq!(counts.delivered + counts.dropped, emitted, "{lane}");
    }
}

#[tokio::test]
async fn emit_wait_of_a_high_event_does_not_wait_behind_a_full_normal_lane() {
    let bus = EventBus::new();
    let mut jobs = bus.subscribe_with(KindSet::all(), 2, LagPolicy::Backpressure);
    bus.emit_wait(Job::Routine(0)).await;
    bus.emit_wait(Job::Routine(1)).await;

    // The normal lane is full: another normal event waits for room...
    let mut normal = Box::pin(bus.emit_wait(Job::Routine(2)));
    assert!((&mut normal).now_or_never().is_none());
    // ...but a high one has its own lane.
    within("high emit_wait", bus.emit_wait(Job::Urgent(9))).await;
    // So does a normal event raised to high at the emit.
    within(
        "raised emit_wait",
        bus.with_priority(Priority::High).emit_wait(Job::Routine(8)),
    )
    .await;

    assert_eq!(jobs.recv().await.unwrap().value(), 9);
    assert_eq!(jobs.recv().await.unwrap().value(), 8);
    assert_eq!(jobs.recv().await.unwrap().value(), 0);
    within("room in the normal lane", normal).await;
    assert_eq!(jobs.overflowed(), 0);
    let values: Vec<u64> = std::iter::from_fn(|| jobs.try_recv().ok())
        .map(|e| e.value())
        .collect();
    assert_eq!(values, [1, 2]);
}

#[tokio::test]
async fn the_emit_can_override_the_kind_priority() {
    let bus = EventBus::new();
    let mut jobs = bus.subscribe(KindSet::all());
    bus.with_priority(Priority::Low).emit(Job::Urgent(1));
    bus.emit(Job::Routine(2));
    bus.with_priority(Priority::High).emit(Job::Chore(3));
    let order: Vec<(u64, Priority)> = std::iter::from_fn(|| jobs.try_recv().ok())
        .map(|e| (e.value(), e.priority()))
        .collect();
    assert_eq!(
        order,
        [
            (3, Priority::High),
            (2, Priority::Normal),
            (1, Priority::Low)
        ]
    );
}

struct Ignore;

impl Listener<Job> for Ignore {
    async fn handle(&self, _: Arc<Envelope<Job>>, _: event_bus::Meta) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[tokio::test]
async fn listener_metrics_count_each_lane() {
    let bus = EventBus::new();
    let handle = bus.spawn(Ignore);
    bus.emit(Job::Urgent(1));
    bus.emit(Job::Routine(2));
    bus.emit(Job::Routine(3));
    within("quiesce", bus.quiesce()).await;
    let metrics = handle.metrics();
    assert_eq!(metrics.lane(Priority::High).delivered, 1);
    assert_eq!(metrics.lane(Priority::Normal).delivered, 2);
    assert_eq!(metrics.lane(Priority::Low).delivered, 0);
    assert_eq!(metrics.delivered, 3);
}
