//! Stress: the delivery rules of the crate docs, checked while OS threads
//! and two tokio multi-thread runtimes emit (`emit`, `emit_wait`, every
//! priority), subscribe and unsubscribe, spawn and abort listeners of every
//! shape (failing, panicking, retrying, batching, concurrent, backpressure
//! and drop-oldest, handlers that never wait), call `quiesce` and
//! `shutdown`, and snapshot the counters.
//!
//! Each run draws its scenario from a seed, which it prints. Replay one with
//! `EVENT_BUS_STRESS_SEED=<seed> cargo test --test stress_bus`; set the runs
//! per test with `EVENT_BUS_STRESS_ITERS` (default 3).
//!
//! Rules checked:
//! - per subscriber and per lane, events arrive in sequence order, and only
//!   of the kinds it is interested in;
//! - `delivered + dropped + queued`, per lane, equals the events of interest
//!   emitted while it was subscribed (exact for subscribers that were there
//!   before the first emit, bounded by the emits under way for the others);
//!   a consumer is told every drop (`Lagged`);
//! - at every metrics snapshot, `delivered == handled + dead_lettered +
//!   in_flight`, `failed == retried + dead_lettered`, counters only grow,
//!   and for a listener there before the first emit `delivered + dropped +
//!   queue_depth` equals the bus's count of the kinds it wants;
//! - `emit_wait` loses nothing and never takes a backpressure lane past its
//!   capacity; `emit` never blocks for long;
//! - `quiesce` returns once emitting stopped;
//! - `shutdown` returns within its deadline and a small grace, its report
//!   accounts for every event, and no listener handles anything after it;
//!   every emit is either counted emitted or rejected; every dead letter is
//!   kept or counted evicted.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_bus::{
    Batch, BatchError, BatchListener, Envelope, EventBus, EventKind, HandlerError, KindSet,
    LagPolicy, Listener, ListenerHandle, ListenerOptions, Priority, RecvError, RetryPolicy,
    Subscription, TryRecvError,
};
use support::{
    Breaches, DEADLINE, INJECTED_PANIC, Rng, TestEvent, TestKind, random_interests, stress_seeds,
};
use tokio::runtime::Runtime;
use tokio::sync::watch;

const KINDS: usize = TestKind::ALL_KINDS.len();
const LANES: usize = Priority::ALL.len();

/// Counts per kind and lane.
type Grid = [[u64; LANES]; KINDS];

/// The longest a plain `emit` may take: it never waits, but a thread can
/// be descheduled while it holds a lock.
const EMIT_LIMIT: Duration = Duration::from_millis(250);

/// What `shutdown` may take past its deadline.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// `D` is only ever emitted with `emit_wait`, so a backpressure subscriber
/// of `D` alone must lose nothing and never hold more than its capacity.
const WAIT_ONLY: TestKind = TestKind::D;

fn lane_of(priority: Priority) -> usize {
    Priority::ALL.iter().position(|&p| p == priority).unwrap()
}

