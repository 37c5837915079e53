//! Two adversarial reviews of a JetStream listener's acker (its acks sent
//! together, confirmed together): small programs that try to
//! break the promises of `event_bus::nats` around acks and the drain, each
//! on a nats-server of its own on 127.0.0.1. Run them with
//! `cargo test --test acker_review -- --ignored --test-threads=2`.

#[allow(dead_code)]
#[path = "nats_tier/server.rs"]
mod server;

#[allow(dead_code)]
#[path = "nats_tier/proxy.rs"]
mod proxy;

#[allow(dead_code)]
#[path = "nats_tier/work.rs"]
mod work;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::nats::{Distributed, JetStream, JetStreamListener, Start};
use event_bus::{
    Batch, BatchError, BatchListener, Envelope, HandlerError, Listener, ListenerOptions, Meta,
    RetryPolicy,
};
use proxy::Proxy;
use server::NatsServer;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use work::{SHUTDOWN_SLACK, Work, connect_to, eventually, publish_all};

/// A listener that records each value it handled (every attempt that
/// succeeded), and whose calls wait at a gate until it is opened.
#[derive(Clone)]
struct Recorder {
    name: &'static str,
    /// Never waits at the gate, nor awaits at all.
    eager: bool,
    entered: Arc<AtomicUsize>,
    handled: Arc<Mutex<Vec<u64>>>,
    gate: Arc<Semaphore>,
}

impl Recorder {
    fn new(name: &'static str, open: bool) -> Self {
        let recorder = Self {
            name,
            eager: false,
            entered: Arc::default(),
            handled: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        };
        if open {
            recorder.open();
        }
        recorder
    }

    /// One whose handler never awaits: the runner's budget is spent.
    fn eager(name: &'static str) -> Self {
        Self {
            eager: true,
            ..Self::new(name, true)
        }
    }

    fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
    }

    /// How many distinct values it handled.
    fn distinct(&self) -> usize {
        self.counts().len()
    }

    /// How many distinct values it handled, and how many times in all.
    fn counts(&self) -> HashMap<u64, usize> {
        let mut counts = HashMap::new();
        for value in self.handled() {
            *counts.entry(value).or_default() += 1;
        }
        counts
    }
}

impl Listener<Work> for Recorder {
    fn name(&self) -> &str {
        self.name
    }

    async fn handle(&self, event: Arc<Envelope<Work>>, _meta: Meta) -> Result<(), HandlerError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        if !self.eager {
            let _ = self.gate.acquire().await.map(|permit| permit.forget());
        }
        self.handled.lock().unwrap().push(event.event().value());
        Ok(())
    }
}

/// Many acks at once, from 16 handlers, then a shutdown at once: every
/// ack the runner counted must be applied by the server when the shutdown
/// returns (the acker's one confirmation per batch covers the batch), so
/// that the next run of the group gets nothing of them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn concurrent_acks_then_an_immediate_shutdown_leave_nothing_to_redeliver() {
    handled_then_shut_down(Recorder::new("burst", true), 3_000).await;
}

/// Runs `recorder` at concurrency 16 on `events` events published after
/// it started, and shuts down as soon as all are handled: right as the
/// shutdown returns, nothing is out nor left, each was handled once, and
/// the group's next run gets only what is new.
async fn handled_then_shut_down(recorder: Recorder, events: u64) {
    let name = recorder.name;
    let server = NatsServer::start();
    let jetstream = connect_to(&server.url(), name).await;
    let handle = from_the_start(
        &jetstream,
        &recorder,
        ListenerOptions::new().concurrency(16),
    )
    .await;
    publish_all(&jetstream, 0..events).await;
    eventually("every event handled", || {
        let handled = recorder.handled().len();
        async move { handled >= events as usize }
    })
    .await;
    let reports = jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(reports.len(), 1);
    // Right as the shutdown returns: nothing out, nothing to deliver.
    assert_eq!(handle.pending().await.expect("state"), (0, 0));
    assert_once(&recorder.counts(), events);

    // The group's next run: only what is new.
    let again = connect_to(&server.url(), name).await;
    let next = Recorder {
        handled: Arc::default(),
        ..recorder.clone()
    };
    let _handle = again
        .spawn_with(
            next.clone(),
            ListenerOptions::new().concurrency(16),
            Distributed::new(),
        )
        .await
        .expect("spawn again");
    publish_all(&again, events..events + 1).await;
    eventually("the new event handled", || {
        let handled = next.handled();
        async move { handled.contains(&events) }
    })
    .await;
    assert_eq!(next.handled(), [events], "handled again after the drain");
    again.shutdown(Duration::from_secs(10)).await;
}

