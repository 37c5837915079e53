//! With the `metrics` feature, the bus's counters go through the `metrics`
//! crate facade. Run with `cargo test -p event-bus --all-features`.
#![cfg(feature = "metrics")]

use std::sync::Arc;
use std::time::Duration;

use event_bus::{
    DomainEvent, Envelope, EventBus, HandlerError, Listener, ListenerOptions, RetryPolicy,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

type Labels = Vec<(String, String)>;

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

    async fn handle(&self, event: Arc<Envelope<TestEvent>>) -> Result<(), HandlerError> {
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

    let exported: Vec<(String, Labels, DebugValue)> = snapshotter
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
        .collect();
    let counter = |name: &str, label: (&str, &str)| {
        exported
            .iter()
            .find(|(n, labels, _)| {
                n == name && labels.contains(&(label.0.to_owned(), label.1.to_owned()))
            })
            .map(|(_, _, value)| value)
    };

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
