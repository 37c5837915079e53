//! `bus.metrics()` counts every outcome, and the `metrics` feature exports
//! the same numbers through the `metrics` facade.

mod support;

use std::sync::Arc;
use std::time::Duration;

use event_bus::{
    Envelope, EventBus, HandlerError, LagPolicy, Listener, ListenerOptions, RetryPolicy,
};
use support::{Gate, Gated, SlowSink, TestEvent, TestKind, within};

/// `A` succeeds; `B` fails once then succeeds; `C` always fails; `D` panics.
#[derive(Default)]
struct Mixed {
    b_attempts: std::sync::Mutex<u32>,
}

impl Listener<TestEvent> for Mixed {
    fn name(&self) -> &str {
        "mixed"
    }

    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        match **event {
            TestEvent::A(_) => Ok(()),
            TestEvent::B(_) => {
                let mut attempts = self.b_attempts.lock().unwrap();
                *attempts += 1;
                if *attempts == 1 {
                    Err("first try".into())
                } else {
                    Ok(())
                }
            }
            TestEvent::C(_) => Err("always".into()),
            TestEvent::D(_) => panic!("boom"),
        }
    }
}

fn emit_one_of_each(bus: &EventBus<TestEvent>) {
    for (i, kind) in TestKind::ALL_KINDS.into_iter().enumerate() {
        bus.emit(TestEvent::of(kind, i as u64));
    }
}

#[tokio::test(start_paused = true)]
async fn metrics_count_every_outcome() {
    let bus = EventBus::new();
    let retry = RetryPolicy::exponential(2).initial_backoff(Duration::from_millis(5));
    bus.spawn_with(Mixed::default(), ListenerOptions::new().retry(retry));
    emit_one_of_each(&bus);
    bus.emit(TestEvent::A(9));
    within("quiesce", bus.quiesce()).await;

    let metrics = bus.metrics();
    assert_eq!(metrics.emitted, 5);
    assert_eq!(metrics.emitted_of("test.a"), 2);
    assert_eq!(metrics.emitted_of("test.d"), 1);
    let mixed = metrics.listener("mixed").unwrap();
    assert_eq!(mixed.delivered, 5);
    assert_eq!(mixed.handled, 3); // A, A, B on its retry
    assert_eq!(mixed.failed, 5); // B once, C twice, D twice
    assert_eq!(mixed.retried, 3); // B, C, D once each
    assert_eq!(mixed.dead_lettered, 2); // C, D
    assert_eq!(mixed.panicked, 2);
    assert_eq!(mixed.failed, mixed.retried + mixed.dead_lettered);
    assert_eq!(mixed.handled + mixed.dead_lettered, mixed.delivered);
    assert_eq!(mixed.handle_latency.count, 8); // one sample per attempt
    assert_eq!(mixed.queue_latency.count, 5); // one sample per event
    assert_eq!((mixed.queue_depth, mixed.in_flight), (0, 0));
}

#[tokio::test]
async fn metrics_show_queue_depth_drops_and_overflow() {
    let bus = EventBus::new();
    let lossy = bus.spawn_with(Gated(Gate::closed()), ListenerOptions::new().capacity(3));
    // Ten fit under the backpressure ceiling of twice the capacity.
    let lossless = bus.spawn_with(
        Gated(Gate::closed()),
        ListenerOptions::new()
            .capacity(5)
            .lag_policy(LagPolicy::Backpressure),
    );
    for i in 0..10 {
        bus.emit(TestEvent::A(i));
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }

    // Ten events reached queues of 3 and 5 before either listener ran; then
    // each took one into its (stuck) handler.
    let lossy = lossy.metrics();
    assert_eq!((lossy.in_flight, lossy.queue_depth), (1, 2));
    assert_eq!(lossy.dropped, 7);
    assert_eq!(
        lossy.delivered + lossy.dropped + lossy.queue_depth as u64,
        10
    );
    let lossless = lossless.metrics();
    assert_eq!((lossless.in_flight, lossless.queue_depth), (1, 9));
    assert_eq!((lossless.dropped, lossless.overflowed), (0, 5));
}

#[tokio::test]
async fn metrics_serialize_to_json() {
    let bus = EventBus::new();
    bus.spawn(Mixed::default());
    bus.emit(TestEvent::A(1));
    within("quiesce", bus.quiesce()).await;

    let json = serde_json::to_value(bus.metrics()).unwrap();
    assert_eq!(json["emitted"], 1);
    assert_eq!(json["listeners"][0]["name"], "mixed");
    assert_eq!(json["listeners"][0]["handled"], 1);
    assert!(json["listeners"][0]["handle_latency"]["p99"].is_f64());
}

