//! The durable tier's own promises, on SQLite: the outbox commits events
//! with the transaction or not at all; attempts and dead deliveries are
//! rows that survive the process; redrive, discard, replay, prune and the
//! idempotency helper do what their docs say.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::sql::{Durable, SqliteStore, Start, first_time};
use event_bus::{DomainEvent, HandlerError, ListenerOptions, Meta, RetryPolicy, listener};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, DomainEvent, Serialize, Deserialize)]
enum Shop {
    OrderPaid { order: u64 },
    OrderShipped { order: u64 },
}

/// Records every call as (order, attempt); fails the orders it is told to,
/// up to a number of times each (`u32::MAX`: always).
#[derive(Clone, Default)]
struct Clerk {
    calls: Arc<Mutex<Vec<(u64, u32)>>>,
    failing: Arc<Mutex<Vec<(u64, u32)>>>,
}

impl Clerk {
    fn failing(self, order: u64, times: u32) -> Self {
        self.failing.lock().unwrap().push((order, times));
        self
    }

    fn calls(&self) -> Vec<(u64, u32)> {
        self.calls.lock().unwrap().clone()
    }

    fn heal(&self) {
        self.failing.lock().unwrap().clear();
    }
}

#[listener]
impl ShopHandler for Clerk {
    async fn on_order_paid(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push((*order, meta.attempt()));
        let fails = self
            .failing
            .lock()
            .unwrap()
            .iter()
            .any(|&(failing, times)| failing == *order && meta.attempt() <= times);
        if fails {
            return Err(format!("order {order} failed").into());
        }
        Ok(())
    }
}

async fn store_in(dir: &std::path::Path) -> SqliteStore<Shop> {
    let options = SqliteConnectOptions::from_str("sqlite://")
        .unwrap()
        .filename(dir.join("shop.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    SqliteStore::new(pool).await.unwrap()
}

async fn events(store: &SqliteStore<Shop>) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM event_bus_events")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {DEADLINE:?}"))
}

#[tokio::test]
async fn an_outbox_event_exists_if_and_only_if_its_transaction_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path()).await;

    let mut tx = store.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (id) VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.emit_order_paid(1);
    assert_eq!(tx.len(), 1);
    tx.rollback().await.unwrap();
    assert_eq!(events(&store).await, 0, "a rolled-back event exists");

    let tx = store.begin().await.unwrap();
    tx.emit_order_paid(2);
    drop(tx);
    assert_eq!(events(&store).await, 0, "a dropped outbox's event exists");

    let mut tx = store.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (id) VALUES (3)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.emit_order_paid(3);
    tx.emit_order_shipped(3);
    let positions = tx.commit().await.unwrap();
    assert_eq!(positions.len(), 2);
    assert!(positions[0] < positions[1], "{positions:?}");
    assert_eq!(events(&store).await, 2);
    let orders: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(orders, 1);
}

#[tokio::test]
async fn attempts_and_dead_deliveries_survive_a_restart_and_redrive_gives_a_new_start() {
    let dir = tempfile::tempdir().unwrap();
    let retry = RetryPolicy::exponential(2)
        .initial_backoff(Duration::from_millis(1))
        .jitter(false);
    let from_the_start = || Durable::new().start(Start::Beginning);
    {
        let store = store_in(dir.path()).await;
        let tx = store.begin().await.unwrap();
        for order in 1..=3 {
            tx.emit_order_paid(order);
        }
        tx.commit().await.unwrap();
        let clerk = Clerk::default().failing(2, u32::MAX);
        let options = ListenerOptions::new().retry(retry);
        store
            .spawn_with(clerk.clone(), options, from_the_start())
            .await
            .unwrap();
        within("the listener to finish", store.idle())
            .await
            .unwrap();
        assert_eq!(clerk.calls(), [(1, 1), (2, 1), (2, 2), (3, 1)]);
        store.shutdown(DEADLINE).await;
    }

    // Another process's view: the dead delivery is a row.
    let store = store_in(dir.path()).await;
    let dead = store.dead_letters(None).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let letter = &dead[0];
    assert_eq!((letter.listener.as_str(), letter.attempts), ("Clerk", 2));
    assert!(letter.error.contains("order 2 failed"), "{letter:?}");
    assert_eq!(
        letter.envelope.as_deref().map(|e| e.event().clone()),
        Some(Shop::OrderPaid { order: 2 })
    );
    let progress = store.progress().await.unwrap();
    assert_eq!(progress.len(), 1);
    assert_eq!(
        (progress[0].dead, progress[0].unfinished, progress[0].lag),
        (1, 0, 0)
    );

    // Redriven, with the policy afresh, to a listener that now succeeds.
    let clerk = Clerk::default();
    store
        .spawn_with(
            clerk.clone(),
            ListenerOptions::new().retry(retry),
            from_the_start(),
        )
        .await
        .unwrap();
    assert_eq!(
        store.redrive("Clerk", Some(letter.position)).await.unwrap(),
        1
    );
    within("the redriven event to be handled", async {
        while clerk.calls().is_empty() {
            store.idle().await.unwrap();
            tokio::task::yield_now().await;
        }
    })
    .await;
    within("the listener to finish", store.idle())
        .await
        .unwrap();
    assert_eq!(
        clerk.calls(),
        [(2, 1)],
        "only the redriven event, as a first attempt"
    );
    assert!(store.dead_letters(None).await.unwrap().is_empty());
    assert_eq!(store.redrive("Clerk", None).await.unwrap(), 0);
    store.shutdown(DEADLINE).await;
}

