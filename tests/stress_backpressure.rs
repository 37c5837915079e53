//! Stress: `emit_wait` from many threads, at every priority, into
//! backpressure subscriptions and listeners with small queues, while other
//! backpressure subscribers come and go (some read at once, some sit full
//! for a while), loses nothing, never takes a lane past its capacity, never
//! counts an overflow, and returns once there is room.
//!
//! Each run draws its scenario from a seed, which it prints. Replay one with
//! `EVENT_BUS_STRESS_SEED=<seed> cargo test --test stress_backpressure`; set
//! the runs with `EVENT_BUS_STRESS_ITERS` (default 3).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::{
    Batch, BatchError, BatchListener, Envelope, EventBus, HandlerError, KindSet, LagPolicy,
    Listener, ListenerOptions, Priority, RecvError, Subscription, TryRecvError,
};
use support::{Breaches, DEADLINE, Rng, TestEvent, TestKind, random_interests, stress_seeds};
use tokio::sync::watch;

const KINDS: usize = TestKind::ALL_KINDS.len();
const LANES: usize = Priority::ALL.len();

fn lane_of(priority: Priority) -> usize {
    Priority::ALL.iter().position(|&p| p == priority).unwrap()
}

/// Completed `emit_wait` calls per kind and lane.
#[derive(Default)]
struct Emitted([[AtomicU64; LANES]; KINDS]);

impl Emitted {
    fn of(&self, interests: &KindSet<TestKind>, lane: usize) -> u64 {
        interests
            .iter()
            .map(|kind| self.0[kind as usize][lane].load(Ordering::SeqCst))
            .sum()
    }
}

/// Checks what a backpressure subscription holds after a receive: no lane
/// past its capacity, no overflow, no drop.
fn check_held(breaches: &Breaches, who: &str, subscription: &Subscription<TestEvent>) {
    let capacity = subscription.capacity();
    for priority in Priority::ALL {
        let lane = subscription.lane(priority);
        if lane.queue_depth > capacity {
            breaches.record("emit_wait never takes a lane past its capacity", || {
                format!(
                    "{who}: lane {priority:?} holds {} of {capacity}",
                    lane.queue_depth
                )
            });
        }
    }
    if subscription.overflowed() + subscription.dropped() > 0 {
        breaches.record("emit_wait neither overflows nor drops", || {
            format!(
                "{who}: {} overflowed, {} dropped",
                subscription.overflowed(),
                subscription.dropped()
            )
        });
    }
}

/// Checks the interests of what a subscriber is handed and, when it takes
/// one at a time, the per-lane order.
struct Order {
    who: String,
    interests: KindSet<TestKind>,
    ordered: bool,
    last: [u64; LANES],
    received: [u64; LANES],
}

impl Order {
    fn new(who: String, interests: KindSet<TestKind>, ordered: bool) -> Self {
        Self {
            who,
            interests,
            ordered,
            last: [0; LANES],
            received: [0; LANES],
        }
    }

    fn saw(&mut self, breaches: &Breaches, event: &Envelope<TestEvent>) {
        if !self.interests.contains(event.kind()) {
            breaches.record("only kinds of interest", || {
                format!("{}: received {:?}", self.who, event.kind())
            });
        }
        let lane = lane_of(event.priority());
        if self.ordered && event.sequence() <= self.last[lane] {
            breaches.record("per lane, in sequence order", || {
                format!(
                    "{}: #{} after #{}",
                    self.who,
                    event.sequence(),
                    self.last[lane]
                )
            });
        }
        self.last[lane] = event.sequence();
        self.received[lane] += 1;
    }
}

async fn consume(
    breaches: Breaches,
    who: String,
    mut subscription: Subscription<TestEvent>,
    slow: u32,
    mut done: watch::Receiver<bool>,
) -> (Order, Subscription<TestEvent>) {
    let mut order = Order::new(who.clone(), subscription.interests().clone(), true);
    for _ in 0..10_000_000u64 {
        let next = tokio::select! {
            biased;
            _ = done.wait_for(|&done| done) => break,
            next = subscription.recv() => next,
        };
        match next {
            Ok(event) => order.saw(&breaches, &event),
            Err(RecvError::Lagged(n)) => {
                breaches.record("emit_wait neither overflows nor drops", || {
                    format!("{who}: lagged by {n}")
                });
            }
            Err(RecvError::Closed) => break,
        }
        check_held(&breaches, &who, &subscription);
        for _ in 0..slow {
            tokio::task::yield_now().await;
        }
    }
    for _ in 0..10_000_000u64 {
        match subscription.try_recv() {
            Ok(event) => order.saw(&breaches, &event),
            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            Err(TryRecvError::Lagged(n)) => {
                breaches.record("emit_wait neither overflows nor drops", || {
                    format!("{who}: lagged by {n}")
                });
            }
        }
    }
    (order, subscription)
}

