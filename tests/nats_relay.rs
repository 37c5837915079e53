//! The outbox relay: events committed in the durable tier's outbox reach
//! the JetStream tier's stream, each stored once with its own id, through a
//! server outage, a relay that publishes again, and rolled-back
//! transactions; and the relay refuses a stream whose duplicate window is
//! shorter than its retries. Each test starts a nats-server of its own; they
//! are ignored in a plain `cargo test`:
//! `cargo test --test nats_relay -- --include-ignored`.

#[allow(dead_code)]
#[path = "nats_tier/server.rs"]
mod server;

#[allow(dead_code)]
#[path = "nats_tier/outbox.rs"]
mod outbox;

use std::collections::HashSet;
use std::time::Duration;

use event_bus::DomainEvent;
use event_bus::nats::{Config, Distributed, Error, JetStream, Start};
use event_bus::sql::{Durable, SqliteStore};
use outbox::{Order, Seen, store_in, stored, until, within};
use serde::{Deserialize, Serialize};
use server::NatsServer;

#[derive(Debug, Clone, DomainEvent, Serialize, Deserialize)]
enum Shop {
    OrderPlaced { order: u64 },
    OrderShipped { order: u64 },
}

impl Order for Shop {
    fn order(&self) -> u64 {
        match self {
            Self::OrderPlaced { order } | Self::OrderShipped { order } => *order,
        }
    }
}

