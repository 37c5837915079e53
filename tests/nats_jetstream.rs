//! What the JetStream tier promises beyond the shared scenarios: consumer
//! groups across connections, replay for a new listener, redelivery after
//! `ack_wait`, lease extension, backoff as the policy says, dead letters
//! that are never redelivered and can be redriven, dedup by event id, the
//! duplicate-window check, and no event lost across server restarts. Each
//! test starts a nats-server of its own; they are ignored in a plain
//! `cargo test`: `cargo test --test nats_jetstream -- --include-ignored`.

mod nats_tier;
// The suite's probes and waits; its scenarios run in `scenarios_nats`.
#[allow(unused_macros, unused_imports)]
mod scenarios;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::nats::{Config, Distributed, Error, JetStream, Start};
use event_bus::{Envelope, HandlerError, Listener, ListenerOptions, Meta, RetryPolicy};
use nats_tier::server::NatsServer;
use scenarios::probes::Probe;
use scenarios::{ScenarioEvent, until, within};
use tokio::time::Instant;

async fn connect(server: &NatsServer, prefix: &str) -> JetStream<ScenarioEvent> {
    JetStream::connect(&server.url(), Config::new(prefix))
        .await
        .expect("connect to the test's nats-server")
}

/// A short `ack_wait`, so that a lost delivery comes back within a test.
fn quick() -> Distributed {
    Distributed::new().ack_wait(Duration::from_millis(600))
}

async fn publish_all(jetstream: &JetStream<ScenarioEvent>, values: std::ops::Range<u64>) {
    for value in values {
        jetstream
            .publish(ScenarioEvent::UserCreated(value))
            .await
            .expect("the stream stores the event");
    }
}

/// Every attempt a listener made, with when it began.
#[derive(Clone, Default)]
struct Attempts {
    name: &'static str,
    /// Attempts of each event that fail before one succeeds.
    failures: u32,
    /// How long each attempt works.
    work: Duration,
    seen: Arc<Mutex<Vec<(u64, u32, Instant)>>>,
}

