//! What the behaviour tests share: a small event type, written by hand as a
//! user of the public API would, and listeners that record what they see.

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::{
    Envelope, Event, EventBus, EventKind, HandlerError, KindSet, Listener, ListenerHandle,
};
use tokio::sync::watch;

/// How long any test waits for something that should happen at once.
pub const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestEvent {
    A(u64),
    B(u64),
    C(u64),
    D(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestKind {
    A,
    B,
    C,
    D,
}

impl TestKind {
    pub const ALL_KINDS: [Self; 4] = [Self::A, Self::B, Self::C, Self::D];
}

impl EventKind for TestKind {
    const ALL: &'static [Self] = &Self::ALL_KINDS;

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Self::A => "test.a",
            Self::B => "test.b",
            Self::C => "test.c",
            Self::D => "test.d",
        }
    }
}

impl Event for TestEvent {
    type Kind = TestKind;

    fn kind(&self) -> TestKind {
        match self {
            Self::A(_) => TestKind::A,
            Self::B(_) => TestKind::B,
            Self::C(_) => TestKind::C,
            Self::D(_) => TestKind::D,
        }
    }
}

impl TestEvent {
    pub fn of(kind: TestKind, value: u64) -> Self {
        match kind {
            TestKind::A => Self::A(value),
            TestKind::B => Self::B(value),
            TestKind::C => Self::C(value),
            TestKind::D => Self::D(value),
        }
    }

    pub fn value(&self) -> u64 {
        match *self {
            Self::A(v) | Self::B(v) | Self::C(v) | Self::D(v) => v,
        }
    }
}

/// The kinds whose bits are set in `mask`: bit `i` stands for
/// `TestKind::ALL_KINDS[i]`.
pub fn kinds(mask: u64) -> KindSet<TestKind> {
    TestKind::ALL_KINDS
        .into_iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, kind)| kind)
        .collect()
}

/// A gate handlers wait at until the test opens it.
#[derive(Clone)]
pub struct Gate(Arc<tokio::sync::Semaphore>);

impl Gate {
    pub fn closed() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(0)))
    }

    pub fn open(&self) {
        self.0.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }

    pub async fn pass(&self) {
        let _ = self.0.acquire().await.map(|permit| permit.forget());
    }
}

/// A listener whose handler waits at a [`Gate`] for every event.
pub struct Gated(pub Gate);

impl Listener<TestEvent> for Gated {
    async fn handle(
        &self,
        _: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        self.0.pass().await;
        Ok(())
    }
}

/// Spawns a [`Gated`] listener behind a gate that never opens, and emits
/// `A(0)` to `A(events - 1)`: it takes the first into its handler and holds
/// it, and the rest wait in its queue.
pub fn stuck_listener(bus: &EventBus<TestEvent>, events: u64) -> ListenerHandle<TestEvent> {
    let stuck = bus.spawn(Gated(Gate::closed()));
    for i in 0..events {
        bus.emit(TestEvent::A(i));
    }
    stuck
}

/// Runs `future` to completion or panics after [`DEADLINE`].
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not happen within {DEADLINE:?}"),
    }
}

/// Yields until `condition` holds, or panics after [`DEADLINE`].
pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Starts an OS thread that emits `A(0)`, `A(1)`, … as fast as it can,
/// until `stop` is set or it has emitted `limit` events.
pub fn emit_until_stopped(
    bus: &EventBus<TestEvent>,
    stop: &Arc<AtomicBool>,
    limit: u64,
) -> std::thread::JoinHandle<()> {
    let (bus, stop) = (bus.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) && i < limit {
            bus.emit(TestEvent::A(i));
            i += 1;
        }
    })
}

/// A listener that records every event it handles, in handling order.
#[derive(Clone)]
pub struct Recorder {
    pub name: &'static str,
    pub interests: KindSet<TestKind>,
    pub seen: Arc<Mutex<Vec<Arc<Envelope<TestEvent>>>>>,
    handled: Arc<watch::Sender<usize>>,
}

impl Recorder {
    pub fn new(name: &'static str, interests: impl Into<KindSet<TestKind>>) -> Self {
        Self {
            name,
            interests: interests.into(),
            seen: Arc::default(),
            handled: Arc::new(watch::channel(0).0),
        }
    }

    /// Waits until the recorder has handled at least `count` events.
    ///
    /// # Panics
    ///
    /// After [`DEADLINE`].
    pub async fn wait_for(&self, count: usize) {
        let mut handled = self.handled.subscribe();
        let reached = tokio::time::timeout(DEADLINE, handled.wait_for(|&n| n >= count))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(
            reached,
            "{} handled {} events, not {count}, within {DEADLINE:?}",
            self.name,
            *handled.borrow()
        );
    }

    pub fn events(&self) -> Vec<TestEvent> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.event().clone())
            .collect()
    }

    pub fn sequences(&self) -> Vec<u64> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.sequence())
            .collect()
    }
}

impl Listener<TestEvent> for Recorder {
    fn name(&self) -> &str {
        self.name
    }

    fn interests(&self) -> KindSet<TestKind> {
        self.interests.clone()
    }

    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        self.seen.lock().unwrap().push(event);
        self.handled.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// The fields of a span or event, `message` included, as text.
pub type Fields = Vec<(String, String)>;

/// Tracing events captured by [`capture_logs`]: level and fields.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<(tracing::Level, Fields)>>>);

impl Logs {
    /// The captured events at `level` whose message contains `text`, as
    /// their fields.
    pub fn find(&self, level: tracing::Level, text: &str) -> Vec<Fields> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, fields)| {
                *l == level
                    && fields
                        .iter()
                        .any(|(k, v)| k == "message" && v.contains(text))
            })
            .map(|(_, fields)| fields.clone())
            .collect()
    }
}

