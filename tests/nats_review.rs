//! An adversarial review of the JetStream tier: small programs that try to
//! break the promises of `event_bus::nats` (its module docs' "Guarantees"),
//! each on a nats-server of its own on 127.0.0.1. A test that found a bug
//! the library now fixes guards the fix; one whose fix is not clear is
//! ignored with its finding. Run them with
//! `cargo test --test nats_review -- --ignored --test-threads=2`.

mod nats_tier;
// The suite's probes and waits; its scenarios run in `scenarios_nats`.
#[allow(unused_macros, unused_imports)]
mod scenarios;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::codec::JsonCodec;
use event_bus::nats::{Config, Distributed, JetStream, Start};
use event_bus::{
    Batch, BatchError, BatchFailure, BatchListener, DomainEvent, Envelope, EventKind, HandlerError,
    KindSet, Listener, ListenerOptions, Meta, Publish, RetryPolicy, Scope,
};
use futures::StreamExt;
use nats_tier::proxy::Proxy;
use nats_tier::server::NatsServer;
use scenarios::probes::Probe;
use scenarios::{ScenarioEvent, ScenarioEventKind, until, within};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// How long a test waits for anything that should happen.
const DEADLINE: Duration = Duration::from_secs(30);

async fn connect_to(url: &str, config: Config) -> JetStream<ScenarioEvent> {
    JetStream::connect(url, config)
        .await
        .expect("connect to the test's nats-server")
}

async fn connect(server: &NatsServer, prefix: &str) -> JetStream<ScenarioEvent> {
    connect_to(&server.url(), Config::new(prefix)).await
}

/// A plain client of the test's own, beside the tier's.
async fn raw_client(server: &NatsServer) -> async_nats::Client {
    async_nats::connect(server.url())
        .await
        .expect("connect to the test's nats-server")
}

/// A short `ack_wait`, so that a lost delivery comes back within a test.
fn quick() -> Distributed {
    Distributed::new().ack_wait(Duration::from_millis(600))
}

/// Looks at `check` until it holds, or panics naming `what` after
/// [`DEADLINE`]: for conditions only the server can tell.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {DEADLINE:?}"
        );
        // A poll between looks at the server's state, bounded by the
        // deadline.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every message the stream `name` holds, in order: its sequence, its
/// event's id (its `Nats-Msg-Id`) and the event it decodes to.
async fn stored(
    client: &async_nats::Client,
    name: &str,
) -> Vec<(u64, Option<String>, Option<ScenarioEvent>)> {
    let context = async_nats::jetstream::new(client.clone());
    let mut stream = context.get_stream(name).await.expect("the event stream");
    let state = stream
        .info()
        .await
        .expect("the stream's state")
        .state
        .clone();
    let mut messages = Vec::new();
    for sequence in state.first_sequence..=state.last_sequence {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        let envelope = JsonCodec.decode::<ScenarioEvent>(&message.payload).ok();
        let id = envelope.as_ref().map(|envelope| envelope.id().to_string());
        let event = envelope.map(|envelope| envelope.event().clone());
        messages.push((sequence, id, event));
    }
    messages
}

/// A consumer's state as the server has it.
async fn consumer_info(
    client: &async_nats::Client,
    stream: &str,
    consumer: &str,
) -> async_nats::jetstream::consumer::Info {
    let context = async_nats::jetstream::new(client.clone());
    let stream = context.get_stream(stream).await.expect("the event stream");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(consumer)
        .await
        .expect("the listener's consumer");
    consumer.info().await.expect("the consumer's state").clone()
}

/// A listener that counts how many of its calls run at once, and whose
/// calls wait at a gate until it is opened.
#[derive(Clone)]
struct Gauge {
    name: &'static str,
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    entered: Arc<AtomicUsize>,
    handled: Arc<Mutex<Vec<u64>>>,
    gate: Arc<Semaphore>,
}

impl Gauge {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            now: Arc::default(),
            most: Arc::default(),
            entered: Arc::default(),
            handled: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
    }
}

impl Listener<ScenarioEvent> for Gauge {
    fn name(&self) -> &str {
        self.name
    }

    async fn handle(
        &self,
        event: Arc<Envelope<ScenarioEvent>>,
        _meta: Meta,
    ) -> Result<(), HandlerError> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.entered.fetch_add(1, Ordering::SeqCst);
        let _ = self.gate.acquire().await.map(|permit| permit.forget());
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.handled.lock().unwrap().push(event.value());
        Ok(())
    }
}