impl Attempts {
    fn seen(&self) -> Vec<(u64, u32, Instant)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Listener<ScenarioEvent> for Attempts {
    fn name(&self) -> &str {
        self.name
    }

    async fn handle(
        &self,
        event: Arc<Envelope<ScenarioEvent>>,
        meta: Meta,
    ) -> Result<(), HandlerError> {
        self.seen
            .lock()
            .unwrap()
            .push((event.value(), meta.attempt(), Instant::now()));
        // The handler's own work, which the test is about.
        tokio::time::sleep(self.work).await;
        if meta.attempt() <= self.failures {
            return Err(format!("attempt {} failed", meta.attempt()).into());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn two_groups_each_get_every_event_once_across_two_connections() {
    const EVENTS: u64 = 400;
    let server = NatsServer::start();
    let here = connect(&server, "groups").await;
    let there = connect(&server, "groups").await;
    let mut groups = Vec::new();
    for group in ["mailer", "indexer"] {
        let mut instances = Vec::new();
        for jetstream in [&here, &there] {
            let probe = Probe::new(group).yielding(1);
            let distributed = Distributed::new().group(group);
            jetstream
                .spawn_with(probe.clone(), ListenerOptions::new(), distributed)
                .await
                .expect("spawn");
            instances.push(probe);
        }
        groups.push(instances);
    }
    publish_all(&here, 0..EVENTS / 2).await;
    publish_all(&there, EVENTS / 2..EVENTS).await;
    let handled = |instances: &[Probe]| instances.iter().map(Probe::handled_count).sum::<usize>();
    until("both groups to handle every event", || {
        groups
            .iter()
            .all(|instances| handled(instances) >= EVENTS as usize)
    })
    .await;
    here.shutdown(Duration::from_secs(10)).await;
    there.shutdown(Duration::from_secs(10)).await;

    for instances in &groups {
        let mut values: Vec<u64> = instances.iter().flat_map(Probe::handled_values).collect();
        values.sort_unstable();
        assert_eq!(
            values,
            (0..EVENTS).collect::<Vec<_>>(),
            "each event once per group"
        );
        assert!(
            instances.iter().all(|probe| probe.handled_count() > 0),
            "both connections share the group's work"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_new_listener_from_the_beginning_receives_old_events() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "replay").await;
    publish_all(&jetstream, 0..20).await;
    let late = Probe::new("late");
    let now = Probe::new("now");
    let from_start = Distributed::new().start(Start::Beginning);
    jetstream
        .spawn_with(late.clone(), ListenerOptions::new(), from_start)
        .await
        .expect("spawn");
    jetstream
        .spawn_with(now.clone(), ListenerOptions::new(), Distributed::new())
        .await
        .expect("spawn");
    publish_all(&jetstream, 20..25).await;
    until("the late listener to catch up", || {
        late.handled_count() == 25
    })
    .await;
    until("the other to see what came after it", || {
        now.handled_count() == 5
    })
    .await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(late.handled_values(), (0..25).collect::<Vec<_>>());
    assert_eq!(now.handled_values(), (20..25).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn an_event_held_by_a_stopped_listener_is_redelivered_after_ack_wait() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "ackwait").await;
    let stopped = Probe::new("worker").holding(3, 1);
    let first = jetstream
        .spawn_with(
            stopped.clone(),
            ListenerOptions::new(),
            quick().group("workers"),
        )
        .await
        .expect("spawn");
    publish_all(&jetstream, 0..6).await;
    until("event 3 to be in the handler", || stopped.entered(3, 1)).await;
    first.abort();
    within("the stopped listener to end", first.finished()).await;
    let taken_over_at = Instant::now();
    let second = Probe::new("worker");
    jetstream
        .spawn_with(
            second.clone(),
            ListenerOptions::new(),
            quick().group("workers"),
        )
        .await
        .expect("spawn");
    until("the group to handle the rest", || {
        second.handled_count() == 3
    })
    .await;
    jetstream.shutdown(Duration::from_secs(10)).await;

    assert_eq!(stopped.handled_values(), [0, 1, 2]);
    assert_eq!(second.handled_values(), [3, 4, 5]);
    let again = second
        .handled()
        .into_iter()
        .find(|call| call.value == 3)
        .expect("event 3");
    assert_eq!(again.attempt, 2, "the delivery cut short counts");
    assert!(taken_over_at.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_handler_longer_than_ack_wait_keeps_its_message() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "lease").await;
    let slow = Attempts {
        name: "slow",
        work: Duration::from_millis(2_000),
        ..Attempts::default()
    };
    let other = Probe::new("slow");
    jetstream
        .spawn_with(slow.clone(), ListenerOptions::new(), quick())
        .await
        .expect("spawn");
    // A second instance of the group: it would be handed the message if
    // the first one's lease lapsed.
    jetstream
        .spawn_with(other.clone(), ListenerOptions::new(), quick())
        .await
        .expect("spawn");
    publish_all(&jetstream, 0..1).await;
    until("the slow handler to start", || !slow.seen().is_empty()).await;
    jetstream.shutdown(Duration::from_secs(20)).await;

    let seen = slow.seen();
    assert_eq!(
        seen.len(),
        1,
        "{:?}",
        seen.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>()
    );
    assert_eq!(seen[0].1, 1);
    assert!(
        other.calls().is_empty(),
        "the message was handed out again: {:?}",
        other.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn retries_wait_the_policy_backoff_and_count_attempts() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "backoff").await;
    let flaky = Attempts {
        name: "flaky",
        failures: 3,
        ..Attempts::default()
    };
    let policy = RetryPolicy::exponential(4)
        .initial_backoff(Duration::from_millis(200))
        .jitter(false);
    let options = ListenerOptions::new().retry(policy);
    let handle = jetstream
        .spawn_with(flaky.clone(), options, Distributed::new())
        .await
        .expect("spawn");
    publish_all(&jetstream, 0..1).await;
    until("the fourth attempt", || flaky.seen().len() == 4).await;
    until("it to be handled", || handle.report().handled == 1).await;
    jetstream.shutdown(Duration::from_secs(10)).await;

    let seen = flaky.seen();
    let attempts: Vec<u32> = seen.iter().map(|s| s.1).collect();
    assert_eq!(attempts, [1, 2, 3, 4]);
    for (retry, pair) in (1..).zip(seen.windows(2)) {
        let waited = pair[1].2 - pair[0].2;
        assert!(
            waited >= policy.backoff(retry),
            "retry {retry} came after {waited:?}, before its backoff {:?}",
            policy.backoff(retry)
        );
    }
    assert!(jetstream.dead_letters(None).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn the_last_attempt_ends_in_the_dead_letter_stream_and_can_be_redriven_or_discarded() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "dead").await;
    let policy = RetryPolicy::exponential(2).initial_backoff(Duration::from_millis(10));
    let failing = Probe::new("failing").failing(1, 2).failing(2, 2);
    let witness = Probe::new("witness");
    let handle = jetstream
        .spawn_with(
            failing.clone(),
            ListenerOptions::new().retry(policy),
            quick(),
        )
        .await
        .expect("spawn");
    jetstream
        .spawn_with(witness.clone(), ListenerOptions::new(), quick())
        .await
        .expect("spawn");
    publish_all(&jetstream, 0..4).await;
    within("two dead letters", async {
        while jetstream
            .dead_letters(Some("failing"))
            .await
            .expect("list")
            .len()
            < 2
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    until("the others to be handled", || {
        failing.handled_values() == [0, 3]
    })
    .await;

    let letters = jetstream.dead_letters(None).await.expect("list");
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.listener, "failing");
        assert_eq!(letter.attempts, 2);
        assert!(letter.error.contains("fail"), "{letter:?}");
        assert!(letter.envelope.is_some());
    }
    // Past max_deliver and ack_wait: a terminated message never comes back.
    let calls_at_death = failing.calls().len();
    let (pending, out) = handle.pending().await.expect("consumer state");
    assert_eq!((pending, out), (0, 0));

    // Redriven to the failing listener alone, as a new message: its
    // attempts start again (and, as its handler still fails on it, it ends
    // in the dead-letter stream again); the witness does not see it.
    let one = letters
        .iter()
        .find(|l| l.envelope.as_ref().is_some_and(|e| e.value() == 1))
        .expect("event 1");
    assert_eq!(
        jetstream
            .redrive("failing", Some(one.sequence))
            .await
            .expect("redrive"),
        1
    );
    let attempts_of_one = || {
        failing
            .calls()
            .iter()
            .filter(|call| call.value == 1)
            .map(|call| call.attempt)
            .collect::<Vec<_>>()
    };
    until("the redriven event to be attempted afresh", || {
        attempts_of_one() == [1, 2, 1, 2]
    })
    .await;
    within("the redriven event's dead letter", async {
        while jetstream
            .dead_letters(Some("failing"))
            .await
            .expect("list")
            .len()
            < 2
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(
        jetstream.discard("failing", None).await.expect("discard"),
        2
    );
    assert!(jetstream.dead_letters(None).await.expect("list").is_empty());
    jetstream.shutdown(Duration::from_secs(10)).await;

    assert_eq!(failing.calls().len(), calls_at_death + 2);
    assert_eq!(witness.handled_values(), [0, 1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_republished_event_is_stored_once() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "dedup").await;
    let envelope = Envelope::new(ScenarioEvent::UserCreated(7));
    let first = jetstream
        .publish_envelope(&envelope)
        .await
        .expect("publish");
    let again = jetstream
        .publish_envelope(&envelope)
        .await
        .expect("publish");
    let next = jetstream
        .publish(ScenarioEvent::UserCreated(8))
        .await
        .expect("publish");
    assert_eq!(first, again, "the same id is the same message");
    assert_eq!(next, first + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_duplicate_window_shorter_than_the_retry_span_is_refused() {
    let server = NatsServer::start();
    let short = Config::new("window")
        .duplicate_window(Duration::from_secs(5))
        .publish_retry(Duration::from_secs(5));
    JetStream::<ScenarioEvent>::connect(&server.url(), short)
        .await
        .expect("a window that covers the span");
    let long_retry = Config::new("window").publish_retry(Duration::from_secs(60));
    let refused = JetStream::<ScenarioEvent>::connect(&server.url(), long_retry).await;
    assert!(
        matches!(refused, Err(Error::DuplicateWindow { window, span }) if window == Duration::from_secs(5) && span == Duration::from_secs(60)),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn every_event_is_handled_across_two_server_restarts() {
    const EVENTS: u64 = 10_000;
    let mut server = NatsServer::start();
    let jetstream = connect(&server, "restart").await;
    let probe = Probe::new("survivor");
    let options = ListenerOptions::new().concurrency(8);
    jetstream
        .spawn_with(
            probe.clone(),
            options,
            Distributed::new().ack_wait(Duration::from_secs(2)),
        )
        .await
        .expect("spawn");
    let started = Instant::now();
    for value in 0..EVENTS {
        if value == EVENTS / 3 || value == EVENTS / 2 {
            tokio::task::block_in_place(|| server.restart());
        }
        jetstream
            .publish(ScenarioEvent::UserCreated(value))
            .await
            .unwrap_or_else(|error| panic!("event {value} was not stored: {error}"));
    }
    let deadline = started + Duration::from_secs(120);
    let distinct = || {
        probe
            .handled()
            .iter()
            .map(|call| call.value)
            .collect::<HashSet<_>>()
    };
    while distinct().len() < EVENTS as usize {
        assert!(
            Instant::now() < deadline,
            "{} of {EVENTS} events handled after two restarts",
            distinct().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(distinct(), (0..EVENTS).collect::<HashSet<_>>());
}