/// A backpressure listener that records what it handles.
#[derive(Clone)]
struct Lossless {
    name: String,
    interests: KindSet<TestKind>,
    yields: u32,
    order: Arc<Mutex<Order>>,
    breaches: Breaches,
}

impl Listener<TestEvent> for Lossless {
    fn name(&self) -> &str {
        &self.name
    }

    fn interests(&self) -> KindSet<TestKind> {
        self.interests.clone()
    }

    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        self.order.lock().unwrap().saw(&self.breaches, &event);
        for _ in 0..self.yields {
            tokio::task::yield_now().await;
        }
        Ok(())
    }
}

impl BatchListener<TestEvent> for Lossless {
    fn name(&self) -> &str {
        &self.name
    }

    fn interests(&self) -> KindSet<TestKind> {
        self.interests.clone()
    }

    async fn handle_batch(&self, batch: &Batch<TestEvent>) -> Result<(), BatchError> {
        {
            let mut order = self.order.lock().unwrap();
            for event in batch.iter() {
                order.saw(&self.breaches, event);
            }
        }
        for _ in 0..self.yields {
            tokio::task::yield_now().await;
        }
        Ok(())
    }
}

fn scenario(seed: u64) {
    println!("seed {seed} (replay: EVENT_BUS_STRESS_SEED={seed})");
    let mut rng = Rng::new(seed);
    let runtimes = [0, 1].map(|_| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    });
    let bus = EventBus::<TestEvent>::new();
    let breaches = Breaches::default();
    let emitted = Arc::new(Emitted::default());
    let (done_tx, done_rx) = watch::channel(false);

    // Backpressure subscriptions there before the first emit.
    let mut consumers = Vec::new();
    for i in 0..2 + rng.below(4) {
        let interests = random_interests(&mut rng);
        let capacity = 1 + rng.below(8) as usize;
        let who = format!("subscription-{i} ({interests:?}, capacity {capacity})");
        println!("  {who}");
        let subscription = bus.subscribe_with(interests, capacity, LagPolicy::Backpressure);
        let slow = *rng.pick(&[0, 1, 5]);
        consumers.push(rng.pick(&runtimes).spawn(consume(
            breaches.clone(),
            who,
            subscription,
            slow,
            done_rx.clone(),
        )));
    }
    // Never read until the end: emit_wait must not wait for it.
    let lossy = bus.subscribe_with(
        random_interests(&mut rng),
        1 + rng.below(4) as usize,
        LagPolicy::DropOldest,
    );
    let mut listeners = Vec::new();
    for i in 0..1 + rng.below(3) {
        let interests = random_interests(&mut rng);
        let capacity = 1 + rng.below(8) as usize;
        let concurrency = 1 + rng.below(3) as usize;
        let name = format!("listener-{i}");
        let lossless = Lossless {
            name: name.clone(),
            interests: interests.clone(),
            yields: *rng.pick(&[0, 1, 3]),
            order: Arc::new(Mutex::new(Order::new(
                name.clone(),
                interests.clone(),
                concurrency == 1,
            ))),
            breaches: breaches.clone(),
        };
        let options = ListenerOptions::new()
            .capacity(capacity)
            .lag_policy(LagPolicy::Backpressure)
            .concurrency(concurrency);
        let _entered = rng.pick(&runtimes).enter();
        let batch = rng.one_in(3);
        println!(
            "  {name}: {interests:?}, capacity {capacity}, concurrency {concurrency}, batch {batch}"
        );
        // It is both kinds of listener: say which it is spawned as.
        let handle = if batch {
            bus.spawn_with::<_, event_bus::InBatches>(
                lossless.clone(),
                options.max_batch(1 + rng.below(8) as usize),
            )
        } else {
            bus.spawn_with::<_, event_bus::OneByOne>(lossless.clone(), options)
        };
        listeners.push((handle, lossless));
    }

    let emitters: Vec<_> = (0..3 + rng.below(3) as usize)
        .map(|e| {
            let (bus, breaches, emitted) = (bus.clone(), breaches.clone(), emitted.clone());
            let handle = runtimes[e % 2].handle().clone();
            let (seed, emits) = (rng.next_u64(), 5_000 + rng.below(10_000));
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed);
                for i in 0..emits {
                    let kind = *rng.pick(&TestKind::ALL_KINDS);
                    let priority = *rng.pick(&[
                        Priority::High,
                        Priority::Normal,
                        Priority::Normal,
                        Priority::Low,
                    ]);
                    let emit = bus
                        .with_priority(priority)
                        .emit_wait(TestEvent::of(kind, i));
                    let waited =
                        handle.block_on(async { tokio::time::timeout(DEADLINE, emit).await });
                    if waited.is_err() {
                        breaches.record("emit_wait returns once there is room", || {
                            format!("emit_wait of {kind:?} at {priority:?} waited {DEADLINE:?}")
                        });
                        return;
                    }
                    emitted.0[kind as usize][lane_of(priority)].fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // Meanwhile, backpressure subscribers come and go.
    let churn = runtimes[0].spawn({
        let (bus, breaches) = (bus.clone(), breaches.clone());
        let seed = rng.next_u64();
        async move {
            let mut rng = Rng::new(seed);
            for step in 0..60 + rng.below(60) {
                let interests = random_interests(&mut rng);
                let capacity = 1 + rng.below(4) as usize;
                let who = format!("churn {step} ({interests:?}, capacity {capacity})");
                let mut subscription =
                    bus.subscribe_with(interests, capacity, LagPolicy::Backpressure);
                if rng.one_in(3) {
                    // Sit full for a while: emitters wait on it.
                    for _ in 0..rng.below(500) {
                        tokio::task::yield_now().await;
                    }
                }
                for _ in 0..rng.below(40) {
                    let next =
                        tokio::time::timeout(Duration::from_millis(20), subscription.recv()).await;
                    check_held(&breaches, &who, &subscription);
                    if !matches!(next, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
    });

    for emitter in emitters {
        emitter.join().unwrap();
    }
    let churned = runtimes[0].block_on(async { tokio::time::timeout(DEADLINE * 3, churn).await });
    if churned.is_err() {
        breaches.record("churn finishes", || "still running".into());
    }
    let quiesced =
        runtimes[0].block_on(async { tokio::time::timeout(DEADLINE, bus.quiesce()).await });
    if quiesced.is_err() {
        breaches.record("quiesce returns once emitting stopped", || {
            format!("not within {DEADLINE:?}")
        });
    }
    done_tx.send_replace(true);

    // Every subscriber there from the start has every event of interest.
    for consumer in consumers {
        let finished =
            runtimes[0].block_on(async { tokio::time::timeout(DEADLINE, consumer).await });
        let Ok(finished) = finished else {
            breaches.record("consumers finish", || "a consumer is stuck".into());
            continue;
        };
        let (order, subscription) = finished.unwrap();
        for lane in 0..LANES {
            let expected = emitted.of(&order.interests, lane);
            if order.received[lane] != expected {
                breaches.record("nothing lost under backpressure", || {
                    format!(
                        "{}: lane {:?} received {}, of {expected} emitted",
                        order.who,
                        Priority::ALL[lane],
                        order.received[lane]
                    )
                });
            }
        }
        check_held(&breaches, &order.who, &subscription);
    }
    for (handle, lossless) in &listeners {
        let metrics = handle.metrics();
        let order = lossless.order.lock().unwrap();
        for lane in 0..LANES {
            let expected = emitted.of(&lossless.interests, lane);
            if order.received[lane] != expected || metrics.lanes[lane].delivered != expected {
                breaches.record("nothing lost under backpressure", || {
                    format!(
                        "{}: lane {:?} handled {} and delivered {}, of {expected} emitted",
                        lossless.name,
                        Priority::ALL[lane],
                        order.received[lane],
                        metrics.lanes[lane].delivered
                    )
                });
            }
        }
        if metrics.dropped + metrics.overflowed > 0 {
            breaches.record("emit_wait neither overflows nor drops", || {
                format!("{}: {metrics:?}", lossless.name)
            });
        }
    }
    let lossy_accounted = lossy.delivered() + lossy.dropped() + lossy.len() as u64;
    let lossy_emitted: u64 = (0..LANES).map(|l| emitted.of(lossy.interests(), l)).sum();
    if lossy_accounted != lossy_emitted {
        breaches.record("a drop-oldest subscriber accounts for every event", || {
            format!("{lossy_accounted} accounted of {lossy_emitted}")
        });
    }
    runtimes[0].block_on(bus.shutdown(DEADLINE));
    breaches.assert_none(&format!(
        "seed {seed} (replay: EVENT_BUS_STRESS_SEED={seed})"
    ));
}

#[test]
fn emit_wait_from_many_threads_loses_nothing_while_backpressure_subscribers_come_and_go() {
    for seed in stress_seeds() {
        scenario(seed);
    }
}