/// `concurrency`, and attempts enough that deliveries the stalled
/// connection never passed on (each counts, every `ack_wait`) do not use
/// up the consumer's `max_deliver`.
fn many_attempts(concurrency: usize) -> ListenerOptions {
    ListenerOptions::new()
        .concurrency(concurrency)
        .retry(RetryPolicy::exponential(1_000))
}

/// The server applies the acks but its confirmations never reach the
/// client (the proxy holds back everything it sends): the shutdown must
/// still return within its deadline and grace, `held` not waited on
/// forever, and nothing is lost (what was not applied comes again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn confirmations_that_never_come_neither_hang_the_shutdown_nor_lose_events() {
    unconfirmed(200, 16, "unconfirmed").await;
}

/// Runs a recorder of `concurrency` on `events` events and holds back,
/// once `concurrency` handlers wait at the gate, everything the server
/// sends (the proxy) before they finish: then shuts down and runs the
/// group again on the server directly.
async fn unconfirmed(events: u64, concurrency: usize, name: &'static str) {
    let server = NatsServer::start();
    let proxy = Proxy::start(&server.url()).await;
    let jetstream = connect_to(&proxy.url(), name).await;
    let recorder = Recorder::new(name, false);
    let _handle = jetstream
        .spawn_with(
            recorder.clone(),
            many_attempts(concurrency),
            Distributed::new()
                .ack_wait(Duration::from_secs(1))
                .start(Start::Beginning),
        )
        .await
        .expect("spawn");
    publish_all(&jetstream, 0..events).await;
    eventually("every handler at the gate", || {
        let entered = recorder.entered.load(Ordering::SeqCst);
        async move { entered >= concurrency }
    })
    .await;
    proxy.hold(true);
    recorder.open();
    eventually("those handled", || {
        let handled = recorder.handled().len();
        async move { handled >= concurrency }
    })
    .await;
    let deadline = Duration::from_secs(2);
    let started = Instant::now();
    let shutdown = tokio::time::timeout(deadline + SHUTDOWN_SLACK, jetstream.shutdown(deadline));
    assert!(
        shutdown.await.is_ok(),
        "the shutdown did not return within {:?}",
        deadline + SHUTDOWN_SLACK
    );
    let took = started.elapsed();
    proxy.hold(false);
    drop(jetstream);

    // Every event is handled, here or in the next run: none lost.
    let again = connect_to(&server.url(), name).await;
    let next = Recorder::new(name, true);
    let handle = again
        .spawn_with(
            next.clone(),
            many_attempts(concurrency),
            Distributed::new().ack_wait(Duration::from_secs(1)),
        )
        .await
        .expect("spawn again");
    handled_between(&recorder, &next, events).await;
    eventually("nothing out", || async {
        handle.pending().await.expect("state") == (0, 0)
    })
    .await;
    assert!(again.dead_letters(None).await.expect("list").is_empty());
    again.shutdown(Duration::from_secs(10)).await;
    assert!(took < deadline + SHUTDOWN_SLACK, "{took:?}");
}