/// A batch as a [`Batcher`] saw it: each event's value and attempt.
type SeenBatch = Vec<(u64, u32)>;

/// A batch listener that records every batch (each event's value and
/// attempt), fails the events `failing` names at their first attempts, and
/// holds its first batch at a gate when asked to.
#[derive(Clone)]
struct Batcher {
    name: &'static str,
    /// Per value: how many of its first attempts fail (`u32::MAX`: all).
    failing: HashMap<u64, u32>,
    hold_first: bool,
    gate: Arc<Semaphore>,
    batches: Arc<Mutex<Vec<SeenBatch>>>,
    handled: Arc<Mutex<Vec<u64>>>,
}

impl Batcher {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            failing: HashMap::new(),
            hold_first: false,
            gate: Arc::new(Semaphore::new(0)),
            batches: Arc::default(),
            handled: Arc::default(),
        }
    }

    fn failing(mut self, value: u64, attempts: u32) -> Self {
        self.failing.insert(value, attempts);
        self
    }

    fn holding_first(mut self) -> Self {
        self.hold_first = true;
        self
    }

    fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    fn batches(&self) -> Vec<SeenBatch> {
        self.batches.lock().unwrap().clone()
    }

    fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
    }
}

impl BatchListener<ScenarioEvent> for Batcher {
    fn name(&self) -> &str {
        self.name
    }

    async fn handle_batch(&self, batch: &Batch<ScenarioEvent>) -> Result<(), BatchError> {
        let seen: Vec<(u64, u32)> = batch
            .iter()
            .map(|event| event.value())
            .zip(batch.attempts().iter().copied())
            .collect();
        let first = {
            let mut batches = self.batches.lock().unwrap();
            batches.push(seen.clone());
            batches.len() == 1
        };
        if first && self.hold_first {
            let _ = self.gate.acquire().await.map(|permit| permit.forget());
        }
        let failed: Vec<usize> = seen
            .iter()
            .enumerate()
            .filter(|(_, (value, attempt))| {
                self.failing
                    .get(value)
                    .is_some_and(|failing| attempt <= failing)
            })
            .map(|(index, _)| index)
            .collect();
        let mut handled = self.handled.lock().unwrap();
        match batch.failure_mode() {
            BatchFailure::StopAtFirst => {
                let upto = failed.first().copied().unwrap_or(seen.len());
                handled.extend(seen[..upto].iter().map(|(value, _)| *value));
            }
            _ => handled.extend(
                seen.iter()
                    .enumerate()
                    .filter(|(index, _)| !failed.contains(index))
                    .map(|(_, (value, _))| *value),
            ),
        }
        drop(handled);
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::events(failed, "scripted failure"))
        }
    }
}

// --- Publishing ---------------------------------------------------------