fn runtime(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// Emits counted per kind and lane: `started` before the call, `completed`
/// once it returned. An emit that starts after a subscriber registered must
/// reach it; one that completed before it registered cannot.
#[derive(Default)]
struct Tally {
    started: [[AtomicU64; LANES]; KINDS],
    completed: [[AtomicU64; LANES]; KINDS],
    /// `completed` when shutdown was called: later emits may be rejected.
    cutoff: Mutex<Option<Grid>>,
}

impl Tally {
    fn count<R>(&self, kind: TestKind, priority: Priority, emit: impl FnOnce() -> R) -> R {
        let (k, l) = (kind as usize, lane_of(priority));
        self.started[k][l].fetch_add(1, Ordering::SeqCst);
        let result = emit();
        self.completed[k][l].fetch_add(1, Ordering::SeqCst);
        result
    }

    fn read(grid: &[[AtomicU64; LANES]; KINDS]) -> Grid {
        std::array::from_fn(|k| std::array::from_fn(|l| grid[k][l].load(Ordering::SeqCst)))
    }

    fn started(&self) -> Grid {
        Self::read(&self.started)
    }

    fn completed(&self) -> Grid {
        Self::read(&self.completed)
    }

    fn total(grid: &Grid) -> u64 {
        grid.iter().flatten().sum()
    }

    fn cut_off(&self) {
        *self.cutoff.lock().unwrap() = Some(self.completed());
    }

    /// Emits completed before shutdown began, at most `completed`.
    fn accepted(&self, completed: Grid) -> Grid {
        match *self.cutoff.lock().unwrap() {
            None => completed,
            Some(cutoff) => {
                std::array::from_fn(|k| std::array::from_fn(|l| completed[k][l].min(cutoff[k][l])))
            }
        }
    }
}

/// When a subscriber registered: emits completed before, and started by
/// the time it was registered.
#[derive(Debug, Clone, Copy)]
struct Window {
    before: Grid,
    after: Grid,
}

impl Window {
    fn open<T>(tally: &Tally, register: impl FnOnce() -> T) -> (T, Self) {
        let before = tally.completed();
        let registered = register();
        let after = tally.started();
        (registered, Self { before, after })
    }

    /// The least and most events of `lane` a subscriber to `interests`
    /// registered in this window can have been queued, given what was
    /// completed before and started after it was counted.
    fn bounds(
        &self,
        tally: &Tally,
        interests: &KindSet<TestKind>,
        lane: usize,
        completed: Grid,
        started: Grid,
    ) -> (u64, u64) {
        let accepted = tally.accepted(completed);
        interests.iter().fold((0, 0), |(least, most), kind| {
            let k = kind as usize;
            (
                least + accepted[k][lane].saturating_sub(self.after[k][lane]),
                most + started[k][lane] - self.before[k][lane],
            )
        })
    }

    /// Checks `counted` (per lane: delivered + dropped + queued), read after
    /// `completed` and before `started`.
    fn check(
        &self,
        run: &Shared,
        who: &str,
        interests: &KindSet<TestKind>,
        counted: [u64; LANES],
        completed: Grid,
        started: Grid,
    ) {
        for (lane, &counted) in counted.iter().enumerate() {
            let (least, most) = self.bounds(&run.tally, interests, lane, completed, started);
            if counted < least || counted > most {
                run.breaches.record(
                    "delivered + dropped + queued == emitted of interest while subscribed",
                    || {
                        format!(
                            "{who}: lane {:?} accounts for {counted} events, not {least}..={most}",
                            Priority::ALL[lane]
                        )
                    },
                );
            }
        }
    }
}

/// What every thread and task of a run shares.
struct Shared {
    bus: EventBus<TestEvent>,
    tally: Tally,
    breaches: Breaches,
}

/// What a listener saw, checked as it runs.
struct Probe {
    name: String,
    interests: KindSet<TestKind>,
    /// Handles one event at a time, so in the order the queue hands out.
    ordered: bool,
    last: Mutex<[Option<u64>; LANES]>,
    /// Set once the listener finished or was reported on: from then on it
    /// must not be called.
    frozen: AtomicBool,
    calls: AtomicU64,
    breaches: Breaches,
}

impl Probe {
    /// A handler call begins; returns a roll of the dice for it.
    fn called(&self, sequence: u64) -> u64 {
        if self.frozen.load(Ordering::SeqCst) {
            self.breaches.record(
"no handler call after the listener finished or was reported", || {
                format!(
                    "{}: handler called for #{sequence} after the listener finished or was reported",
                    self.name
                )
            });
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut rng = Rng::new(sequence.wrapping_mul(31).wrapping_add(call));
        rng.next_u64()
    }

    /// The first attempt at `event`.
    fn saw(&self, event: &Envelope<TestEvent>) {
        if !self.interests.contains(event.kind()) {
            self.breaches
                .record("a subscriber receives only kinds of its interests", || {
                    format!(
                        "{}: handed {:?}, outside its interests {:?}",
                        self.name,
                        event.kind(),
                        self.interests
                    )
                });
        }
        if !self.ordered {
            return;
        }
        let lane = lane_of(event.priority());
        let sequence = event.sequence();
        let mut last = self.last.lock().unwrap();
        // The same sequence again is a retry of that event.
        if let Some(previous) = last[lane]
            && sequence < previous
        {
            self.breaches
                .record("per lane, events arrive in sequence order", || {
                    format!(
                        "{}: lane {:?} handed #{sequence} after #{previous}",
                        self.name,
                        event.priority()
                    )
                });
        }
        last[lane] = Some(sequence);
    }
}

/// How a listener's handler behaves.
#[derive(Debug, Clone, Copy)]
struct Behaviour {
    /// Fail an attempt about one time in this many (0: never).
    fail_one_in: u64,
    /// Panic in an attempt about one time in this many (0: never).
    panic_one_in: u64,
    /// Yields before the work; with no yields the handler never waits.
    yields: u32,
    spin: Duration,
}

impl Behaviour {
    /// A random behaviour; only a lossy listener may be really slow, so
    /// that no emitter waits on it for long.
    fn random(rng: &mut Rng, lossy: bool) -> Self {
        let spins: &[u64] = if lossy {
            &[0, 0, 0, 2, 20, 300]
        } else {
            &[0, 0, 0, 2, 20]
        };
        Self {
            fail_one_in: *rng.pick(&[0, 0, 3, 10]),
            panic_one_in: *rng.pick(&[0, 0, 0, 7, 20]),
            yields: *rng.pick(&[0, 0, 1, 3]),
            spin: Duration::from_micros(*rng.pick(spins)),
        }
    }

    /// Runs one attempt; `false` when it failed.
    async fn attempt(&self, roll: u64) -> bool {
        for _ in 0..self.yields {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        while started.elapsed() < self.spin {
            std::hint::spin_loop();
        }
        if self.panic_one_in > 0 && roll % self.panic_one_in == 0 {
            panic!("{INJECTED_PANIC}");
        }
        !(self.fail_one_in > 0 && (roll >> 8) % self.fail_one_in == 0)
    }
}

/// A listener of [`Behaviour`] that reports what it is handed to its
/// [`Probe`]; spawned one event at a time or in batches.
struct StressListener {
    probe: Arc<Probe>,
    behaviour: Behaviour,
}

impl Listener<TestEvent> for StressListener {
    fn name(&self) -> &str {
        &self.probe.name
    }

    fn interests(&self) -> KindSet<TestKind> {
        self.probe.interests.clone()
    }

    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        let roll = self.probe.called(event.sequence());
        self.probe.saw(&event);
        if self.behaviour.attempt(roll).await {
            Ok(())
        } else {
            Err("injected failure".into())
        }
    }
}

impl BatchListener<TestEvent> for StressListener {
    fn name(&self) -> &str {
        &self.probe.name
    }

    fn interests(&self) -> KindSet<TestKind> {
        self.probe.interests.clone()
    }

    async fn handle_batch(&self, batch: &Batch<TestEvent>) -> Result<(), BatchError> {
        let roll = self.probe.called(batch[0].sequence());
        if batch.attempt() == 1 {
            for event in batch.iter() {
                self.probe.saw(event);
            }
        }
        if self.behaviour.attempt(roll).await {
            return Ok(());
        }
        // Fail some of the batch: every event whose roll is odd, or all.
        let failed: Vec<usize> = (0..batch.len())
            .filter(|&at| (roll >> (at % 48)) & 1 == 1)
            .collect();
        if failed.is_empty() {
            Err(BatchError::all("injected failure"))
        } else {
            Err(BatchError::events(failed, "injected failure"))
        }
    }
}

/// A spawned listener and what the test knows of it.
struct Spawned {
    handle: ListenerHandle<TestEvent>,
    probe: Arc<Probe>,
    window: Window,
    description: String,
}

/// How a listener is spawned.
#[derive(Debug, Clone, Copy)]
struct Shape {
    batch: bool,
    capacity: usize,
    policy: LagPolicy,
    concurrency: usize,
    retry: RetryPolicy,
    max_batch: usize,
    max_wait: Duration,
    behaviour: Behaviour,
}

impl Shape {
    fn random(rng: &mut Rng) -> Self {
        let policy = if rng.one_in(4) {
            LagPolicy::Backpressure
        } else {
            LagPolicy::DropOldest
        };
        Self {
            batch: rng.one_in(4),
            capacity: match rng.below(4) {
                0 => 1 + rng.below(4),
                1 => 1024 + rng.below(4096),
                _ => 1 + rng.below(64),
            } as usize,
            policy,
            concurrency: if rng.one_in(3) { 2 + rng.below(3) } else { 1 } as usize,
            retry: if rng.one_in(2) {
                RetryPolicy::exponential(2 + rng.below(3) as u32)
                    .initial_backoff(Duration::from_micros(100 * (1 + rng.below(5))))
                    .max_backoff(Duration::from_millis(2))
            } else {
                RetryPolicy::none()
            },
            max_batch: 1 + rng.below(32) as usize,
            max_wait: if rng.one_in(3) {
                Duration::from_micros(300)
            } else {
                Duration::ZERO
            },
            behaviour: Behaviour::random(rng, policy == LagPolicy::DropOldest),
        }
        .keeping_emitters_moving()
    }

    /// Retries wait out a backoff of at least a timer tick (a millisecond):
    /// keep them rare, so that a backpressure listener does not stall
    /// `emit_wait` and a deep queue of several thousand events still drains
    /// well within the deadline on a loaded machine (one failing attempt in
    /// three cost a listener with a queue of 4,468 more than ten seconds
    /// under stress-ng, seed 6384416525722162664).
    ///
    /// Likewise a full queue's worth of CPU work is kept under a tenth of a
    /// second (seed 5119427418440000388 spun 300µs per event over a queue
    /// of 2,691, which the machine under stress-ng could not finish within
    /// the deadline).
    fn keeping_emitters_moving(mut self) -> Self {
        if self.retry.max_attempts() > 1 {
            self.behaviour.fail_one_in = self.behaviour.fail_one_in.max(10);
            self.behaviour.panic_one_in = self.behaviour.panic_one_in.max(20);
        }
        let backlog = Duration::from_millis(100);
        let queue = self.capacity as u32;
        if self.behaviour.spin * queue > backlog {
            self.behaviour.spin = backlog / queue;
        }
        self
    }

    /// A handler that never waits and takes a while, with a deep queue: it
    /// must still yield, and stop when told.
    fn never_waits(rng: &mut Rng) -> Self {
        Self {
            batch: false,
            capacity: 2048 + rng.below(2048) as usize,
            policy: LagPolicy::DropOldest,
            concurrency: 1,
            retry: RetryPolicy::none(),
            max_batch: 1,
            max_wait: Duration::ZERO,
            behaviour: Behaviour {
                fail_one_in: 0,
                panic_one_in: 0,
                yields: 0,
                spin: Duration::from_micros(50 + rng.below(100)),
            },
        }
    }

    /// Backpressure on `WAIT_ONLY` alone, fed by `emit_wait` only: it must
    /// lose nothing.
    fn lossless(rng: &mut Rng) -> Self {
        Self {
            batch: rng.one_in(3),
            capacity: 1 + rng.below(8) as usize,
            policy: LagPolicy::Backpressure,
            concurrency: 1,
            retry: RetryPolicy::none(),
            max_batch: 1 + rng.below(8) as usize,
            max_wait: Duration::ZERO,
            behaviour: Behaviour {
                fail_one_in: 0,
                panic_one_in: 0,
                yields: *rng.pick(&[0, 1, 4]),
                spin: Duration::ZERO,
            },
        }
    }

    fn options(&self) -> ListenerOptions {
        let options = ListenerOptions::new()
            .capacity(self.capacity)
            .lag_policy(self.policy)
            .concurrency(self.concurrency)
            .retry(self.retry);
        if self.batch {
            options.max_batch(self.max_batch).max_wait(self.max_wait)
        } else {
            options
        }
    }
}

/// Spawns a listener of `shape` on the current runtime.
fn spawn_shaped(run: &Shared, name: String, interests: KindSet<TestKind>, shape: Shape) -> Spawned {
    let description = format!("{name}: {interests:?}, {shape:?}");
    let probe = Arc::new(Probe {
        name,
        interests,
        ordered: shape.concurrency == 1,
        last: Mutex::new([None; LANES]),
        frozen: AtomicBool::new(false),
        calls: AtomicU64::new(0),
        breaches: run.breaches.clone(),
    });
    let (handle, window) = Window::open(&run.tally, || {
        let listener = StressListener {
            probe: probe.clone(),
            behaviour: shape.behaviour,
        };
        // It is both kinds of listener: say which it is spawned as.
        if shape.batch {
            run.bus
                .spawn_with::<_, event_bus::InBatches>(listener, shape.options())
        } else {
            run.bus
                .spawn_with::<_, event_bus::OneByOne>(listener, shape.options())
        }
    });
    Spawned {
        handle,
        probe,
        window,
        description,
    }
}

/// Per lane: delivered + dropped + queued.
fn accounted(lanes: &[event_bus::LaneMetrics]) -> [u64; LANES] {
    std::array::from_fn(|lane| {
        let l = &lanes[lane];
        l.delivered + l.dropped + l.queue_depth as u64
    })
}

fn subscription_lanes(subscription: &Subscription<TestEvent>) -> Vec<event_bus::LaneMetrics> {
    Priority::ALL
        .iter()
        .map(|&p| subscription.lane(p))
        .collect()
}

/// Checks one listener's metrics for the identities that hold at every
/// moment.
fn check_listener_identities(breaches: &Breaches, l: &event_bus::ListenerMetrics, when: &str) {
    if l.delivered != l.handled + l.dead_lettered + l.in_flight as u64 {
        breaches.record("delivered == handled + dead_lettered + in_flight", || {
            format!(
                "{when}: {}: delivered {} != handled {} + dead_lettered {} + in_flight {}",
                l.name, l.delivered, l.handled, l.dead_lettered, l.in_flight
            )
        });
    }
    if l.failed != l.retried + l.dead_lettered {
        breaches.record("failed == retried + dead_lettered", || {
            format!(
                "{when}: {}: failed {} != retried {} + dead_lettered {}",
                l.name, l.failed, l.retried, l.dead_lettered
            )
        });
    }
}

/// What a consumer of a subscription saw.
#[derive(Debug, Default)]
struct Consumed {
    received: u64,
    lagged: u64,
    closed: bool,
    most_in_a_lane: usize,
}

/// Receives from `subscription` until `done`, checking order and
/// interests as it goes and accounting from time to time; then drains what
/// is left and checks the accounting once more.
async fn consume(
    run: Arc<Shared>,
    who: String,
    mut subscription: Subscription<TestEvent>,
    window: Window,
    slow: u32,
    mut done: watch::Receiver<bool>,
) -> Consumed {
    let interests = subscription.interests().clone();
    let lossless = subscription.lag_policy() == LagPolicy::Backpressure
        && interests.iter().all(|kind| kind == WAIT_ONLY);
    let mut consumed = Consumed::default();
    let mut last = [0u64; LANES];
    let mut see = |consumed: &mut Consumed,
                   event: &Envelope<TestEvent>,
                   subscription: &Subscription<TestEvent>| {
        consumed.received += 1;
        if !interests.contains(event.kind()) {
            run.breaches
                .record("a subscriber receives only kinds of its interests", || {
                    format!("{who}: received {:?}, outside {interests:?}", event.kind())
                });
        }
        let lane = lane_of(event.priority());
        if event.sequence() <= last[lane] {
            let previous = last[lane];
            run.breaches
                .record("per lane, events arrive in sequence order", || {
                    format!(
                        "{who}: lane {:?} received #{} after #{previous}",
                        event.priority(),
                        event.sequence()
                    )
                });
        }
        last[lane] = event.sequence();
        for priority in Priority::ALL {
            let depth = subscription.lane(priority).queue_depth;
            consumed.most_in_a_lane = consumed.most_in_a_lane.max(depth);
        }
    };
    let check = |subscription: &Subscription<TestEvent>| {
        let completed = run.tally.completed();
        let counted = accounted(&subscription_lanes(subscription));
        let started = run.tally.started();
        window.check(&run, &who, &interests, counted, completed, started);
    };

    for round in 0..10_000_000u64 {
        let next = tokio::select! {
            biased;
            _ = done.wait_for(|&done| done) => break,
            next = subscription.recv() => next,
        };
        match next {
            Ok(event) => see(&mut consumed, &event, &subscription),
            Err(RecvError::Lagged(n)) => consumed.lagged += n,
            Err(RecvError::Closed) => {
                consumed.closed = true;
                break;
            }
        }
        if round % 64 == 0 {
            check(&subscription);
        }
        for _ in 0..slow {
            tokio::task::yield_now().await;
        }
    }
    // Emitting has stopped (or the bus closed): take what is left.
    for _ in 0..10_000_000u64 {
        match subscription.try_recv() {
            Ok(event) => see(&mut consumed, &event, &subscription),
            Err(TryRecvError::Lagged(n)) => consumed.lagged += n,
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Closed) => {
                consumed.closed = true;
                break;
            }
        }
    }
    check(&subscription);
    if consumed.received != subscription.delivered() || consumed.lagged != subscription.dropped() {
        run.breaches.record(
"the consumer is told of every drop", || {
            format!(
                "{who}: received {} and was told of {} dropped; it counts {} delivered, {} dropped",
                consumed.received,
                consumed.lagged,
                subscription.delivered(),
                subscription.dropped()
            )
        });
    }
    if lossless {
        let capacity = subscription.capacity();
        if subscription.dropped() + subscription.overflowed() > 0
            || consumed.most_in_a_lane > capacity
        {
            run.breaches.record(
"emit_wait loses nothing and keeps a backpressure lane within its capacity", || {
                format!(
                    "{who}: fed by emit_wait only, dropped {}, overflowed {}, held up to {} in a lane of {capacity}",
                    subscription.dropped(),
                    subscription.overflowed(),
                    consumed.most_in_a_lane
                )
            });
        }
    }
    consumed
}

/// One emitting thread: `emits` events of random kinds, priorities and
/// methods; `WAIT_ONLY` only ever through `emit_wait`.
fn emitter(
    run: Arc<Shared>,
    handle: tokio::runtime::Handle,
    seed: u64,
    emits: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed);
    let mut slowest = Duration::ZERO;
    for i in 0..emits {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let kind = *rng.pick(&TestKind::ALL_KINDS);
        let event = TestEvent::of(kind, i);
        let priority = match rng.below(8) {
            0 => Priority::High,
            1 => Priority::Low,
            _ => Priority::Normal,
        };
        if kind == WAIT_ONLY || rng.one_in(6) {
            let waited = run.tally.count(kind, priority, || {
                handle.block_on(async {
                    let emit = run.bus.with_priority(priority).emit_wait(event);
                    tokio::time::timeout(DEADLINE, emit).await
                })
            });
            if waited.is_err() {
                run.breaches
                    .record("emit_wait returns once there is room", || {
                        format!("emit_wait of {kind:?} did not return within {DEADLINE:?}")
                    });
            }
        } else {
            let started = Instant::now();
            run.tally.count(kind, priority, || {
                run.bus.with_priority(priority).emit(event)
            });
            slowest = slowest.max(started.elapsed());
        }
    }
    if slowest > EMIT_LIMIT {
        run.breaches.record("emit never blocks for long", || {
            format!("an emit took {slowest:?}, more than {EMIT_LIMIT:?}")
        });
    }
}