/// The server restarts while acks are on their way: nothing is lost, and
/// the shutdown after it returns within its deadline and grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_server_restart_while_acks_are_batched_loses_nothing_and_the_shutdown_is_bounded() {
    const EVENTS: u64 = 500;
    let mut server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "restarted").await;
    let recorder = Recorder::new("restarted", false);
    let handle = jetstream
        .spawn_with(
            recorder.clone(),
            ListenerOptions::new().concurrency(16),
            Distributed::new()
                .ack_wait(Duration::from_secs(1))
                .start(Start::Beginning),
        )
        .await
        .expect("spawn");
    publish_all(&jetstream, 0..EVENTS).await;
    eventually("16 handlers at the gate", || {
        let entered = recorder.entered.load(Ordering::SeqCst);
        async move { entered >= 16 }
    })
    .await;
    recorder.open();
    server.restart();
    eventually("every event handled once at least", || {
        let mut all = recorder.handled();
        all.sort_unstable();
        all.dedup();
        async move { all.len() == EVENTS as usize }
    })
    .await;
    let deadline = Duration::from_secs(5);
    let shutdown = tokio::time::timeout(deadline + SHUTDOWN_SLACK, jetstream.shutdown(deadline));
    assert!(
        shutdown.await.is_ok(),
        "the shutdown did not return within {:?}",
        deadline + SHUTDOWN_SLACK
    );
    // Drained: the consumer has nothing more, nothing out.
    eventually("nothing out", || async {
        handle
            .pending()
            .await
            .is_ok_and(|pending| pending == (0, 0))
    })
    .await;
}

/// A batch listener whose batches partly fail: the acks of the handled
/// events and the naks of the failed ones go out in one burst. The acked
/// are never delivered again, the naked are, and all end acked.
#[derive(Clone)]
struct Partial {
    /// A value `v` fails its first attempt where `v % every == at`.
    every: u64,
    at: u64,
    /// Everything after a batch's first failure fails too.
    stop_at_first: bool,
    handled: Arc<Mutex<Vec<u64>>>,
}

impl Partial {
    fn new(every: u64, at: u64, stop_at_first: bool) -> Self {
        Self {
            every,
            at,
            stop_at_first,
            handled: Arc::default(),
        }
    }
}

impl BatchListener<Work> for Partial {
    fn name(&self) -> &str {
        "partial"
    }