/// Collects fields as text.
pub struct FieldsVisitor<'a>(pub &'a mut Fields);

impl tracing::field::Visit for FieldsVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Logs {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Vec::new();
        event.record(&mut FieldsVisitor(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), fields));
    }
}

/// Captures the tracing events of this thread until the guard is dropped.
/// Use with a current-thread runtime, so every task logs on this thread.
pub fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    use tracing_subscriber::layer::SubscriberExt;
    let logs = Logs::default();
    let subscriber = tracing_subscriber::registry().with(logs.clone());
    (logs, tracing::subscriber::set_default(subscriber))
}

/// A log sink that stalls on every event whose message contains `text`, as
/// a sink writing to a stalled pipe or a slow network would, until
/// [`release`](Self::release)d (or, so that a broken test still ends,
/// [`DEADLINE`]): a test checks that other work goes on meanwhile, without
/// timing it.
#[derive(Clone)]
pub struct SlowSink {
    text: &'static str,
    entered: Arc<AtomicU64>,
    released: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl SlowSink {
    pub fn held(text: &'static str) -> Self {
        Self {
            text,
            entered: Arc::default(),
            released: Arc::default(),
        }
    }

    /// Lets held events go, now and from now on.
    pub fn release(&self) {
        *self.released.0.lock().unwrap() = true;
        self.released.1.notify_all();
    }

    /// Waits until the sink has begun holding an event, for at most
    /// `deadline`; says whether it has.
    pub fn wait_entered(&self, deadline: Duration) -> bool {
        let started = std::time::Instant::now();
        while self.entered.load(Ordering::SeqCst) == 0 {
            if started.elapsed() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// Installs a subscriber with this sink as the default of the calling
    /// thread until the guard is dropped.
    pub fn set_default(&self) -> tracing::subscriber::DefaultGuard {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SlowSink {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Vec::new();
        event.record(&mut FieldsVisitor(&mut fields));
        if fields
            .iter()
            .any(|(k, v)| k == "message" && v.contains(self.text))
        {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let guard = self.released.0.lock().unwrap();
            let _ = self
                .released
                .1
                .wait_timeout_while(guard, DEADLINE, |released| !*released)
                .unwrap();
        }
    }
}

/// Runs `work` on a thread of its own and says whether it finished within
/// [`DEADLINE`]: for work that must not wait on something the test holds.
pub fn finishes_on_its_own(work: impl FnOnce() + Send + 'static) -> bool {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        work();
        let _ = done.send(());
    });
    finished.recv_timeout(DEADLINE).is_ok()
}

/// A message for panics that tests inject into handlers on purpose.
pub const INJECTED_PANIC: &str = "injected panic";

/// Keeps the default panic hook quiet about [`INJECTED_PANIC`]s, so that a
/// test that injects thousands of them still shows its real failures.
pub fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
            if !message.is_some_and(|m| m.contains(INJECTED_PANIC)) {
                default(info);
            }
        }));
    });
}

/// A small seeded random number generator (xorshift64*), so that a failing
/// run can be replayed from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's one fixed point.
        Self(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A random set of kinds, never empty.
pub fn random_interests(rng: &mut Rng) -> KindSet<TestKind> {
    kinds(1 + rng.below((1 << TestKind::ALL_KINDS.len()) - 1))
}

/// The seeds for a stress test to run: the one in `EVENT_BUS_STRESS_SEED`,
/// or `EVENT_BUS_STRESS_ITERS` fresh ones (default 3).
pub fn stress_seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("EVENT_BUS_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let runs = std::env::var("EVENT_BUS_STRESS_ITERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng::new(now);
    (0..runs).map(|_| rng.next_u64() >> 1).collect()
}

/// Breaches of invariants found while a test runs on many threads, by
/// rule: how many of each, and the first few in full. A handler or a helper
/// thread records them here instead of panicking, which a listener would
/// catch.
#[derive(Clone, Default)]
pub struct Breaches(Arc<Mutex<Vec<Broken>>>);

/// One rule's breaches.
struct Broken {
    rule: &'static str,
    count: u64,
    first: Vec<String>,
}

impl Breaches {
    /// Records a breach of `rule`, described by `detail`.
    pub fn record(&self, rule: &'static str, detail: impl FnOnce() -> String) {
        let mut rules = self.0.lock().unwrap();
        let at = match rules.iter().position(|broken| broken.rule == rule) {
            Some(at) => at,
            None => {
                rules.push(Broken {
                    rule,
                    count: 0,
                    first: Vec::new(),
                });
                rules.len() - 1
            }
        };
        let broken = &mut rules[at];
        broken.count += 1;
        if broken.first.len() < 3 {
            broken.first.push(detail());
        }
    }

    pub fn count(&self) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|broken| broken.count)
            .sum()
    }

    /// Panics, listing each rule broken with its first breaches, if there
    /// were any.
    #[track_caller]
    pub fn assert_none(&self, context: &str) {
        let rules = self.0.lock().unwrap();
        if rules.is_empty() {
            return;
        }
        let mut message = format!("{context}: {} rules broken", rules.len());
        for Broken { rule, count, first } in rules.iter() {
            message += &format!("\n- {rule}: {count} times; first:");
            for example in first {
                message += &format!("\n    {example}");
            }
        }
        panic!("{message}");
    }
}
