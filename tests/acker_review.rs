//! An adversarial review of a JetStream listener's acker (its acks sent
//! together, the last of each batch confirmed): small programs that try to
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

use event_bus::nats::{Distributed, Start};
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
    entered: Arc<AtomicUsize>,
    handled: Arc<Mutex<Vec<u64>>>,
    gate: Arc<Semaphore>,
}

impl Recorder {
    fn new(name: &'static str, open: bool) -> Self {
        let recorder = Self {
            name,
            entered: Arc::default(),
            handled: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        };
        if open {
            recorder.open();
        }
        recorder
    }

    fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
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
        let _ = self.gate.acquire().await.map(|permit| permit.forget());
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
    const EVENTS: u64 = 3_000;
    let server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "burst").await;
    let recorder = Recorder::new("burst", true);
    let handle = jetstream
        .spawn_with(
            recorder.clone(),
            ListenerOptions::new().concurrency(16),
            Distributed::new().start(Start::Beginning),
        )
        .await
        .expect("spawn");
    publish_all(&jetstream, 0..EVENTS).await;
    eventually("every event handled", || {
        let handled = recorder.handled().len();
        async move { handled >= EVENTS as usize }
    })
    .await;
    let reports = jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(reports.len(), 1);
    // Right as the shutdown returns: nothing out, nothing to deliver.
    assert_eq!(handle.pending().await.expect("state"), (0, 0));
    let counts = recorder.counts();
    assert_eq!(counts.len(), EVENTS as usize);
    assert!(counts.values().all(|count| *count == 1), "a redelivery");

    // The group's next run: only what is new.
    let again = connect_to(&server.url(), "burst").await;
    let next = Recorder::new("burst", true);
    let _handle = again
        .spawn_with(
            next.clone(),
            ListenerOptions::new().concurrency(16),
            Distributed::new(),
        )
        .await
        .expect("spawn again");
    publish_all(&again, EVENTS..EVENTS + 1).await;
    eventually("the new event handled", || {
        let handled = next.handled();
        async move { handled.contains(&EVENTS) }
    })
    .await;
    assert_eq!(next.handled(), [EVENTS], "handled again after the drain");
    again.shutdown(Duration::from_secs(10)).await;
}

/// Concurrency 16, and attempts enough that deliveries the stalled
/// connection never passed on (each counts, every `ack_wait`) do not use
/// up the consumer's `max_deliver`.
fn many_attempts() -> ListenerOptions {
    ListenerOptions::new()
        .concurrency(16)
        .retry(RetryPolicy::exponential(1_000))
}

/// The server applies the acks but its confirmations never reach the
/// client (the proxy holds back everything it sends): the shutdown must
/// still return within its deadline and grace, `held` not waited on
/// forever, and nothing is lost (what was not applied comes again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn confirmations_that_never_come_neither_hang_the_shutdown_nor_lose_events() {
    const EVENTS: u64 = 200;
    let server = NatsServer::start();
    let proxy = Proxy::start(&server.url()).await;
    let jetstream = connect_to(&proxy.url(), "unconfirmed").await;
    let recorder = Recorder::new("unconfirmed", false);
    let _handle = jetstream
        .spawn_with(
            recorder.clone(),
            many_attempts(),
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
    proxy.hold(true);
    recorder.open();
    eventually("the 16 handled", || {
        let handled = recorder.handled().len();
        async move { handled >= 16 }
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
    let again = connect_to(&server.url(), "unconfirmed").await;
    let next = Recorder::new("unconfirmed", true);
    let handle = again
        .spawn_with(
            next.clone(),
            many_attempts(),
            Distributed::new().ack_wait(Duration::from_secs(1)),
        )
        .await
        .expect("spawn again");
    eventually("every event handled once at least", || {
        let mut all = recorder.handled();
        all.extend(next.handled());
        all.sort_unstable();
        all.dedup();
        async move { all.len() == EVENTS as usize }
    })
    .await;
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
    handled: Arc<Mutex<Vec<u64>>>,
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
            if value % 5 == 0 && *attempt == 1 {
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
    const EVENTS: u64 = 1_000;
    let server = NatsServer::start();
    let jetstream = connect_to(&server.url(), "partial").await;
    publish_all(&jetstream, 0..EVENTS).await;
    let partial = Partial {
        handled: Arc::default(),
    };
    let options = ListenerOptions::new()
        .max_batch(64)
        .max_wait(Duration::from_millis(50))
        .retry(
            RetryPolicy::exponential(3)
                .initial_backoff(Duration::from_millis(20))
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
        async move { all.len() == EVENTS as usize }
    })
    .await;
    jetstream.shutdown(Duration::from_secs(10)).await;
    assert_eq!(handle.pending().await.expect("state"), (0, 0));
    let mut counts = HashMap::<u64, usize>::new();
    for value in partial.handled.lock().unwrap().iter() {
        *counts.entry(*value).or_default() += 1;
    }
    let again: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).collect();
    assert!(again.is_empty(), "acked, then handled again: {again:?}");
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