    async fn handle_batch(&self, batch: &Batch<Work>) -> Result<(), BatchError> {
        let mut failed = Vec::new();
        let mut handled = self.handled.lock().unwrap();
        for (index, (event, attempt)) in batch.events().iter().zip(batch.attempts()).enumerate() {
            let value = event.event().value();
            let fails = (value % self.every == self.at && *attempt == 1)
                || (self.stop_at_first && !failed.is_empty());
            if fails {
                failed.push(index);
            } else {
                handled.push(value);
            }
        }
        drop(handled);
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::events(failed, "scripted failure"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn acks_and_naks_of_one_batch_keep_their_meaning() {
    partial_batches(Partial::new(5, 0, false), 1_000, 1, "partial").await;
}

/// Runs `partial` on `events` events, `concurrency` batches at once, and
/// shuts down once all are handled: nothing acked was handled again,
/// nothing is out, no dead letter.
async fn partial_batches(partial: Partial, events: u64, concurrency: usize, prefix: &str) {
    let server = NatsServer::start();
    let jetstream = connect_to(&server.url(), prefix).await;
    publish_all(&jetstream, 0..events).await;
    let options = ListenerOptions::new()
        .concurrency(concurrency)
        .max_batch(64 / concurrency)
        .max_wait(Duration::from_millis(50))
        // Attempts enough that an event failing behind others (stopping
        // at the first) is never a dead letter.
        .retry(
            RetryPolicy::exponential(50)
                .initial_backoff(Duration::from_millis(10))
                .jitter(false),
        );
    let handle = jetstream
        .spawn_with(
            partial.clone(),
            options,
            Distributed::new().start(Start::Beginning),
        )
        .await
        .expect("spawn");
    eventually("every event handled", || {
        let mut all = partial.handled.lock().unwrap().clone();
        all.sort_unstable();
        all.dedup();
        async move { all.len() == events as usize }
    })
    .await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(handle.pending().await.expect("state"), (0, 0));
    let mut counts = HashMap::<u64, usize>::new();
    for value in partial.handled.lock().unwrap().iter() {
        *counts.entry(*value).or_default() += 1;
    }
    assert_once(&counts, events);
    assert!(jetstream.dead_letters(None).await.expect("list").is_empty());
}

/// Found by this review, fixed by the advisory stream: deliveries that a
/// stalled connection never passes on count toward the consumer's
/// `max_deliver`, one every `ack_wait`; once used up, the server delivers
/// the message no more, to no process of the group. Promise (`nats`
/// module docs, "Retries are the server's"): such an event is a dead
/// letter, written from the server's max-deliveries advisory, which waits
/// in the advisory stream for a process that can take it; every event
/// ends handled or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn deliveries_a_stalled_connection_swallows_end_as_dead_letters() {
    const EVENTS: u64 = 200;
    let server = NatsServer::start();
    let proxy = Proxy::start(&server.url()).await;
    let jetstream = connect_to(&proxy.url(), "stalled").await;
    let recorder = Recorder::new("stalled", false);
    let _handle = jetstream
        .spawn_with(
            recorder.clone(),
            ListenerOptions::new().concurrency(16),
            Distributed::new()
                .ack_wait(Duration::from_millis(500))
                .start(Start::Beginning),
        )
        .await
        .expect("spawn");
    publish_all(&jetstream, 0..EVENTS).await;
    eventually("16 handlers at the gate", || {
        let entered = recorder.entered.load(Ordering::SeqCst);
        async move { entered >= 16 }
    })
    .await;
    proxy.hold(true);
    recorder.open();
    // The stalled process's pulls take every message, twice over.
    let raw = async_nats::connect(server.url())
        .await
        .expect("a raw client");
    let context = async_nats::jetstream::new(raw);
    eventually("every message delivered twice", || {
        let context = context.clone();
        async move {
            let Ok(stream) = context.get_stream("STALLED").await else {
                return false;
            };
            let Ok(mut consumer) = stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>("stalled")
                .await
            else {
                return false;
            };
            consumer.info().await.is_ok_and(|info| {
                info.num_pending == 0 && info.num_redelivered >= (EVENTS as usize) - 16
            })
        }
    })
    .await;
    jetstream.shutdown(Duration::from_secs(2)).await;
    proxy.hold(false);
    drop(jetstream);

    let again = connect_to(&server.url(), "stalled").await;
    let next = Recorder::new("stalled", true);
    let _handle = again
        .spawn_with(
            next.clone(),
            ListenerOptions::new().concurrency(16),
            Distributed::new().ack_wait(Duration::from_millis(500)),
        )
        .await
        .expect("spawn again");
    eventually("every event handled or dead-lettered", || {
        let mut all = recorder.handled();
        all.extend(next.handled());
        let again = &again;
        async move {
            let dead = again.dead_letters(None).await.unwrap_or_default();
            all.extend(
                dead.iter()
                    .filter_map(|dead| dead.envelope.as_ref())
                    .map(|envelope| envelope.event().value()),
            );
            all.sort_unstable();
            all.dedup();
            all.len() == EVENTS as usize
        }
    })
    .await;
    let dead = again.dead_letters(Some("stalled")).await.expect("list");
    assert!(
        dead.iter().all(|dead| dead.error.contains("max_deliver")),
        "every dead letter here is the server's giving up: {:?}",
        dead.iter().map(|dead| &dead.error).collect::<Vec<_>>()
    );
    again.shutdown(Duration::from_secs(10)).await;
}

/// Promise (`nats` module docs, "Retries are the server's"): an event whose
/// every delivery is cut short (here its listener is stopped mid-handler,
/// each time, up to the consumer's `max_deliver`) is not dropped by the
/// server unrecorded: it ends in the dead-letter stream, with the
/// deliveries as its attempts, and is never delivered to the listener
/// again.
#[tokio::test]
#[ignore = "needs nats-server"]
async fn an_event_whose_every_delivery_is_cut_short_is_a_dead_letter() {
    let server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "cut").await;
    // One attempt: the consumer's max_deliver is 2.
    let options = || ListenerOptions::new().retry(RetryPolicy::none());
    let distributed = || {
        Distributed::new()
            .ack_wait(Duration::from_secs(1))
            .start(Start::Beginning)
    };
    publish_all(&jetstream, 0..1).await;
    for delivery in 1..=2 {
        let stuck = Recorder::new("cut", false);
        let handle = jetstream
            .spawn_with(stuck.clone(), options(), distributed())
            .await
            .expect("spawn");
        eventually(&format!("delivery {delivery} in the handler"), || {
            let entered = stuck.entered.load(Ordering::SeqCst);
            async move { entered == 1 }
        })
        .await;
        handle.abort();
        handle.finished().await;
    }
    let open = Recorder::new("cut", true);
    let _handle = jetstream
        .spawn_with(open.clone(), options(), distributed())
        .await
        .expect("spawn");
    eventually("the event's dead letter", || {
        let jetstream = &jetstream;
        async move {
            jetstream
                .dead_letters(Some("cut"))
                .await
                .is_ok_and(|dead| !dead.is_empty())
        }
    })
    .await;
    let dead = jetstream.dead_letters(Some("cut")).await.expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 2);
    assert!(dead[0].error.contains("max_deliver"), "{}", dead[0].error);
    assert_eq!(
        dead[0].envelope.as_ref().map(|e| e.event().value()),
        Some(0)
    );
    // Its consumer has nothing left for it, and the handler never had it.
    jetstream.shutdown(Duration::from_secs(5)).await;
    assert_eq!(open.entered.load(Ordering::SeqCst), 0);
}

