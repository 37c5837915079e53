//! Failed handlers are retried with exponential backoff; after the last
//! attempt the event becomes a dead letter with the attempt count.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::{Envelope, EventBus, HandlerError, Listener, ListenerOptions, RetryPolicy};
use futures::StreamExt;
use support::{TestEvent, within};
use tokio::time::Instant;

/// Fails its first `failures` attempts, recording when each attempt ran.
#[derive(Clone)]
struct FailsThenSucceeds {
    failures: usize,
    attempts: Arc<Mutex<Vec<Instant>>>,
}

impl FailsThenSucceeds {
    fn new(failures: usize) -> Self {
        Self {
            failures,
            attempts: Arc::default(),
        }
    }

    fn gaps(&self) -> Vec<Duration> {
        let attempts = self.attempts.lock().unwrap();
        attempts.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

impl Listener<TestEvent> for FailsThenSucceeds {
    async fn handle(
        &self,
        _: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        let mut attempts = self.attempts.lock().unwrap();
        attempts.push(Instant::now());
        if attempts.len() <= self.failures {
            return Err("not yet".into());
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn failed_handler_is_retried_with_exponential_backoff() {
    let bus = EventBus::new();
    let listener = FailsThenSucceeds::new(3);
    let retry = RetryPolicy::exponential(5)
        .initial_backoff(Duration::from_millis(100))
        .jitter(false);
    let handle = bus.spawn_with(listener.clone(), ListenerOptions::new().retry(retry));

    bus.emit(TestEvent::A(1));
    within("quiesce", bus.quiesce()).await;

    assert_eq!(
        listener.gaps(),
        [100, 200, 400].map(Duration::from_millis).to_vec()
    );
    let metrics = handle.metrics();
    assert_eq!(
        (
            metrics.handled,
            metrics.failed,
            metrics.retried,
            metrics.dead_lettered
        ),
        (1, 3, 3, 0)
    );
    assert!(bus.dead_letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn jittered_backoff_stays_between_half_and_all_of_the_delay() {
    let bus = EventBus::new();
    let listener = FailsThenSucceeds::new(6);
    let retry = RetryPolicy::exponential(7)
        .initial_backoff(Duration::from_millis(100))
        .max_backoff(Duration::from_millis(800));
    bus.spawn_with(listener.clone(), ListenerOptions::new().retry(retry));

    bus.emit(TestEvent::A(1));
    within("quiesce", bus.quiesce()).await;

    let nominal = [100, 200, 400, 800, 800, 800].map(Duration::from_millis);
    let gaps = listener.gaps();
    assert_eq!(gaps.len(), nominal.len());
    for (gap, nominal) in gaps.iter().zip(nominal) {
        assert!(
            *gap >= nominal / 2 && *gap <= nominal,
            "{gap:?} vs {nominal:?}"
        );
    }
}

#[derive(Debug, thiserror::Error)]
#[error("could not index post")]
struct IndexError(#[source] std::io::Error);

struct AlwaysFails;

impl Listener<TestEvent> for AlwaysFails {
    fn name(&self) -> &str {
        "indexer"
    }

    async fn handle(
        &self,
        _: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        let cause = std::io::Error::other("connection refused");
        Err(IndexError(cause).into())
    }
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_become_a_dead_letter_with_the_attempt_count() {
    let bus = EventBus::new();
    let mut letters = bus.dead_letters().subscribe();
    let retry = RetryPolicy::exponential(4).initial_backoff(Duration::from_millis(10));
    let handle = bus.spawn_with(AlwaysFails, ListenerOptions::new().retry(retry));

    let mut recorder = event_bus::testing::EventRecorder::new(&bus);
    bus.emit(TestEvent::B(9));
    let emitted = recorder.events()[0].clone();

    let letter = within("dead letter", letters.recv()).await.unwrap();
    assert_eq!(letter.listener.as_ref(), "indexer");
    assert_eq!(letter.attempts, 4);
    assert_eq!(letter.error, "could not index post: connection refused");
    assert_eq!(letter.envelope.id(), emitted.id());
    assert_eq!(**letter.envelope, TestEvent::B(9));

    within("quiesce", bus.quiesce()).await;
    let metrics = handle.metrics();
    assert_eq!(
        (
            metrics.failed,
            metrics.retried,
            metrics.dead_lettered,
            metrics.handled
        ),
        (4, 3, 1, 0)
    );
    assert_eq!(bus.dead_letters().len(), 1);
}

#[tokio::test]
async fn dead_letter_store_keeps_the_newest_and_counts_evictions() {
    let bus = EventBus::builder().dead_letter_capacity(2).build();
    bus.spawn(AlwaysFails);
    for i in 0..5 {
        bus.emit(TestEvent::A(i));
    }
    within("quiesce", bus.quiesce()).await;

    let kept: Vec<u64> = bus
        .dead_letters()
        .take()
        .iter()
        .map(|l| l.envelope.value())
        .collect();
    assert_eq!(kept, [3, 4]);
    assert_eq!(bus.metrics().dead_letters_evicted, 3);
    assert!(bus.dead_letters().is_empty());
}

#[tokio::test]
async fn dead_letter_subscription_sees_every_letter_and_ends_after_shutdown() {
    let bus = EventBus::builder().dead_letter_capacity(1).build();
    let letters = bus.dead_letters().subscribe();
    bus.spawn(AlwaysFails);
    for i in 0..3 {
        bus.emit(TestEvent::A(i));
    }
    bus.shutdown(support::DEADLINE).await;

    let values: Vec<u64> = within("letters", letters.map(|l| l.envelope.value()).collect()).await;
    assert_eq!(values, [0, 1, 2]);
}