#[test]
fn a_stalled_log_sink_evicting_dead_letters_never_blocks_metrics_or_emits() {
    struct Fails;
    impl Listener<TestEvent> for Fails {
        fn interests(&self) -> event_bus::KindSet<TestKind> {
            TestKind::A.into()
        }

        async fn handle(
            &self,
            _: Arc<Envelope<TestEvent>>,
            _: event_bus::Meta,
        ) -> Result<(), HandlerError> {
            Err("down".into())
        }
    }

    let bus = EventBus::builder().dead_letter_capacity(1).build();
    let sink = SlowSink::held("evicted");
    // The listener runs on a thread whose log sink stalls on the eviction
    // warning until the test lets it go.
    let listener_thread = std::thread::spawn({
        let (bus, sink) = (bus.clone(), sink.clone());
        move || {
            let _default = sink.set_default();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let fails = bus.spawn(Fails);
                for i in 0..3 {
                    bus.emit(TestEvent::A(i));
                }
                within("quiesce", bus.quiesce()).await;
                fails.metrics().dead_lettered
            })
        }
    });

    let warned = sink.wait_entered(support::DEADLINE);
    let others_finished = warned
        && support::finishes_on_its_own({
            let bus = bus.clone();
            move || {
                for i in 0..100 {
                    let _ = bus.metrics();
                    let _ = bus.dead_letters().len();
                    bus.emit(TestEvent::B(i));
                }
            }
        });
    sink.release();
    let dead_lettered = listener_thread.join().unwrap();

    assert!(warned, "no eviction warning was logged");
    assert!(
        others_finished,
        "metrics, the dead-letter store or emits waited on the stalled log sink"
    );
    assert_eq!(dead_lettered, 3);
    assert_eq!(bus.metrics().dead_letters_evicted, 2);
}

#[tokio::test]
async fn listeners_that_end_while_the_bus_is_open_leave_its_metrics() {
    const CYCLES: usize = 2_000;
    let bus = EventBus::new();
    let running = bus.spawn(Gated(Gate::closed()));
    let mut last = None;
    for i in 0..CYCLES {
        let listener = bus.spawn(support::Recorder::new("short-lived", TestKind::A));
        bus.emit(TestEvent::A(i as u64));
        listener.abort();
        within("aborted listener to end", listener.finished()).await;
        last = Some(listener);
    }

    let listed: Vec<String> = bus
        .metrics()
        .listeners
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert!(
        listed.len() <= 1,
        "{} listeners listed, one running: {:?}…",
        listed.len(),
        &listed[..listed.len().min(3)]
    );
    assert!(bus.metrics().listener(running.name()).is_some());
    // A handle keeps its listener's metrics.
    let last = last.unwrap().metrics();
    assert!(last.finished);
    assert_eq!(last.delivered + last.dropped + last.queue_depth as u64, 1);

    // Listeners that drain at shutdown stay listed.
    let drains = bus.spawn(support::Recorder::new("drains", TestKind::B));
    bus.emit(TestEvent::B(0));
    running.abort();
    within("aborted listener to end", running.finished()).await;
    bus.shutdown(support::DEADLINE).await;
    let metrics = bus.metrics();
    let drained = metrics
        .listener("drains")
        .expect("a drained listener stays listed");
    assert!(drained.finished);
    assert_eq!(drained.handled, 1);
    assert_eq!(drains.metrics().handled, 1);
}

/// Fails about one attempt in four, and panics about one in nine.
#[derive(Default)]
struct Flaky {
    calls: std::sync::atomic::AtomicU64,
}

impl Listener<TestEvent> for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        let call = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let roll = (event.sequence() ^ call.wrapping_mul(0x9E37_79B9)) % 36;
        if roll % 9 == 0 {
            panic!("{}", support::INJECTED_PANIC);
        }
        if roll % 4 == 0 {
            return Err("flaky".into());
        }
        if roll % 3 == 0 {
            tokio::task::yield_now().await;
        }
        Ok(())
    }
}

/// Fails every event whose sequence is a multiple of 7, every time.
struct PartlyFailingBatches;

impl event_bus::BatchListener<TestEvent> for PartlyFailingBatches {
    fn name(&self) -> &str {
        "batched"
    }

    async fn handle_batch(
        &self,
        batch: &event_bus::Batch<TestEvent>,
    ) -> Result<(), event_bus::BatchError> {
        tokio::task::yield_now().await;
        let failed: Vec<usize> = batch
            .iter()
            .enumerate()
            .filter(|(_, event)| event.sequence() % 7 == 0)
            .map(|(at, _)| at)
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(event_bus::BatchError::events(failed, "sevens fail"))
        }
    }
}

/// The identities `ListenerMetrics` documents, checked on one snapshot of
/// a listener spawned before any emit and interested in every kind.
fn check_identities(emitted: u64, l: &event_bus::ListenerMetrics) -> Vec<(&'static str, String)> {
    let mut breaches = Vec::new();
    if l.delivered + l.dropped + l.queue_depth as u64 != emitted {
        breaches.push((
            "delivered + dropped + queue_depth == emitted",
            format!(
                "{}: delivered {} + dropped {} + queue_depth {} != emitted {emitted}",
                l.name, l.delivered, l.dropped, l.queue_depth
            ),
        ));
    }
    if l.delivered != l.handled + l.dead_lettered + l.in_flight as u64 {
        breaches.push((
            "delivered == handled + dead_lettered + in_flight",
            format!(
                "{}: delivered {} != handled {} + dead_lettered {} + in_flight {}",
                l.name, l.delivered, l.handled, l.dead_lettered, l.in_flight
            ),
        ));
    }
    if l.failed != l.retried + l.dead_lettered {
        breaches.push((
            "failed == retried + dead_lettered",
            format!(
                "{}: failed {} != retried {} + dead_lettered {}",
                l.name, l.failed, l.retried, l.dead_lettered
            ),
        ));
    }
    breaches
}