/// What the acker's one confirmation for many acks rests on: the server
/// answers a request on an ack subject once it has applied it, even for a
/// message already acked, and applies a consumer's acks in the order they
/// come. Plain acks of many messages, then a confirmed ack of one of them
/// again: once it is answered, the server holds none of them.
#[tokio::test]
#[ignore = "needs nats-server"]
async fn a_confirmation_on_an_acked_message_covers_the_acks_before_it() {
    use async_nats::jetstream::consumer::{AckPolicy, pull::Config};
    use futures::StreamExt;

    const MESSAGES: usize = 50;
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let context = async_nats::jetstream::new(client.clone());
    let stream = context
        .create_stream(async_nats::jetstream::stream::Config {
            name: "CONFIRM".to_owned(),
            subjects: vec!["confirm.>".to_owned()],
            ..Default::default()
        })
        .await
        .expect("stream");
    for value in 0..MESSAGES {
        context
            .publish("confirm.one", value.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let mut consumer = stream
        .create_consumer(Config {
            durable_name: Some("confirming".to_owned()),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(MESSAGES)
        .messages()
        .await
        .expect("fetch");
    let mut subjects = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.expect("message");
        subjects.push(message.reply.clone().expect("an ack subject"));
    }
    assert_eq!(subjects.len(), MESSAGES);
    assert_eq!(
        consumer.info().await.expect("info").num_ack_pending,
        MESSAGES
    );
    for subject in &subjects {
        client
            .publish(subject.clone(), "+ACK".into())
            .await
            .expect("ack");
    }
    // Again, on the first message's subject: acked already, long before.
    let request = async_nats::Request::new()
        .payload("+ACK".into())
        .timeout(Some(Duration::from_secs(5)));
    client
        .send_request(subjects[0].clone(), request)
        .await
        .expect("the server confirms an ack of a message acked before");
    let info = consumer.info().await.expect("info");
    assert_eq!(info.num_ack_pending, 0, "an ack not applied yet");
    assert_eq!(info.ack_floor.stream_sequence, MESSAGES as u64);
}

// The second review, of acks sent from the runner and confirmed together
// (after 256 acks, 50 ms, at once while draining, or when the listener's
// acks end).

/// Spawns `recorder` with `options`, its consumer starting at the
/// stream's first event.
async fn from_the_start(
    jetstream: &JetStream<Work>,
    recorder: &Recorder,
    options: ListenerOptions,
) -> JetStreamListener {
    jetstream
        .spawn_with(
            recorder.clone(),
            options,
            Distributed::new().start(Start::Beginning),
        )
        .await
        .expect("spawn")
}

/// Waits until `first` and `next` together handled every one of `events`.
async fn handled_between(first: &Recorder, next: &Recorder, events: u64) {
    eventually("every event handled once at least", || {
        let mut all = first.handled();
        all.extend(next.handled());
        all.sort_unstable();
        all.dedup();
        async move { all.len() == events as usize }
    })
    .await;
}

fn assert_once(counts: &HashMap<u64, usize>, events: u64) {
    assert_eq!(counts.len(), events as usize, "an event never handled");
    let again: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).collect();
    assert!(again.is_empty(), "handled more than once: {again:?}");
}

/// Spawns a recorder of concurrency `events` on the first `events` events
/// (an `ack_wait` of 1 s), holds every handler at its gate, then lets them
/// all finish together: their acks go out at once.
async fn handled_together(
    jetstream: &JetStream<Work>,
    name: &'static str,
    events: u64,
) -> (Recorder, JetStreamListener) {
    let recorder = Recorder::new(name, false);
    let handle = jetstream
        .spawn_with(
            recorder.clone(),
            ListenerOptions::new().concurrency(events as usize),
            Distributed::new()
                .ack_wait(Duration::from_secs(1))
                .start(Start::Beginning),
        )
        .await
        .expect("spawn");
    eventually("every handler at the gate", || {
        let entered = recorder.entered.load(Ordering::SeqCst);
        async move { entered >= events as usize }
    })
    .await;
    recorder.open();
    eventually("every event handled", || {
        let handled = recorder.handled().len();
        async move { handled >= events as usize }
    })
    .await;
    (recorder, handle)
}

/// Many short bursts (1..=7 events, each handled before the next is
/// published), concurrency 1, then a shutdown at once: right as it
/// returns, nothing pending or out, each event handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn short_bursts_then_an_immediate_shutdown_leave_nothing_out() {
    let server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "bursts").await;
    let recorder = Recorder::new("bursts", true);
    let handle = from_the_start(&jetstream, &recorder, ListenerOptions::new()).await;
    let mut next = 0;
    for burst in 0..40u64 {
        let size = burst % 7 + 1;
        publish_all(&jetstream, next..next + size).await;
        next += size;
        let want = next as usize;
        eventually("the burst handled", || {
            let handled = recorder.handled().len();
            async move { handled >= want }
        })
        .await;
    }
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(handle.pending().await.expect("state"), (0, 0));
    assert_once(&recorder.counts(), next);
}