/// Takes metrics snapshots until `stop`, checking each.
fn snapshotter(
    run: Arc<Shared>,
    founding: Vec<(String, KindSet<TestKind>)>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut previous: std::collections::HashMap<String, event_bus::ListenerMetrics> =
        std::collections::HashMap::new();
    let mut taken = 0;
    while !stop.load(Ordering::Acquire) && taken < 1_000_000 {
        let metrics = run.bus.metrics();
        let when = format!("snapshot {taken}");
        for l in &metrics.listeners {
            check_listener_identities(&run.breaches, l, &when);
            if let Some((_, interests)) = founding.iter().find(|(name, _)| *name == l.name) {
                let emitted: u64 = interests
                    .iter()
                    .map(|kind| metrics.emitted_of(kind.name()))
                    .sum();
                if l.delivered + l.dropped + l.queue_depth as u64 != emitted {
                    run.breaches.record(
"a listener there before the first emit accounts for every emit of interest", || {
                        format!(
                            "{when}: {}: delivered {} + dropped {} + queue_depth {} != {emitted} emitted of {interests:?}",
                            l.name, l.delivered, l.dropped, l.queue_depth
                        )
                    });
                }
            }
            if let Some(p) = previous.get(&l.name) {
                let grew = [
                    (p.delivered, l.delivered),
                    (p.handled, l.handled),
                    (p.failed, l.failed),
                    (p.retried, l.retried),
                    (p.dead_lettered, l.dead_lettered),
                    (p.dropped, l.dropped),
                    (p.overflowed, l.overflowed),
                ];
                if grew.iter().any(|(before, now)| now < before) {
                    run.breaches.record("counters only grow", || {
                        format!("{when}: {}: a counter went down: {grew:?}", l.name)
                    });
                }
            }
            previous.insert(l.name.clone(), l.clone());
        }
        taken += 1;
    }
    taken
}