#[tokio::test]
async fn discard_drops_a_dead_delivery_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path()).await;
    let clerk = Clerk::default().failing(7, u32::MAX);
    store.spawn(clerk.clone()).await.unwrap();
    let tx = store.begin().await.unwrap();
    tx.emit_order_paid(7);
    tx.commit().await.unwrap();
    within("the listener to finish", store.idle())
        .await
        .unwrap();
    assert_eq!(store.dead_letters(Some("Clerk")).await.unwrap().len(), 1);
    assert!(store.dead_letters(Some("Other")).await.unwrap().is_empty());

    assert_eq!(store.discard("Clerk", None).await.unwrap(), 1);
    assert!(store.dead_letters(None).await.unwrap().is_empty());
    assert_eq!(store.redrive("Clerk", None).await.unwrap(), 0);
    clerk.heal();
    within("the listener to finish", store.idle())
        .await
        .unwrap();
    assert_eq!(clerk.calls(), [(7, 1)]);
    store.shutdown(DEADLINE).await;
}

#[tokio::test]
async fn a_process_that_dies_mid_handler_leaves_the_event_to_the_next_with_attempt_two() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path()).await;
    let tx = store.begin().await.unwrap();
    tx.emit_order_paid(1);
    tx.commit().await.unwrap();

    // A handler that never returns, in a listener whose task is then
    // aborted: what it held is given back with its attempt counted.
    struct Stuck(Arc<tokio::sync::Notify>);
    #[listener(name = "Clerk")]
    impl ShopHandler for Stuck {
        async fn on_order_paid(&self, _order: &u64) -> Result<(), HandlerError> {
            self.0.notify_one();
            std::future::pending().await
        }
    }
    let entered = Arc::new(tokio::sync::Notify::new());
    let lease = Duration::from_millis(300);
    let stuck = store
        .spawn_with(
            Stuck(entered.clone()),
            ListenerOptions::new(),
            Durable::new().start(Start::Beginning).lease(lease),
        )
        .await
        .unwrap();
    within("the handler to start", entered.notified()).await;
    stuck.abort();
    within("the stuck listener to end", stuck.finished()).await;

    let clerk = Clerk::default();
    store
        .spawn_with(
            clerk.clone(),
            ListenerOptions::new(),
            Durable::new().lease(lease),
        )
        .await
        .unwrap();
    within("the event to be handled again", async {
        while clerk.calls().is_empty() {
            store.idle().await.unwrap();
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(clerk.calls(), [(1, 2)]);
    store.shutdown(DEADLINE).await;
}

#[tokio::test]
async fn replay_moves_a_listener_back_and_prune_keeps_what_a_listener_still_needs() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path()).await;
    let clerk = Clerk::default();
    store.spawn(clerk.clone()).await.unwrap();
    let tx = store.begin().await.unwrap();
    for order in 1..=4 {
        tx.emit_order_paid(order);
    }
    let positions = tx.commit().await.unwrap();
    within("the listener to finish", store.idle())
        .await
        .unwrap();
    assert_eq!(clerk.calls().len(), 4);

    store
        .replay("Clerk", Start::After(positions[1]))
        .await
        .unwrap();
    within("the replay", async {
        while clerk.calls().len() < 6 {
            store.idle().await.unwrap();
            tokio::task::yield_now().await;
        }
    })
    .await;
    let orders: Vec<u64> = clerk.calls().iter().map(|&(order, _)| order).collect();
    assert_eq!(orders, [1, 2, 3, 4, 3, 4]);

    // A listener that has seen nothing holds every event back.
    store
        .replay("Laggard", Start::After(positions[2]))
        .await
        .unwrap();
    assert_eq!(store.prune().await.unwrap(), 3);
    assert_eq!(events(&store).await, 1);
    store.replay("Laggard", Start::Now).await.unwrap();
    assert_eq!(store.prune().await.unwrap(), 1);
    assert_eq!(events(&store).await, 0);
    store.shutdown(DEADLINE).await;
}

#[tokio::test]
async fn first_time_is_true_once_per_listener_and_event_and_only_if_its_transaction_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path()).await;
    let envelope = event_bus::Envelope::new(Shop::OrderPaid { order: 7 });
    let meta = |attempt| Meta::new(&envelope, attempt);
    let mut tx = store.pool().begin().await.unwrap();
    assert!(
        first_time::<sqlx::Sqlite>(&mut tx, "mailer", &meta(1))
            .await
            .unwrap()
    );
    tx.rollback().await.unwrap();

    let mut tx = store.pool().begin().await.unwrap();
    assert!(
        first_time::<sqlx::Sqlite>(&mut tx, "mailer", &meta(1))
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();

    let mut tx = store.pool().begin().await.unwrap();
    assert!(
        !first_time::<sqlx::Sqlite>(&mut tx, "mailer", &meta(2))
            .await
            .unwrap()
    );
    assert!(
        first_time::<sqlx::Sqlite>(&mut tx, "auditor", &meta(2))
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
}