/// The same, but each burst's last event is handled right before the
/// shutdown starts (no gap for the 50 ms confirmation): the drain must
/// confirm at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_shutdown_right_after_one_ack_leaves_nothing_out() {
    for round in 0..10u64 {
        let server = NatsServer::start();
        let jetstream = connect_to(&server.url(), "single").await;
        let recorder = Recorder::new("single", true);
        let handle = from_the_start(&jetstream, &recorder, ListenerOptions::new()).await;
        publish_all(&jetstream, round..round + 1).await;
        eventually("the event handled", || {
            let handled = recorder.handled().len();
            async move { handled >= 1 }
        })
        .await;
        let started = Instant::now();
        jetstream.shutdown(Duration::from_secs(10)).await;
        let took = started.elapsed();
        assert_eq!(
            handle.pending().await.expect("state"),
            (0, 0),
            "round {round}"
        );
        assert!(took < Duration::from_secs(2), "round {round}: {took:?}");
    }
}

/// Concurrency 16, handlers that never await: the runner's coop budget is
/// spent, so some acks go the acker's way and some directly, mixed. Then
/// an immediate shutdown: nothing out, each once; and a next run gets only
/// what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn eager_handlers_mixing_direct_and_fallback_acks_leave_nothing_out() {
    handled_then_shut_down(Recorder::eager("eager"), 5_000).await;
}

/// A listener that handled a few events and then gets nothing more: with
/// no shutdown, no drain, the consumer must come to have nothing out (the
/// plain acks are applied; the confirmation comes in 50 ms), and stay so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_quiet_listener_comes_to_have_nothing_out() {
    let server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "quiet").await;
    let recorder = Recorder::new("quiet", true);
    let handle = jetstream
        .spawn_with(
            recorder.clone(),
            ListenerOptions::new().concurrency(4),
            Distributed::new()
                .ack_wait(Duration::from_secs(1))
                .start(Start::Beginning),
        )
        .await
        .expect("spawn");
    for value in 0..5u64 {
        publish_all(&jetstream, value..value + 1).await;
        let want = value as usize + 1;
        eventually("handled", || {
            let handled = recorder.handled().len();
            async move { handled >= want }
        })
        .await;
        eventually("nothing out", || async {
            handle.pending().await.expect("state") == (0, 0)
        })
        .await;
    }
    // Past an ack_wait: none came again (its ack was applied).
    let until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < until {
        assert_eq!(handle.pending().await.expect("state"), (0, 0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_once(&recorder.counts(), 5);
    jetstream.shutdown(Duration::from_secs(10)).await;
}

/// Acks sent, the server restarted before their 50 ms confirmation: after
/// it, nothing is lost, the shutdown is bounded, and once the shutdown
/// returned, the consumer has nothing out (no listener left to handle
/// again what was redelivered: only applied acks bring it to zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_restart_before_the_confirmation_loses_nothing() {
    const EVENTS: u64 = 64;
    let mut server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "restart2").await;
    publish_all(&jetstream, 0..EVENTS).await;
    let (recorder, handle) = handled_together(&jetstream, "restart2", EVENTS).await;
    server.restart();
    eventually("every event handled once at least", || {
        let distinct = recorder.distinct();
        async move { distinct == EVENTS as usize }
    })
    .await;
    let deadline = Duration::from_secs(5);
    let shutdown = tokio::time::timeout(deadline + SHUTDOWN_SLACK, jetstream.shutdown(deadline));
    assert!(shutdown.await.is_ok(), "the shutdown was not bounded");
    eventually("nothing out after the shutdown", || async {
        handle
            .pending()
            .await
            .is_ok_and(|pending| pending == (0, 0))
    })
    .await;
}