/// A run's settings, drawn from its seed.
struct Plan {
    emitters: u64,
    emits: u64,
    churn_steps: u64,
    /// Shut down while emitters, consumers and churn are still at work.
    shutdown_midway: bool,
    shutdown_deadline: Duration,
}

/// Runs the scenario of `seed`, checking every rule; panics with the seed
/// and the first breaches.
fn run_scenario(seed: u64, midway: bool) {
    println!("seed {seed} (replay: EVENT_BUS_STRESS_SEED={seed})");
    support::quiet_injected_panics();
    let mut rng = Rng::new(seed);
    let plan = Plan {
        emitters: 2 + rng.below(2),
        emits: 3_000 + rng.below(9_000),
        churn_steps: 30 + rng.below(60),
        shutdown_midway: midway,
        shutdown_deadline: Duration::from_millis(if midway {
            10 + rng.below(200)
        } else {
            200 + rng.below(800)
        }),
    };
    let clock = Instant::now();
    let runtimes = [runtime(2), runtime(2)];
    let bus = EventBus::builder()
        .capacity(1 + rng.below(256) as usize)
        .fairness(1 + rng.below(40) as usize)
        .dead_letter_capacity(*rng.pick(&[16, 10_000]))
        .build();
    let run = Arc::new(Shared {
        bus,
        tally: Tally::default(),
        breaches: Breaches::default(),
    });
    let (done_tx, done_rx) = watch::channel(false);

    // Listeners and subscriptions there before the first emit.
    let mut listeners: Vec<Spawned> = Vec::new();
    let founding_count = 3 + rng.below(4);
    for i in 0..founding_count {
        let runtime = rng.pick(&runtimes);
        let _entered = runtime.enter();
        let interests = if rng.one_in(3) {
            KindSet::all()
        } else {
            random_interests(&mut rng)
        };
        let shape = Shape::random(&mut rng);
        listeners.push(spawn_shaped(
            &run,
            format!("founding-{i}"),
            interests,
            shape,
        ));
    }
    for (name, interests, shape) in [
        ("never-waits", KindSet::all(), Shape::never_waits(&mut rng)),
        ("lossless", WAIT_ONLY.into(), Shape::lossless(&mut rng)),
    ] {
        let _entered = rng.pick(&runtimes).enter();
        listeners.push(spawn_shaped(&run, name.into(), interests, shape));
    }
    let founding: Vec<(String, KindSet<TestKind>)> = listeners
        .iter()
        .map(|l| (l.probe.name.clone(), l.probe.interests.clone()))
        .collect();
    for spawned in &listeners {
        println!("  {}", spawned.description);
    }

    let mut consumers = Vec::new();
    let subscriptions = 2 + rng.below(3);
    for i in 0..=subscriptions {
        // The last one: backpressure on `D` alone.
        let (interests, capacity, policy) = if i == subscriptions {
            (
                WAIT_ONLY.into(),
                1 + rng.below(8) as usize,
                LagPolicy::Backpressure,
            )
        } else {
            let policy = if rng.one_in(3) {
                LagPolicy::Backpressure
            } else {
                LagPolicy::DropOldest
            };
            (
                random_interests(&mut rng),
                1 + rng.below(64) as usize,
                policy,
            )
        };
        let who = format!("subscription-{i} ({interests:?}, {capacity}, {policy:?})");
        println!("  {who}");
        let (subscription, window) = Window::open(&run.tally, || {
            run.bus.subscribe_with(interests, capacity, policy)
        });
        let slow = *rng.pick(&[0, 0, 1, 5]);
        consumers.push(rng.pick(&runtimes).spawn(consume(
            run.clone(),
            who,
            subscription,
            window,
            slow,
            done_rx.clone(),
        )));
    }

    let stop_snapshots = Arc::new(AtomicBool::new(false));
    let snapshots = std::thread::spawn({
        let (run, stop) = (run.clone(), stop_snapshots.clone());
        move || snapshotter(run, founding, stop)
    });
    let stop_emitters = Arc::new(AtomicBool::new(false));
    let emitters: Vec<_> = (0..plan.emitters)
        .map(|e| {
            let (run, stop) = (run.clone(), stop_emitters.clone());
            let handle = runtimes[e as usize % 2].handle().clone();
            let seed = rng.next_u64();
            std::thread::spawn(move || emitter(run, handle, seed, plan.emits, stop))
        })
        .collect();
    let churn = runtimes[0].spawn(churn(
        run.clone(),
        runtimes[1].handle().clone(),
        rng.next_u64(),
        plan.churn_steps,
    ));

    let mut report = None;
    if plan.shutdown_midway {
        // Once about half the emits are done.
        let half = plan.emitters * plan.emits / 2;
        let started = Instant::now();
        while Tally::total(&run.tally.completed()) < half && started.elapsed() < DEADLINE {
            std::thread::yield_now();
        }
        report = Some(shut_down(
            &run,
            &runtimes[0],
            plan.shutdown_deadline,
            &listeners,
        ));
    }
    phase(&clock, "set up; joining the emitters");
    for emitter in emitters {
        emitter.join().unwrap();
    }
    let churned =
        match runtimes[0].block_on(async { tokio::time::timeout(DEADLINE * 3, churn).await }) {
            Ok(churned) => churned.unwrap(),
            Err(_) => {
                run.breaches
                    .record("churn finishes", || "the churn task did not finish".into());
                Vec::new()
            }
        };
    phase(&clock, "emitters and churn done");
    // Emitting has stopped: quiesce must return.
    if runtimes[0]
        .block_on(async { tokio::time::timeout(DEADLINE, run.bus.quiesce()).await })
        .is_err()
    {
        run.breaches
            .record("quiesce returns once emitting stopped", || {
                format!("quiesce did not return within {DEADLINE:?} after emitting stopped")
            });
    }
    phase(&clock, "quiesced");
    done_tx.send_replace(true);
    for consumer in consumers {
        match runtimes[0].block_on(async { tokio::time::timeout(DEADLINE, consumer).await }) {
            Ok(consumed) => {
                let consumed = consumed.unwrap();
                if plan.shutdown_midway && !consumed.closed {
                    run.breaches
                        .record("shutdown closes every subscription", || {
                            format!("a subscription was not closed by shutdown: {consumed:?}")
                        });
                }
            }
            Err(_) => run
                .breaches
                .record("consumers finish", || "a consumer did not finish".into()),
        }
    }
    phase(&clock, "consumers done");
    stop_snapshots.store(true, Ordering::Release);
    let taken = snapshots.join().unwrap();

    let completed = run.tally.completed();
    let metrics = run.bus.metrics();
    if metrics.emitted + metrics.rejected != Tally::total(&completed) {
        run.breaches
            .record("every emit is counted emitted or rejected", || {
                format!(
                    "emitted {} + rejected {} != {} emits",
                    metrics.emitted,
                    metrics.rejected,
                    Tally::total(&completed)
                )
            });
    }
    if !plan.shutdown_midway {
        if metrics.rejected != 0 {
            run.breaches.record("an open bus rejects nothing", || {
                format!("{} emits rejected by an open bus", metrics.rejected)
            });
        }
        for spawned in &listeners {
            let l = spawned.handle.metrics();
            check_listener_identities(&run.breaches, &l, "after quiesce");
            let expected: [u64; LANES] = std::array::from_fn(|lane| {
                spawned
                    .probe
                    .interests
                    .iter()
                    .map(|kind| completed[kind as usize][lane])
                    .sum()
            });
            if accounted(&l.lanes) != expected || l.queue_depth + l.in_flight != 0 {
                run.breaches.record(
"after quiesce, a listener has handled every event of interest", || {
                    format!(
                        "{}: after quiesce, per lane delivered + dropped + queued {:?} != emitted of interest {expected:?}; {} queued, {} in flight",
                        l.name,
                        accounted(&l.lanes),
                        l.queue_depth,
                        l.in_flight
                    )
                });
            }
        }
        report = Some(shut_down(
            &run,
            &runtimes[0],
            plan.shutdown_deadline,
            &listeners,
        ));
    }
    phase(&clock, "shut down");
    let report = report.unwrap();

    // Nothing handled after the report; churned listeners stayed stopped.
    for spawned in listeners.iter().chain(&churned) {
        if runtimes[0]
            .block_on(async { tokio::time::timeout(DEADLINE, spawned.handle.finished()).await })
            .is_err()
        {
            run.breaches
                .record("every listener ends after shutdown", || {
                    format!("{} still running after shutdown", spawned.probe.name)
                });
        }
    }
    for spawned in &listeners {
        let l = spawned.handle.metrics();
        let Some(reported) = report.listener(&l.name) else {
            run.breaches
                .record("every listener is in the shutdown report", || {
                    format!("{} missing from the shutdown report", l.name)
                });
            continue;
        };
        if l.handled != reported.handled || l.dead_lettered != reported.dead_lettered {
            run.breaches
                .record("no listener handles anything after its report", || {
                    format!(
                        "{}: reported {} handled, {} dead-lettered; {} and {} after",
                        l.name,
                        reported.handled,
                        reported.dead_lettered,
                        l.handled,
                        l.dead_lettered
                    )
                });
        }
        if reported.handled + reported.dead_lettered + reported.undelivered
            != l.delivered + l.queue_depth as u64
        {
            run.breaches.record(
"the report accounts for every event", || {
                format!(
                    "{}: reported handled {} + dead_lettered {} + undelivered {} != delivered {} + queued {}",
                    l.name,
                    reported.handled,
                    reported.dead_lettered,
                    reported.undelivered,
                    l.delivered,
                    l.queue_depth
                )
            });
        }
        if reported.drained && (l.queue_depth > 0 || l.in_flight > 0) {
            run.breaches
                .record("a drained listener has nothing left", || {
                    format!(
                        "{}: reported drained with {} queued and {} in flight",
                        l.name, l.queue_depth, l.in_flight
                    )
                });
        }
        check_listener_identities(&run.breaches, &l, "after shutdown");
    }
    // Every dead letter is kept or counted evicted.
    let dead_lettered: u64 = listeners
        .iter()
        .chain(&churned)
        .map(|s| s.handle.metrics().dead_lettered)
        .sum();
    let metrics = run.bus.metrics();
    let kept = run.bus.dead_letters().len() as u64;
    if kept + metrics.dead_letters_evicted != dead_lettered {
        run.breaches
            .record("every dead letter is kept or counted evicted", || {
                format!(
                    "{dead_lettered} dead letters recorded, {kept} kept + {} evicted",
                    metrics.dead_letters_evicted
                )
            });
    }
    stop_emitters.store(true, Ordering::Relaxed);
    phase(&clock, "checked");
    run.breaches.assert_none(&format!(
        "seed {seed} (replay: EVENT_BUS_STRESS_SEED={seed}), {taken} snapshots; {report}"
    ));
}

