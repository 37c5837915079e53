//! `Metadata` and `Envelope::from_parts` / `into_parts`
//! (event-bus/src/envelope.rs): id, sequence, priority, emit time (exactly,
//! before 1970 and far ahead) and trace context come back as given.

mod scripted;

use std::time::{Duration, SystemTime};

use event_bus::{Envelope, Metadata, Priority, TraceParent};
use scripted::Ev;
use uuid::Uuid;

fn times() -> Vec<SystemTime> {
    let epoch = SystemTime::UNIX_EPOCH;
    vec![
        epoch,
        epoch + Duration::new(1_717_000_000, 123_456_789),
        epoch - Duration::new(0, 1),
        epoch - Duration::new(1, 500_000_000),
        epoch - Duration::from_secs(86_400 * 365 * 3000),
        epoch + Duration::from_secs(86_400 * 365 * 100_000),
        epoch + Duration::new(i64::MAX as u64 / 2, 999_999_999),
        epoch - Duration::new(i64::MAX as u64 / 2, 999_999_999),
        SystemTime::now(),
        SystemTime::now() + Duration::from_nanos(1),
    ]
}

#[test]
fn parts_round_trip_exactly() {
    let trace = TraceParent::new([7; 16], [9; 8], 1).unwrap();
    for (n, at) in times().into_iter().enumerate() {
        for traced in [None, Some(trace)] {
            for priority in [Priority::High, Priority::Normal, Priority::Low] {
                let id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + n as u128);
                let metadata = Metadata::new(id)
                    .with_sequence(u64::MAX - n as u64)
                    .with_priority(priority)
                    .with_emitted_at(at)
                    .with_traceparent(traced);
                let envelope = Envelope::from_parts(Ev::Job(n as u64), metadata.clone());
                assert_eq!(envelope.id(), id);
                assert_eq!(envelope.sequence(), u64::MAX - n as u64);
                assert_eq!(envelope.priority(), priority);
                assert_eq!(envelope.emitted_at(), at, "time {n}");
                assert_eq!(envelope.traceparent(), traced);
                let meta = event_bus::Meta::new(&envelope, 2);
                assert_eq!(
                    (
                        meta.id(),
                        meta.sequence(),
                        meta.priority(),
                        meta.traceparent()
                    ),
                    (id, u64::MAX - n as u64, priority, traced)
                );
                let (event, back) = envelope.into_parts();
                assert_eq!(event, Ev::Job(n as u64));
                assert_eq!(back, metadata);
                assert_eq!(back.emitted_at(), at);
                // Through the builder again, with the parts read back.
                let rebuilt = Metadata::new(back.id())
                    .with_sequence(back.sequence())
                    .with_priority(back.priority())
                    .with_emitted_at(back.emitted_at())
                    .with_traceparent(back.traceparent());
                assert_eq!(rebuilt, metadata, "time {n}");
            }
        }
    }
}

#[test]
fn traceparent_set_then_cleared_is_as_never_set() {
    let trace = TraceParent::new([1; 16], [2; 8], 0).unwrap();
    for at in times() {
        let plain = Metadata::new(Uuid::nil()).with_emitted_at(at);
        let cleared = plain.clone().with_traceparent(trace).with_traceparent(None);
        assert_eq!(cleared, plain);
        assert_eq!(cleared.traceparent(), None);
        assert_eq!(cleared.emitted_at(), at);
        // Cleared before the time is set, too.
        let early = Metadata::new(Uuid::nil())
            .with_traceparent(trace)
            .with_traceparent(None)
            .with_emitted_at(at);
        assert_eq!(early, plain);
        // And set again after clearing.
        let again = cleared.with_traceparent(trace);
        assert_eq!(again.traceparent(), Some(trace));
        assert_ne!(again, plain);
    }
}

#[test]
fn an_emitted_envelope_equals_its_metadata_with_its_time_given() {
    for priority in [Priority::High, Priority::Normal, Priority::Low] {
        let envelope = Envelope::with_priority(Ev::Job(1), priority);
        let at = envelope.emitted_at();
        // The id's millisecond is the emit's.
        let millis = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (secs, nanos) = envelope.id().get_timestamp().unwrap().to_unix();
        assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, millis);
        let (_, metadata) = envelope.into_parts();
        let given = metadata.clone().with_emitted_at(at);
        assert_eq!(given, metadata);
        assert_eq!(given.emitted_at(), metadata.emitted_at());
        // Times that differ by a nanosecond differ.
        assert_ne!(
            metadata
                .clone()
                .with_emitted_at(at + Duration::from_nanos(1)),
            metadata
        );
    }
}

/// A far-away emit time runs through the runner (its latency measured
/// through the anchor) and reaches the handler exactly.
#[tokio::test]
async fn far_away_emit_times_run_through_the_runner() {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use event_bus::runner::{self, Delivery, Retry, Source, Undecodable};
    use event_bus::{HandlerError, ListenerOptions, Meta};
    use scripted::Letters;

    struct Given(VecDeque<Arc<Envelope<Ev>>>);
    struct Entry(Arc<Envelope<Ev>>);
    impl Delivery<Ev> for Entry {
        fn envelope(&self) -> &Arc<Envelope<Ev>> {
            &self.0
        }
        fn attempt(&self) -> u32 {
            1
        }
        async fn ack(self) {}
        async fn retry(self, _: Duration, _error: &str) -> Retry<Self> {
            Retry::InPlace(self)
        }
        async fn terminate(self, _: &str) {}
        async fn release(self) {}
    }
    impl Source<Ev> for Given {
        type Delivery = Entry;
        fn poll_next(&mut self, _: &mut Context<'_>) -> Poll<Option<Result<Entry, Undecodable>>> {
            Poll::Ready(self.0.pop_front().map(|e| Ok(Entry(e))))
        }
    }
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<SystemTime>>>);
    impl event_bus::Listener<Ev> for Seen {
        async fn handle(&self, event: Arc<Envelope<Ev>>, _: Meta) -> Result<(), HandlerError> {
            self.0.lock().unwrap().push(event.emitted_at());
            Ok(())
        }
    }

    let envelopes = times()
        .into_iter()
        .map(|at| {
            Arc::new(Envelope::from_parts(
                Ev::Job(1),
                Metadata::new(Uuid::nil()).with_emitted_at(at),
            ))
        })
        .collect();
    let seen = Seen::default();
    let report = runner::run(
        seen.clone(),
        Given(envelopes),
        Arc::new(Letters::default()),
        ListenerOptions::new(),
    )
    .await;
    assert_eq!(report.handled, times().len() as u64);
    let got = seen.0.lock().unwrap().clone();
    assert_eq!(got.len(), times().len());
    for (got, want) in got.iter().zip(times()) {
        // `SystemTime::now()` entries are read twice; compare the fixed ones.
        if want
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(true, |d| {
                d.as_secs()
                    != SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap()
                        .as_secs()
            })
        {
            assert_eq!(*got, want);
        }
    }
}