/// The connection stalls (nothing from the server reaches the client)
/// right after one event was handled: confirmations never come. The
/// shutdown is bounded, and the event is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_single_unconfirmed_ack_bounds_the_shutdown() {
    unconfirmed(1, 1, "stall1").await;
}

/// As [`acks_and_naks_of_one_batch_keep_their_meaning`], with 4 batches
/// at once, failures independent or (everything after a batch's first
/// failure failing too) stopping at the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn independent_failures_mixed_with_acks_keep_their_meaning() {
    partial_batches(Partial::new(7, 3, false), 700, 4, "mixedi").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn stop_at_first_failures_mixed_with_acks_keep_their_meaning() {
    partial_batches(Partial::new(7, 3, true), 700, 4, "mixeds").await;
}

/// Abort right after events were handled (their acks sent, not yet
/// confirmed) while others wait at the gate: the handled are not lost nor
/// normally handled again; the held come again to the group's next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn an_abort_right_after_acks_gives_back_only_what_it_held() {
    const EVENTS: u64 = 100;
    let server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "abort2").await;
    publish_all(&jetstream, 0..EVENTS).await;
    let recorder = Recorder::new("abort2", false);
    let handle = jetstream
        .spawn_with(
            recorder.clone(),
            ListenerOptions::new().concurrency(8),
            Distributed::new()
                .ack_wait(Duration::from_secs(1))
                .start(Start::Beginning),
        )
        .await
        .expect("spawn");
    eventually("8 at the gate", || {
        let entered = recorder.entered.load(Ordering::SeqCst);
        async move { entered >= 8 }
    })
    .await;
    recorder.gate.add_permits(5);
    eventually("5 handled", || {
        let handled = recorder.handled().len();
        async move { handled >= 5 }
    })
    .await;
    handle.abort();
    handle.finished().await;
    let first: Vec<u64> = recorder.handled();
    let again = connect_to(&server.url(), "abort2").await;
    let next = Recorder::new("abort2", true);
    let handle2 = again
        .spawn_with(
            next.clone(),
            ListenerOptions::new().concurrency(8),
            Distributed::new(),
        )
        .await
        .expect("spawn again");
    handled_between(&recorder, &next, EVENTS).await;
    eventually("nothing out", || async {
        handle2.pending().await.expect("state") == (0, 0)
    })
    .await;
    let again_handled: Vec<_> = next
        .handled()
        .into_iter()
        .filter(|v| first.contains(v))
        .collect();
    assert!(
        again_handled.is_empty(),
        "acked before the abort, handled again: {again_handled:?}"
    );
    again.shutdown(Duration::from_secs(10)).await;
    drop(jetstream);
}

