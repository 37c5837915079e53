//! With the `metrics` feature, the bus's counters go through the `metrics`
//! crate facade. Run with `cargo test -p event-bus --all-features`.
#![cfg(feature = "metrics")]

use std::sync::Arc;
use std::time::Duration;

use event_bus::{
    DomainEvent, Envelope, EventBus, HandlerError, Listener, ListenerOptions, RetryPolicy,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

type Labels = Vec<(String, String)>;

/// A series the recorder holds: its name, labels and value.
type Series = (String, Labels, DebugValue);

/// The series the recorder holds.
fn exported(snapshotter: &Snapshotter) -> Vec<Series> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.key().name().to_owned(), labels, value)
        })
        .collect()
}

/// The value of the series named `name` that carries `label`.
fn value<'a>(exported: &'a [Series], name: &str, label: (&str, &str)) -> Option<&'a DebugValue> {
    exported
        .iter()
        .find(|(n, labels, _)| {
            n == name && labels.contains(&(label.0.to_owned(), label.1.to_owned()))
        })
        .map(|(_, _, value)| value)
}

#[derive(Debug, DomainEvent)]
enum TestEvent {
    A(u64),
    B(u64),
    C(u64),
    D(u64),
}

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
    bus.emit_a(0);
    bus.emit_b(1);
    bus.emit_c(2);
    bus.emit_d(3);
}

#[tokio::test(start_paused = true)]
async fn metrics_are_exported_through_the_metrics_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The bus registers its counters when it and its listeners are made.
    let bus = metrics::with_local_recorder(&recorder, || {
        let bus = EventBus::new();
        let retry = RetryPolicy::exponential(2).initial_backoff(Duration::from_millis(5));
        bus.spawn_with(Mixed::default(), ListenerOptions::new().retry(retry));
        bus
    });
    emit_one_of_each(&bus);
    tokio::time::timeout(Duration::from_secs(10), bus.quiesce())
        .await
        .unwrap();

    let exported = exported(&snapshotter);
    let counter = |name: &str, label: (&str, &str)| value(&exported, name, label);

    assert_eq!(
        counter("event_bus_emitted_total", ("event", "b")),
        Some(&DebugValue::Counter(1))
    );
    for (name, value) in [
        ("event_bus_handled_total", 2),
        ("event_bus_failed_total", 5),
        ("event_bus_retried_total", 3),
        ("event_bus_dead_lettered_total", 2),
        ("event_bus_panicked_total", 2),
    ] {
        assert_eq!(
            counter(name, ("listener", "mixed")),
            Some(&DebugValue::Counter(value)),
            "{name}"
        );
    }
    match counter("event_bus_handle_seconds", ("listener", "mixed")) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 7),
        other => panic!("no handle latency histogram: {other:?}"),
    }
}

/// The series exported for a bus with `subscriptions` subscriptions that
/// each received events.
fn series_with_subscriptions(subscriptions: usize) -> Vec<(String, Labels)> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let (bus, held) = metrics::with_local_recorder(&recorder, || {
        let bus = EventBus::<TestEvent>::new();
        let held: Vec<_> = (0..subscriptions)
            .map(|_| bus.subscribe_with(TestEventKind::A, 1, event_bus::LagPolicy::DropOldest))
            .collect();
        (bus, held)
    });
    bus.emit_a(0);
    bus.emit_a(1);
    drop(held);
    exported(&snapshotter)
        .into_iter()
        .map(|(name, labels, _)| (name, labels))
        .collect()
}

#[test]
fn subscriptions_do_not_add_a_label_value_each() {
    let one = series_with_subscriptions(1);
    let hundred = series_with_subscriptions(100);
    let queue_labels: std::collections::BTreeSet<String> = hundred
        .iter()
        .flat_map(|(_, labels)| labels.iter())
        .filter(|(key, _)| key == "queue")
        .map(|(_, value)| value.clone())
        .collect();
    assert_eq!(
        hundred.len(),
        one.len(),
        "100 subscriptions export {} series where one exports {}; queue labels: {} values, \
         such as {:?}",
        hundred.len(),
        one.len(),
        queue_labels.len(),
        queue_labels.iter().take(3).collect::<Vec<_>>()
    );
}

/// Holds every event it is handed, so its queue stays as the emits left it.
struct Stuck(event_bus::KindSet<TestEventKind>);

impl Listener<TestEvent> for Stuck {
    fn name(&self) -> &str {
        "indexer"
    }

    fn interests(&self) -> event_bus::KindSet<TestEventKind> {
        self.0.clone()
    }

    async fn handle(
        &self,
        _: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn listeners_of_one_name_add_up_in_the_queue_depth_gauge() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let (bus, first, second) = metrics::with_local_recorder(&recorder, || {
        let bus = EventBus::new();
        let first = bus.spawn(Stuck(event_bus::KindSet::all()));
        let second = bus.spawn(Stuck(TestEventKind::A.into()));
        (bus, first, second)
    });
    // Neither listener has run yet on this thread: both queues hold all.
    for i in 0..3 {
        bus.emit_a(i);
    }
    for i in 0..2 {
        bus.emit_b(i);
    }
    let depth: u64 = [&first, &second]
        .iter()
        .map(|l| l.metrics().queue_depth as u64)
        .sum();
    assert_eq!(depth, 5 + 3);

    let exported = exported(&snapshotter);
    assert_eq!(
        value(&exported, "event_bus_queue_depth", ("queue", "indexer")),
        Some(&DebugValue::Gauge(8.0.into())),
        "two listeners named `indexer` hold 5 and 3 events"
    );
}