/// Prints how far a run has got, for the output of a failing run.
fn phase(clock: &Instant, what: &str) {
    println!("  {:>9.3?} {what}", clock.elapsed());
}

/// Shuts the bus down with `deadline`, checking that it returns in time,
/// and freezes every listener's probe.
fn shut_down(
    run: &Shared,
    runtime: &Runtime,
    deadline: Duration,
    listeners: &[Spawned],
) -> event_bus::ShutdownReport {
    run.tally.cut_off();
    let started = Instant::now();
    let report = runtime.block_on(run.bus.shutdown(deadline));
    let took = started.elapsed();
    for spawned in listeners {
        spawned.probe.frozen.store(true, Ordering::SeqCst);
    }
    if took > deadline + SHUTDOWN_GRACE {
        run.breaches
            .record("shutdown returns within its deadline and a grace", || {
                format!("shutdown({deadline:?}) took {took:?}")
            });
    }
    report
}

/// Meanwhile: subscribes and unsubscribes, spawns and aborts listeners,
/// calls quiesce under a short deadline. Returns the listeners it spawned,
/// all aborted.
async fn churn(
    run: Arc<Shared>,
    other_runtime: tokio::runtime::Handle,
    seed: u64,
    steps: u64,
) -> Vec<Spawned> {
    let mut rng = Rng::new(seed);
    let mut spawned = Vec::new();
    for step in 0..steps {
        match rng.below(3) {
            0 => {
                let interests = random_interests(&mut rng);
                let capacity = 1 + rng.below(16) as usize;
                let policy = if rng.one_in(2) {
                    LagPolicy::Backpressure
                } else {
                    LagPolicy::DropOldest
                };
                let who =
                    format!("churn subscription {step} ({interests:?}, {capacity}, {policy:?})");
                let (mut subscription, window) = Window::open(&run.tally, || {
                    run.bus.subscribe_with(interests.clone(), capacity, policy)
                });
                let lossless =
                    policy == LagPolicy::Backpressure && interests.iter().all(|k| k == WAIT_ONLY);
                for _ in 0..rng.below(50) {
                    let received =
                        tokio::time::timeout(Duration::from_millis(20), subscription.recv()).await;
                    if !matches!(received, Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_)))) {
                        break;
                    }
                    if let Ok(Ok(event)) = received
                        && !interests.contains(event.kind())
                    {
                        run.breaches
                            .record("a subscriber receives only kinds of its interests", || {
                                format!("{who}: received {:?}", event.kind())
                            });
                    }
                    if lossless {
                        for priority in Priority::ALL {
                            let depth = subscription.lane(priority).queue_depth;
                            if depth > capacity {
                                run.breaches.record(
"emit_wait loses nothing and keeps a backpressure lane within its capacity", || {
                                    format!("{who}: emit_wait left {depth} in a lane of {capacity}")
                                });
                            }
                        }
                    }
                }
                let completed = run.tally.completed();
                let counted = accounted(&subscription_lanes(&subscription));
                let started = run.tally.started();
                window.check(&run, &who, &interests, counted, completed, started);
            }
            1 => {
                let interests = random_interests(&mut rng);
                let listener = {
                    let _entered = rng.one_in(2).then(|| other_runtime.enter());
                    let shape = Shape::random(&mut rng);
                    spawn_shaped(&run, format!("churn-{step}"), interests, shape)
                };
                // Let it work a little, then stop it.
                for _ in 0..rng.below(200) {
                    tokio::task::yield_now().await;
                }
                let completed_at_abort = run.tally.completed();
                listener.handle.abort();
                if tokio::time::timeout(DEADLINE, listener.handle.finished())
                    .await
                    .is_err()
                {
                    let name = listener.probe.name.clone();
                    run.breaches.record("abort stops a listener", || {
                        format!("{name}: still running {DEADLINE:?} after abort")
                    });
                }
                listener.probe.frozen.store(true, Ordering::SeqCst);
                let started = run.tally.started();
                let l = listener.handle.metrics();
                check_listener_identities(&run.breaches, &l, "after abort");
                listener.window.check(
                    &run,
                    &listener.description,
                    &listener.probe.interests,
                    accounted(&l.lanes),
                    completed_at_abort,
                    started,
                );
                spawned.push(listener);
            }
            _ => {
                let _ = tokio::time::timeout(Duration::from_millis(20), run.bus.quiesce()).await;
            }
        }
    }
    spawned
}

/// One scenario at a time: each loads every core, and its time limits
/// should measure the bus, not the other scenario.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run_scenarios(midway: bool) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for seed in stress_seeds() {
        run_scenario(seed, midway);
    }
}

#[test]
fn every_delivery_rule_holds_under_concurrent_emit_subscribe_spawn_and_abort() {
    run_scenarios(false);
}

#[test]
fn shutdown_midway_accounts_for_every_event_and_stops_every_listener() {
    run_scenarios(true);
}