#[test]
fn every_metrics_snapshot_under_load_keeps_the_counting_identities() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const EMITTERS: u64 = 3;
    const EMITS: u64 = 50_000;
    const MOST_SNAPSHOTS: u64 = 200_000;
    support::quiet_injected_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bus = EventBus::<TestEvent>::builder().capacity(64).build();
    let retry = RetryPolicy::exponential(3)
        .initial_backoff(Duration::from_micros(200))
        .max_backoff(Duration::from_millis(2));
    runtime.block_on(async {
        bus.spawn_with(
            Flaky::default(),
            ListenerOptions::new().concurrency(4).retry(retry),
        );
        bus.spawn_with(
            support::Recorder::new("lossy", event_bus::KindSet::all()),
            ListenerOptions::new().capacity(8),
        );
        bus.spawn_with(
            PartlyFailingBatches,
            ListenerOptions::new()
                .max_batch(16)
                .concurrency(2)
                .retry(RetryPolicy::exponential(2).initial_backoff(Duration::from_micros(200))),
        );
        bus.spawn_with(
            support::Recorder::new("backpressured", event_bus::KindSet::all()),
            ListenerOptions::new()
                .capacity(16)
                .concurrency(2)
                .lag_policy(LagPolicy::Backpressure),
        );
    });

    let done = Arc::new(AtomicBool::new(false));
    let breaches = support::Breaches::default();
    let snapshots = std::thread::spawn({
        let (bus, done, breaches) = (bus.clone(), done.clone(), breaches.clone());
        move || {
            let mut taken = 0;
            while !done.load(Ordering::Acquire) && taken < MOST_SNAPSHOTS {
                let metrics = bus.metrics();
                for listener in &metrics.listeners {
                    for (rule, breach) in check_identities(metrics.emitted, listener) {
                        breaches.record(rule, || format!("snapshot {taken}: {breach}"));
                    }
                }
                taken += 1;
            }
            taken
        }
    });
    let emitters: Vec<_> = (0..EMITTERS)
        .map(|seed| {
            let bus = bus.clone();
            let handle = runtime.handle().clone();
            std::thread::spawn(move || {
                let mut rng = support::Rng::new(seed);
                for i in 0..EMITS {
                    let event = TestEvent::of(*rng.pick(&TestKind::ALL_KINDS), i);
                    match rng.below(8) {
                        0 => bus.with_priority(event_bus::Priority::High).emit(event),
                        1 => bus.with_priority(event_bus::Priority::Low).emit(event),
                        2 => handle.block_on(async {
                            within("emit_wait", bus.emit_wait(event)).await;
                        }),
                        _ => bus.emit(event),
                    }
                }
            })
        })
        .collect();
    for emitter in emitters {
        emitter.join().unwrap();
    }
    runtime.block_on(async { within("quiesce", bus.quiesce()).await });
    done.store(true, Ordering::Release);
    let taken = snapshots.join().unwrap();

    let metrics = bus.metrics();
    assert_eq!(metrics.emitted, EMITTERS * EMITS);
    for listener in &metrics.listeners {
        assert_eq!(check_identities(metrics.emitted, listener), []);
        assert_eq!((listener.queue_depth, listener.in_flight), (0, 0));
    }
    breaches.assert_none(&format!("{taken} snapshots"));
    runtime.block_on(bus.shutdown(support::DEADLINE));
}

#[test]
fn a_snapshot_never_counts_an_aborted_listener_both_listed_and_abandoned() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..1_000 {
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
        let bus = EventBus::new();
        let stuck = {
            let _runtime = runtime.enter();
            bus.spawn(Gated(Gate::closed()))
        };
        for i in 0..3 {
            bus.emit(TestEvent::A(i));
        }
        while stuck.metrics().in_flight != 1 {
            std::thread::yield_now();
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = std::thread::spawn({
            let (bus, stop) = (bus.clone(), stop.clone());
            move || {
                loop {
                    let last = stop.load(std::sync::atomic::Ordering::SeqCst);
                    let metrics = bus.metrics();
                    let listed: u64 = metrics
                        .listeners
                        .iter()
                        .map(|l| l.queue_depth as u64 + l.in_flight as u64)
                        .sum();
                    assert_eq!(listed + metrics.abandoned, 3, "{metrics:?}");
                    if last {
                        return;
                    }
                }
            }
        });
        stuck.abort();
        runtime.block_on(within("aborted listener to end", stuck.finished()));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        watcher.join().unwrap();
    }
}