/// The ids of the events in the store's log.
async fn logged_ids(store: &SqliteStore<Shop>) -> HashSet<String> {
    sqlx::query_scalar::<_, String>("SELECT id FROM event_bus_events")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Commits orders `orders` in transactions of `per`, each placed and
/// shipped; then one transaction of order `u64::MAX` that rolls back.
async fn commit_orders(store: &SqliteStore<Shop>, orders: std::ops::Range<u64>, per: usize) {
    let orders: Vec<u64> = orders.collect();
    for chunk in orders.chunks(per) {
        let tx = store.begin().await.unwrap();
        for &order in chunk {
            tx.emit_order_placed(order);
            tx.emit_order_shipped(order);
        }
        tx.commit().await.unwrap();
    }
    let tx = store.begin().await.unwrap();
    tx.emit_order_placed(u64::MAX);
    tx.rollback().await.unwrap();
}

/// The stream holds each event of the log once (`seen`, a listener reading
/// it from its start, was handed every one of them, and nothing else), with
/// the ids of the log.
async fn assert_each_once(stream: &JetStream<Shop>, seen: &Seen<Shop>, logged: &HashSet<String>) {
    assert_eq!(
        stored(stream).await,
        logged.len() as u64,
        "the stream holds each committed event once"
    );
    let all = seen.all();
    let ids: HashSet<String> = all.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(&ids, logged, "the stream holds the log's events, by id");
    assert!(
        all.iter().all(|(_, order)| *order != u64::MAX),
        "a rolled-back event reached the stream"
    );
}

async fn setup(
    server: &NatsServer,
    dir: &std::path::Path,
) -> (SqliteStore<Shop>, JetStream<Shop>, Seen<Shop>) {
    let store = store_in(dir).await;
    let stream = JetStream::<Shop>::connect(&server.url(), Config::new("shop"))
        .await
        .unwrap();
    let seen = Seen::default();
    stream
        .spawn_with(
            seen.clone(),
            Default::default(),
            Distributed::new().start(Start::Beginning),
        )
        .await
        .unwrap();
    (store, stream, seen)
}

#[tokio::test]
#[ignore = "needs nats-server"]
async fn committed_events_reach_the_stream_once_each_with_their_ids() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (store, stream, seen) = setup(&server, dir.path()).await;
    // Committed before the relay starts, and after.
    commit_orders(&store, 0..50, 7).await;
    let relay = stream
        .spawn_relay(
            &store,
            Durable::new().start(event_bus::sql::Start::Beginning),
        )
        .await
        .unwrap();
    assert_eq!(relay.group(), "nats-relay");
    commit_orders(&store, 50..150, 10).await;

    let logged = logged_ids(&store).await;
    assert_eq!(logged.len(), 300);
    until("every committed event to reach the stream", || {
        seen.len() >= logged.len()
    })
    .await;
    within("the relay to be idle", store.idle()).await.unwrap();
    assert_each_once(&stream, &seen, &logged).await;
    // In log order: the relay publishes a batch in order, one batch after
    // another, and `seen` reads the stream in order.
    let orders: Vec<u64> = seen.all().iter().map(|(_, order)| *order).collect();
    let mut sorted = orders.clone();
    sorted.sort_unstable();
    assert_eq!(orders, sorted, "the stream holds the events in log order");

    store.shutdown(Duration::from_secs(5)).await;
    stream.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
#[ignore = "needs nats-server"]
async fn a_relay_that_publishes_again_stores_each_event_once() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (store, stream, seen) = setup(&server, dir.path()).await;
    stream
        .spawn_relay(
            &store,
            Durable::new().start(event_bus::sql::Start::Beginning),
        )
        .await
        .unwrap();
    commit_orders(&store, 0..100, 25).await;
    until("the first 200 events in the stream", || seen.len() >= 200).await;
    within("the relay to be idle", store.idle()).await.unwrap();

    // As after a crash between the publishes and the checkpoint: the
    // relay's group reads the log again from its first event.
    store
        .replay("nats-relay", event_bus::sql::Start::Beginning)
        .await
        .unwrap();
    commit_orders(&store, 100..101, 1).await;
    until("the event committed after the replay", || {
        seen.all().iter().any(|(_, order)| *order == 100)
    })
    .await;
    within("the relay to be idle", store.idle()).await.unwrap();
    // Whatever was published again was stored once: the relay published
    // the last event after every copy.
    let logged = logged_ids(&store).await;
    assert_eq!(logged.len(), 202);
    assert_each_once(&stream, &seen, &logged).await;

    store.shutdown(Duration::from_secs(5)).await;
    stream.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
#[ignore = "needs nats-server"]
async fn a_server_outage_delays_the_relay_and_loses_nothing() {
    let mut server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (store, stream, seen) = setup(&server, dir.path()).await;
    let relay = stream
        .spawn_relay(
            &store,
            Durable::new().start(event_bus::sql::Start::Beginning),
        )
        .await
        .unwrap();
    commit_orders(&store, 0..20, 5).await;
    until("the first events in the stream", || seen.len() >= 40).await;

    server.stop();
    commit_orders(&store, 20..120, 10).await;
    until(
        "the relay to fail an attempt while the server is down",
        || relay.report().failed > 0,
    )
    .await;
    server.start_again();

    let logged = logged_ids(&store).await;
    assert_eq!(logged.len(), 240);
    until("every committed event to reach the stream", || {
        seen.len() >= logged.len()
    })
    .await;
    within("the relay to be idle", store.idle()).await.unwrap();
    assert_each_once(&stream, &seen, &logged).await;
    assert_eq!(relay.report().dead_lettered, 0);
    let dead = store.dead_letters(Some("nats-relay")).await.unwrap();
    assert!(dead.is_empty(), "{} dead deliveries", dead.len());

    store.shutdown(Duration::from_secs(5)).await;
    stream.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
#[ignore = "needs nats-server"]
async fn the_relay_refuses_a_duplicate_window_shorter_than_its_retries() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path()).await;
    let config = Config::new("short")
        .duplicate_window(Duration::from_secs(30))
        .publish_retry(Duration::from_secs(1));
    let stream = JetStream::<Shop>::connect(&server.url(), config)
        .await
        .unwrap();
    match stream.spawn_relay(&store, Durable::new()).await {
        Err(Error::DuplicateWindow { window, span }) => {
            assert_eq!(window, Duration::from_secs(30));
            assert!(span > window, "{span:?}");
        }
        other => panic!("expected the duplicate-window error, got {other:?}"),
    }
    // The default stream's window (two minutes) covers them.
    let stream = JetStream::<Shop>::connect(&server.url(), Config::new("default"))
        .await
        .unwrap();
    stream.spawn_relay(&store, Durable::new()).await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
}