/// The value of the event the publish tests look for in the client's bytes.
const NEEDLE: u64 = 987_654_321;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_publish_retried_by_the_publisher_is_stored_once() {
    // A window that covers the retry span, as `JetStream::new` checks.
    let server = NatsServer::start();
    let proxy = Proxy::start(&server.url()).await;
    let config = Config::new("window")
        .duplicate_window(Duration::from_secs(2))
        .publish_retry(Duration::from_secs(2));
    let jetstream = connect_to(&proxy.url(), config).await;
    // The server stores the event; its ack is held back until the client
    // sends the event again.
    proxy.hold_until_sent(&NEEDLE.to_string(), 2);
    Publish::publish(&jetstream, ScenarioEvent::UserCreated(NEEDLE));
    within("the publisher to be done with the event", jetstream.flush()).await;

    let messages = stored(&raw_client(&server).await, "WINDOW").await;
    let ids: Vec<_> = messages.iter().map(|(_, id, _)| id.clone()).collect();
    assert_eq!(
        messages.len(),
        1,
        "the event was stored {} times (sent {} times, ids {ids:?})",
        messages.len(),
        proxy.seen()
    );
    // Its ack never came within the span: counted, as it may be lost.
    assert_eq!(jetstream.unpublished(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_publish_that_failed_is_stored_once_when_its_envelope_is_published_again() {
    let server = NatsServer::start();
    let proxy = Proxy::start(&server.url()).await;
    let config = Config::new("again").publish_retry(Duration::from_secs(1));
    let jetstream = connect_to(&proxy.url(), config).await;
    proxy.hold_until_sent(&NEEDLE.to_string(), 2);
    let envelope = Envelope::new(ScenarioEvent::UserCreated(NEEDLE));
    let first = jetstream.publish_envelope(&envelope).await;
    assert!(first.is_err(), "its ack was held back: {first:?}");
    let again = within("the second publish", jetstream.publish_envelope(&envelope))
        .await
        .expect("stored");
    let messages = stored(&raw_client(&server).await, "AGAIN").await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(again, messages[0].0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn every_event_handed_to_publish_across_a_restart_is_stored_once_or_counted() {
    const EVENTS: u64 = 3_000;
    let mut server = NatsServer::start();
    // A span a loaded machine's restart fits in.
    let config = Config::new("handed").publish_retry(Duration::from_secs(30));
    let jetstream = connect_to(&server.url(), config).await;
    for value in 0..EVENTS {
        if value == EVENTS / 3 {
            tokio::task::block_in_place(|| server.restart());
        }
        Publish::publish(&jetstream, ScenarioEvent::UserCreated(value));
    }
    tokio::time::timeout(Duration::from_secs(120), jetstream.flush())
        .await
        .expect("the publisher to be done within two minutes");
    let messages = stored(&raw_client(&server).await, "HANDED").await;
    let mut ids = HashSet::new();
    let mut values = HashSet::new();
    for (sequence, id, event) in &messages {
        assert!(
            ids.insert(id.clone()),
            "message {sequence} is a second copy of {id:?}"
        );
        values.insert(event.as_ref().expect("decodes").value());
    }
    let unpublished = jetstream.unpublished();
    assert!(
        values.len() as u64 + unpublished >= EVENTS,
        "{} of {EVENTS} stored and {unpublished} counted unpublished",
        values.len()
    );
    assert_eq!(unpublished, 0, "a retry within the span stores every event");
}

// --- Draining shutdown --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_drain_retries_an_attempt_that_fails_while_it_drains() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "drainretry").await;
    let watcher = raw_client(&server).await;
    let mut requests = watcher
        .subscribe("$JS.API.CONSUMER.INFO.DRAINRETRY.drainer")
        .await
        .expect("subscribe");
    let mut replies = watcher.subscribe("_INBOX.>").await.expect("subscribe");
    watcher.flush().await.expect("flush");
    let probe = Probe::new("drainer").holding(0, 1).failing(0, 1);
    let policy = RetryPolicy::exponential(3)
        .initial_backoff(Duration::from_millis(50))
        .jitter(false);
    jetstream
        .spawn_with(probe.clone(), ListenerOptions::new().retry(policy), quick())
        .await
        .expect("spawn");
    jetstream
        .publish(ScenarioEvent::UserCreated(0))
        .await
        .expect("stored");
    until("the first attempt to be in the handler", || {
        probe.entered(0, 1)
    })
    .await;
    let draining = jetstream.clone();
    let shutdown = tokio::spawn(async move { draining.shutdown(Duration::from_secs(20)).await });
    // The drain looks at its consumer while the attempt is held: then the
    // attempt fails, and is to be retried within the deadline.
    let request = within("the drain to look at its consumer", requests.next())
        .await
        .expect("a request");
    let reply_to = request.reply.expect("a reply subject");
    within("the server to answer", async {
        while let Some(reply) = replies.next().await {
            if reply.subject == reply_to {
                return;
            }
        }
    })
    .await;
    probe.open();
    let reports = within("the shutdown", shutdown).await.expect("joins");
    assert_eq!(probe.handled_values(), [0], "{:?}", probe.calls());
    assert_eq!(reports[0].handled, 1, "{reports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_drain_handles_every_event_published_before_it_and_leaves_nothing_unacked() {
    const EVENTS: u64 = 300;
    let server = NatsServer::start();
    let jetstream = connect(&server, "drainall").await;
    let probes = [
        Probe::new("one").yielding(3),
        Probe::new("many").yielding(3),
    ];
    let options = [
        ListenerOptions::new(),
        ListenerOptions::new().concurrency(8),
    ];
    let mut handles = Vec::new();
    for (probe, options) in probes.iter().zip(options) {
        handles.push(
            jetstream
                .spawn_with(probe.clone(), options, Distributed::new())
                .await
                .expect("spawn"),
        );
    }
    for value in 0..EVENTS {
        Publish::publish(&jetstream, ScenarioEvent::UserCreated(value));
    }
    let reports = jetstream.shutdown(Duration::from_secs(60)).await;
    for (probe, handle) in probes.iter().zip(&handles) {
        let mut values = probe.handled_values();
        values.sort_unstable();
        assert_eq!(
            values,
            (0..EVENTS).collect::<Vec<_>>(),
            "{} handled each event once",
            probe.name()
        );
        // What was handled was acked: nothing is out, nothing to redeliver.
        assert_eq!(handle.pending().await.expect("state"), (0, 0));
    }
    assert!(reports.iter().all(|report| report.handled == EVENTS));
}

// --- Retries and dead letters ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn attempts_are_delivery_counts_delays_follow_the_policy_and_one_dead_letter_ends_it() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "attempts").await;
    let client = raw_client(&server).await;
    let probe = Probe::new("doomed").poisoned(0);
    let policy = RetryPolicy::exponential(3)
        .initial_backoff(Duration::from_millis(300))
        .jitter(false);
    let handle = jetstream
        .spawn_with(probe.clone(), ListenerOptions::new().retry(policy), quick())
        .await
        .expect("spawn");
    let info = consumer_info(&client, "ATTEMPTS", "doomed").await;
    assert_eq!(info.config.max_deliver, 4, "attempts plus one");
    assert_eq!(info.config.max_ack_pending, 1, "its concurrency");

    let published = Instant::now();
    jetstream
        .publish(ScenarioEvent::UserCreated(0))
        .await
        .expect("stored");
    eventually("one dead letter", || async {
        jetstream.dead_letters(None).await.expect("list").len() == 1
    })
    .await;
    let letters = jetstream.dead_letters(None).await.expect("list");
    assert_eq!(letters[0].listener, "doomed");
    assert_eq!(letters[0].attempts, 3);
    assert_eq!(letters[0].error, "poison 0");
    assert_eq!(letters[0].stream_sequence, 1);
    let attempts: Vec<u32> = probe.calls().iter().map(|call| call.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    // The retries waited the policy's 300 ms and 600 ms, no less, and not
    // much more.
    let spent = published.elapsed();
    assert!(
        spent >= Duration::from_millis(900) && spent < Duration::from_millis(900 + 1_500),
        "three attempts over {spent:?}"
    );

    // Terminated: nothing is out, and past its ack_wait it does not come
    // back, while a later event is handled.
    eventually("the consumer to have nothing out", || async {
        handle.pending().await.expect("state") == (0, 0)
    })
    .await;
    let after = Instant::now();
    jetstream
        .publish(ScenarioEvent::UserCreated(1))
        .await
        .expect("stored");
    until("the next event", || probe.handled_values() == [1]).await;
    eventually("two ack_waits to pass", || async {
        after.elapsed() > Duration::from_millis(1_200)
    })
    .await;
    assert_eq!(handle.pending().await.expect("state"), (0, 0));
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(probe.calls().len(), 4, "{:?}", probe.calls());
    assert_eq!(jetstream.dead_letters(None).await.expect("list").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn an_undecodable_event_is_dead_lettered_at_once_with_its_reason() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "undecodable").await;
    let probe = Probe::new("reader");
    let policy = RetryPolicy::exponential(5).initial_backoff(Duration::from_millis(10));
    let handle = jetstream
        .spawn_with(probe.clone(), ListenerOptions::new().retry(policy), quick())
        .await
        .expect("spawn");
    jetstream
        .publish_bytes("user.created", b"{not json".to_vec())
        .await
        .expect("stored");
    jetstream
        .publish(ScenarioEvent::UserCreated(1))
        .await
        .expect("stored");
    until("the next event", || probe.handled_values() == [1]).await;
    eventually("the dead letter", || async {
        jetstream
            .dead_letters(Some("reader"))
            .await
            .expect("list")
            .len()
            == 1
    })
    .await;
    let letter = &jetstream.dead_letters(Some("reader")).await.expect("list")[0];
    assert_eq!(letter.attempts, 1, "at once: {letter:?}");
    assert!(letter.error.starts_with("does not decode"), "{letter:?}");
    assert_eq!(letter.payload.as_ref(), b"{not json");
    assert!(letter.envelope.is_none());
    eventually("nothing out", || async {
        handle.pending().await.expect("state") == (0, 0)
    })
    .await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(probe.calls().len(), 1, "the handler never saw it");
}

// --- Bounded prefetch ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn no_more_than_the_concurrency_is_out_also_across_a_server_restart() {
    const EVENTS: u64 = 30;
    let mut server = NatsServer::start();
    let jetstream = connect(&server, "bound").await;
    let client = raw_client(&server).await;
    let gauge = Gauge::new("bounded");
    let handle = jetstream
        .spawn_with(
            gauge.clone(),
            ListenerOptions::new().concurrency(3),
            Distributed::new().ack_wait(Duration::from_secs(5)),
        )
        .await
        .expect("spawn");
    for value in 0..EVENTS {
        Publish::publish(&jetstream, ScenarioEvent::UserCreated(value));
    }
    jetstream.flush().await;
    until("three calls to wait at the gate", || {
        gauge.entered.load(Ordering::SeqCst) == 3
    })
    .await;
    let info = consumer_info(&client, "BOUND", "bounded").await;
    assert_eq!(info.config.max_ack_pending, 3);
    assert!(info.num_ack_pending <= 3, "{} out", info.num_ack_pending);
    assert_eq!(handle.delivered(), 3, "the pump took no more");
    drop(client);

    tokio::task::block_in_place(|| server.restart());
    let client = raw_client(&server).await;
    eventually("the listener's pulls to be made again", || async {
        consumer_info(&client, "BOUND", "bounded").await.num_waiting > 0
    })
    .await;
    let info = consumer_info(&client, "BOUND", "bounded").await;
    assert!(info.num_ack_pending <= 3, "{} out", info.num_ack_pending);
    assert_eq!(handle.delivered(), 3, "nothing more after the restart");
    gauge.open();
    until("every event", || gauge.handled().len() as u64 >= EVENTS).await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert!(gauge.most.load(Ordering::SeqCst) <= 3);
    let mut handled = gauge.handled();
    handled.sort_unstable();
    handled.dedup();
    assert_eq!(handled.len() as u64, EVENTS);
}

// --- Groups and instances -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_group_shares_each_event_once_and_instances_each_see_all_across_two_connections() {
    const EVENTS: u64 = 200;
    let server = NatsServer::start();
    let here = connect(&server, "scopes").await.with_instance("here");
    let there = connect(&server, "scopes").await.with_instance("there");
    let mut grouped = Vec::new();
    let mut instances = Vec::new();
    for jetstream in [&here, &there] {
        let probe = Probe::new("shared").yielding(1);
        jetstream
            .spawn_with(probe.clone(), ListenerOptions::new(), Distributed::new())
            .await
            .expect("spawn");
        grouped.push(probe);
        let probe = Probe::new("everyone");
        let handle = jetstream
            .spawn_with(
                probe.clone(),
                ListenerOptions::new().scope(Scope::Instance),
                Distributed::new(),
            )
            .await
            .expect("spawn");
        assert_eq!(handle.group(), format!("everyone@{}", jetstream.instance()));
        instances.push(probe);
    }
    for value in 0..EVENTS {
        Publish::publish(&here, ScenarioEvent::UserCreated(value));
    }
    here.flush().await;
    until("every event handled", || {
        grouped.iter().map(Probe::handled_count).sum::<usize>() >= EVENTS as usize
            && instances
                .iter()
                .all(|probe| probe.handled_count() >= EVENTS as usize)
    })
    .await;
    here.shutdown(Duration::from_secs(10)).await;
    there.shutdown(Duration::from_secs(10)).await;
    let mut values: Vec<u64> = grouped.iter().flat_map(Probe::handled_values).collect();
    values.sort_unstable();
    assert_eq!(values, (0..EVENTS).collect::<Vec<_>>(), "once per group");
    for probe in &instances {
        assert_eq!(probe.handled_values(), (0..EVENTS).collect::<Vec<_>>());
    }
}

// --- Filtering and redrive ----------------------------------------------

/// Events of a shop whose `order.paid` was once called `order.settled`.
#[derive(Debug, Clone, PartialEq, Eq, DomainEvent, Serialize, Deserialize)]
enum Shop {
    #[event(name = "order.paid", alias = "order.settled")]
    Paid(u64),
    #[event(name = "order.shipped")]
    Shipped(u64),
    #[event(name = "order.refunded")]
    Refunded(u64),
}

impl Shop {
    fn value(&self) -> u64 {
        match *self {
            Self::Paid(value) | Self::Shipped(value) | Self::Refunded(value) => value,
        }
    }
}

/// A listener of some kinds of [`Shop`], recording what it handled.
#[derive(Clone)]
struct Clerk {
    name: &'static str,
    interests: KindSet<ShopKind>,
    seen: Arc<Mutex<Vec<Shop>>>,
}

impl Clerk {
    fn new(name: &'static str, interests: impl Into<KindSet<ShopKind>>) -> Self {
        Self {
            name,
            interests: interests.into(),
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<Shop> {
        self.seen.lock().unwrap().clone()
    }
}

impl Listener<Shop> for Clerk {
    fn name(&self) -> &str {
        self.name
    }

    fn interests(&self) -> KindSet<ShopKind> {
        self.interests.clone()
    }

    async fn handle(&self, event: Arc<Envelope<Shop>>, _meta: Meta) -> Result<(), HandlerError> {
        self.seen.lock().unwrap().push(event.event().clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn listeners_are_handed_their_kinds_and_aliases_and_ack_the_rest_unhandled() {
    let server = NatsServer::start();
    let shop = JetStream::<Shop>::connect(&server.url(), Config::new("shop"))
        .await
        .expect("connect");
    let paid = Clerk::new("paid", ShopKind::Paid);
    let shipped = Clerk::new("shipped", ShopKind::Shipped);
    let two = Clerk::new("two", [ShopKind::Shipped, ShopKind::Refunded]);
    let mut handles = Vec::new();
    for clerk in [&paid, &shipped, &two] {
        handles.push(
            shop.spawn_with(clerk.clone(), ListenerOptions::new(), quick())
                .await
                .expect("spawn"),
        );
    }
    shop.publish(Shop::Paid(1)).await.expect("stored");
    // An older producer's event, under the name that is now an alias.
    let old = JsonCodec
        .encode(&Envelope::new(Shop::Paid(2)))
        .expect("encodes");
    let old = String::from_utf8(old)
        .expect("json")
        .replace("order.paid", "order.settled");
    shop.publish_bytes("order.settled", old.into_bytes())
        .await
        .expect("stored");
    shop.publish(Shop::Shipped(3)).await.expect("stored");
    shop.publish(Shop::Refunded(4)).await.expect("stored");
    shop.publish(Shop::Paid(5)).await.expect("stored");
    until("every listener to have its events", || {
        paid.seen().len() == 3 && shipped.seen().len() == 1 && two.seen().len() == 2
    })
    .await;
    for handle in &handles {
        eventually("each consumer to have nothing out", || async {
            handle.pending().await.expect("state") == (0, 0)
        })
        .await;
    }
    shop.shutdown(Duration::from_secs(10)).await;
    let values = |clerk: &Clerk| clerk.seen().iter().map(Shop::value).collect::<Vec<_>>();
    assert_eq!(values(&paid), [1, 2, 5]);
    assert_eq!(values(&shipped), [3]);
    assert_eq!(values(&two), [3, 4]);
    assert!(shop.dead_letters(None).await.expect("list").is_empty());
}

/// A listener that fails event 1 until it is mended, recording the
/// attempts it handled.
#[derive(Clone)]
struct Mendable {
    broken: Arc<std::sync::atomic::AtomicBool>,
    handled: Arc<Mutex<Vec<(u64, u32)>>>,
}

impl Listener<ScenarioEvent> for Mendable {
    fn name(&self) -> &str {
        "worker"
    }

    async fn handle(
        &self,
        event: Arc<Envelope<ScenarioEvent>>,
        meta: Meta,
    ) -> Result<(), HandlerError> {
        if event.value() == 1 && self.broken.load(Ordering::SeqCst) {
            return Err("broken".into());
        }
        self.handled
            .lock()
            .unwrap()
            .push((event.value(), meta.attempt()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_redriven_event_is_handled_again_by_its_group_alone() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "redrive").await.with_instance("only");
    let failing = Mendable {
        broken: Arc::new(true.into()),
        handled: Arc::default(),
    };
    let handled = || failing.handled.lock().unwrap().clone();
    let other_group = Probe::new("worker");
    let instance = Probe::new("watcher");
    let same_name = Probe::new("worker");
    jetstream
        .spawn_with(
            failing.clone(),
            ListenerOptions::new(),
            quick().group("billing"),
        )
        .await
        .expect("spawn");
    jetstream
        .spawn_with(
            other_group.clone(),
            ListenerOptions::new(),
            quick().group("audit"),
        )
        .await
        .expect("spawn");
    jetstream
        .spawn_with(
            instance.clone(),
            ListenerOptions::new().scope(Scope::Instance),
            quick(),
        )
        .await
        .expect("spawn");
    // The listener's own name, as a group of its own.
    jetstream
        .spawn_with(same_name.clone(), ListenerOptions::new(), quick())
        .await
        .expect("spawn");
    for value in 0..3 {
        jetstream
            .publish(ScenarioEvent::UserCreated(value))
            .await
            .expect("stored");
    }
    eventually("the dead letter of billing", || async {
        jetstream
            .dead_letters(Some("billing"))
            .await
            .expect("list")
            .len()
            == 1
    })
    .await;
    until("the others to handle every event", || {
        other_group.handled_count() == 3
            && instance.handled_count() == 3
            && same_name.handled_count() == 3
            && handled() == [(0, 1), (2, 1)]
    })
    .await;
    failing.broken.store(false, Ordering::SeqCst);
    assert_eq!(
        jetstream.redrive("billing", None).await.expect("redrive"),
        1
    );
    until("billing to handle it", || handled().len() == 3).await;
    // A sentinel after the redriven event: once every listener handled it,
    // each has passed the redriven one.
    jetstream
        .publish(ScenarioEvent::UserCreated(9))
        .await
        .expect("stored");
    until("every listener to handle the sentinel", || {
        [&other_group, &instance, &same_name]
            .iter()
            .all(|probe| probe.handled_values().last() == Some(&9))
            && handled().last() == Some(&(9, 1))
    })
    .await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    for probe in [&other_group, &instance, &same_name] {
        assert_eq!(probe.handled_values(), [0, 1, 2, 9], "{}", probe.name());
    }
    assert_eq!(handled(), [(0, 1), (2, 1), (1, 1), (9, 1)], "afresh, once");
    assert!(jetstream.dead_letters(None).await.expect("list").is_empty());
}

// --- Abort ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn what_an_aborted_listener_held_is_handled_again_never_lost() {
    const EVENTS: u64 = 40;
    let server = NatsServer::start();
    let jetstream = connect(&server, "abort").await;
    let first = Gauge::new("worker");
    let handle = jetstream
        .spawn_with(
            first.clone(),
            ListenerOptions::new().concurrency(4),
            quick().group("workers"),
        )
        .await
        .expect("spawn");
    for value in 0..EVENTS {
        Publish::publish(&jetstream, ScenarioEvent::UserCreated(value));
    }
    jetstream.flush().await;
    until("four calls held", || {
        first.entered.load(Ordering::SeqCst) == 4
    })
    .await;
    handle.abort();
    within("the aborted listener to end", handle.finished()).await;
    // Opened after the stop: nothing it held may count as handled.
    first.open();
    let second = Probe::new("worker");
    jetstream
        .spawn_with(
            second.clone(),
            ListenerOptions::new(),
            quick().group("workers"),
        )
        .await
        .expect("spawn");
    until("the group to handle every event", || {
        second.handled_count() as u64 == EVENTS
    })
    .await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert!(first.handled().is_empty(), "{:?}", first.handled());
    let mut values = second.handled_values();
    values.sort_unstable();
    assert_eq!(values, (0..EVENTS).collect::<Vec<_>>());
    let again: Vec<u32> = second
        .handled()
        .iter()
        .filter(|call| call.value < 4)
        .map(|call| call.attempt)
        .collect();
    assert_eq!(again, [2, 2, 2, 2], "the four held came back, counted");
}

// --- Batch listeners ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_batch_listener_retries_what_failed_and_dead_letters_each_event_once() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "batchdead").await;
    for value in 0..6 {
        jetstream
            .publish(ScenarioEvent::UserCreated(value))
            .await
            .expect("stored");
    }
    let batcher = Batcher::new("batcher")
        .failing(1, u32::MAX)
        .failing(3, 1)
        .failing(4, u32::MAX);
    let options = ListenerOptions::new()
        .max_batch(6)
        .max_wait(Duration::from_millis(300))
        .retry(
            RetryPolicy::exponential(2)
                .initial_backoff(Duration::from_millis(50))
                .jitter(false),
        );
    let handle = jetstream
        .spawn_with(batcher.clone(), options, quick().start(Start::Beginning))
        .await
        .expect("spawn");
    eventually("two dead letters", || async {
        jetstream.dead_letters(None).await.expect("list").len() == 2
    })
    .await;
    until("the rest handled", || batcher.handled().len() == 4).await;
    eventually("nothing out", || async {
        handle.pending().await.expect("state") == (0, 0)
    })
    .await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    let letters = jetstream.dead_letters(None).await.expect("list");
    let mut dead: Vec<(u64, u32)> = letters
        .iter()
        .map(|letter| {
            let value = letter.envelope.as_ref().expect("decodes").value();
            (value, letter.attempts)
        })
        .collect();
    dead.sort_unstable();
    assert_eq!(dead, [(1, 2), (4, 2)]);
    let mut handled = batcher.handled();
    handled.sort_unstable();
    assert_eq!(handled, [0, 2, 3, 5], "{:?}", batcher.batches());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn stop_at_first_keeps_the_events_after_a_failed_one_behind_it() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "stopfirst").await;
    for value in 0..4 {
        jetstream
            .publish(ScenarioEvent::UserCreated(value))
            .await
            .expect("stored");
    }
    let batcher = Batcher::new("ordered").failing(0, 1);
    let options = ListenerOptions::new()
        .max_batch(4)
        .max_wait(Duration::from_millis(300))
        .batch_failure(BatchFailure::StopAtFirst)
        .retry(
            RetryPolicy::exponential(3)
                .initial_backoff(Duration::from_millis(500))
                .jitter(false),
        );
    jetstream
        .spawn_with(batcher.clone(), options, quick().start(Start::Beginning))
        .await
        .expect("spawn");
    until("every event handled", || batcher.handled().len() >= 4).await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(batcher.handled(), [0, 1, 2, 3], "{:?}", batcher.batches());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn events_prefetched_behind_a_slow_batch_are_not_handed_out_again() {
    let server = NatsServer::start();
    let jetstream = connect(&server, "prefetch").await;
    let client = raw_client(&server).await;
    let batcher = Batcher::new("slow").holding_first();
    let options = ListenerOptions::new()
        .max_batch(4)
        .max_wait(Duration::from_millis(20));
    jetstream
        .spawn_with(batcher.clone(), options, quick())
        .await
        .expect("spawn");
    jetstream
        .publish(ScenarioEvent::UserCreated(0))
        .await
        .expect("stored");
    until("the first batch to be held", || {
        batcher.batches().len() == 1
    })
    .await;
    for value in 1..4 {
        jetstream
            .publish(ScenarioEvent::UserCreated(value))
            .await
            .expect("stored");
    }
    eventually("the three to be delivered to the listener", || async {
        consumer_info(&client, "PREFETCH", "slow")
            .await
            .num_ack_pending
            == 4
    })
    .await;
    // Three ack_waits with the first batch held: a redelivery of what waits
    // behind it would show by then.
    let held_since = Instant::now();
    let redelivered = loop {
        let redelivered = consumer_info(&client, "PREFETCH", "slow")
            .await
            .num_redelivered;
        if redelivered > 0 || held_since.elapsed() > Duration::from_millis(1_800) {
            break redelivered;
        }
        // A poll of the server's state, bounded by the three ack_waits.
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    batcher.open();
    until("every event handled", || batcher.handled().len() >= 4).await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(redelivered, 0, "batches {:?}", batcher.batches());
    let attempts: Vec<(u64, u32)> = batcher.batches().into_iter().flatten().collect();
    assert_eq!(attempts, [(0, 1), (1, 1), (2, 1), (3, 1)]);
}

// --- Restarts with other options -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_listener_spawned_again_with_other_options_goes_on_from_its_consumer() {
    let server = NatsServer::start();
    let client = raw_client(&server).await;
    let first = connect(&server, "respawn").await;
    let probe = Probe::new("indexer");
    first
        .spawn_with(
            probe.clone(),
            ListenerOptions::new().concurrency(4),
            Distributed::new(),
        )
        .await
        .expect("spawn");
    for value in 0..3 {
        first
            .publish(ScenarioEvent::UserCreated(value))
            .await
            .expect("stored");
    }
    until("three events", || probe.handled_count() == 3).await;
    first.shutdown(Duration::from_secs(10)).await;

    // The next release: one at a time now, and asking for a replay.
    let second = connect(&server, "respawn").await;
    let again = Probe::new("indexer");
    let spawned = second
        .spawn_with(
            again.clone(),
            ListenerOptions::new(),
            Distributed::new().start(Start::Beginning),
        )
        .await;
    assert!(spawned.is_ok(), "{spawned:?}");
    let info = consumer_info(&client, "RESPAWN", "indexer").await;
    assert_eq!(
        info.config.max_ack_pending, 1,
        "a concurrency of 1 keeps stream order"
    );
    second
        .publish(ScenarioEvent::UserCreated(3))
        .await
        .expect("stored");
    until("the next event", || again.handled_count() >= 1).await;
    second.shutdown(Duration::from_secs(10)).await;
    assert_eq!(again.handled_values(), [3], "it went on where it was");
}

/// The names the tests publish under are the kinds they mean.
#[test]
fn the_review_events_have_the_kinds_the_tests_name() {
    assert_eq!(
        ScenarioEventKind::from_name("user.created"),
        Some(ScenarioEventKind::UserCreated)
    );
    assert_eq!(ShopKind::from_name("order.settled"), Some(ShopKind::Paid));
}