/// The server restarts in the middle of a stream of acks (eager handlers,
/// concurrency 16): nothing is lost; once every event was handled and the
/// shutdown returned, nothing is out, and the next run has nothing of
/// them left (a confirmation taken after the restart must not have
/// released acks the dead connection swallowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_restart_in_a_stream_of_acks_loses_nothing_and_leaves_nothing_out() {
    const EVENTS: u64 = 3_000;
    let mut server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "midflow").await;
    publish_all(&jetstream, 0..EVENTS).await;
    let recorder = Recorder::eager("midflow");
    let handle = jetstream
        .spawn_with(
            recorder.clone(),
            ListenerOptions::new().concurrency(16),
            Distributed::new()
                .ack_wait(Duration::from_secs(1))
                .start(Start::Beginning),
        )
        .await
        .expect("spawn");
    eventually("some handled", || {
        let handled = recorder.handled().len();
        async move { handled >= 300 }
    })
    .await;
    server.restart();
    eventually("every event handled once at least", || {
        let distinct = recorder.distinct();
        async move { distinct == EVENTS as usize }
    })
    .await;
    // Until what the restart cut short came again and was handled.
    eventually("nothing out while running", || async {
        handle
            .pending()
            .await
            .is_ok_and(|pending| pending == (0, 0))
    })
    .await;
    let deadline = Duration::from_secs(5);
    let shutdown = tokio::time::timeout(deadline + SHUTDOWN_SLACK, jetstream.shutdown(deadline));
    assert!(shutdown.await.is_ok(), "the shutdown was not bounded");
    assert_eq!(handle.pending().await.expect("state"), (0, 0));
}

/// A shutdown while events keep coming and 16 handlers are busy: the
/// drain finishes what was started and acks it; right as it returns
/// nothing is out; the next run handles the rest, none of the first run's
/// again, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_drain_under_load_acks_its_in_flight_work() {
    const EVENTS: u64 = 4_000;
    let server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "underload").await;
    publish_all(&jetstream, 0..EVENTS).await;
    let recorder = Recorder::eager("underload");
    let handle = from_the_start(
        &jetstream,
        &recorder,
        ListenerOptions::new().concurrency(16),
    )
    .await;
    eventually("some handled", || {
        let handled = recorder.handled().len();
        async move { handled >= 500 }
    })
    .await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    let (_, out) = handle.pending().await.expect("state");
    assert_eq!(out, 0, "out right as the shutdown returned");
    let first = recorder.counts();
    assert!(first.values().all(|count| *count == 1), "a redelivery");
    let again = connect_to(&server.url(), "underload").await;
    let next = Recorder::eager("underload");
    let handle2 = again
        .spawn_with(
            next.clone(),
            ListenerOptions::new().concurrency(16),
            Distributed::new(),
        )
        .await
        .expect("spawn again");
    eventually("the rest handled", || {
        let total = first.len() + next.distinct();
        async move { total >= EVENTS as usize }
    })
    .await;
    eventually("nothing out", || async {
        handle2.pending().await.expect("state") == (0, 0)
    })
    .await;
    let twice: Vec<_> = next
        .handled()
        .into_iter()
        .filter(|v| first.contains_key(v))
        .collect();
    assert!(
        twice.is_empty(),
        "handled by both runs: {} of them",
        twice.len()
    );
    let mut all: Vec<u64> = first.keys().copied().chain(next.handled()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), EVENTS as usize);
    again.shutdown(Duration::from_secs(10)).await;
}

/// 16 acks sent directly, then the server restarts inside their 50 ms
/// before the confirmation, then a shutdown at once: the confirmation the
/// acker asks for after the reconnect must release only acks the server
/// has; right as the shutdown returns nothing is out, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_restart_inside_the_confirmation_window_then_a_shutdown_leaves_nothing_out() {
    const EVENTS: u64 = 16;
    for round in 0..3 {
        let mut server = NatsServer::start();
        let jetstream = connect_to(&server.url(), "window").await;
        publish_all(&jetstream, 0..EVENTS).await;
        let (recorder, handle) = handled_together(&jetstream, "window", EVENTS).await;
        server.restart();
        let deadline = Duration::from_secs(5);
        let shutdown =
            tokio::time::timeout(deadline + SHUTDOWN_SLACK, jetstream.shutdown(deadline));
        assert!(shutdown.await.is_ok(), "the shutdown was not bounded");
        let pending = handle.pending().await;
        assert!(
            pending.as_ref().is_ok_and(|pending| *pending == (0, 0)),
            "round {round}: {pending:?} right as the shutdown returned"
        );
        assert_eq!(recorder.distinct(), EVENTS as usize);
    }
}
