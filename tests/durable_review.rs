//! The durable tier's promises under attack, on SQLite: the programs of an
//! adversarial review, each of which broke a promise before its fix (the
//! doc comment of each says how), kept as regression tests.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::sql::{Durable, SqliteStore, Start};
use event_bus::{DomainEvent, HandlerError, ListenerOptions, Meta, RetryPolicy, Scope, listener};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, DomainEvent, Serialize, Deserialize)]
enum Shop {
    OrderPaid { order: u64 },
    OrderShipped { order: u64 },
}

/// Records (order, attempt) of every call; sleeps `slow` on order 1; fails
/// order `fail_first` on its first call.
#[derive(Clone, Default)]
struct Clerk {
    calls: Arc<Mutex<Vec<(u64, u32)>>>,
    slow: Duration,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    fail_first: Option<u64>,
    failed: Arc<AtomicU64>,
}

impl Clerk {
    fn calls(&self) -> Vec<(u64, u32)> {
        self.calls.lock().unwrap().clone()
    }
    fn per_order(&self) -> HashMap<u64, usize> {
        let mut m = HashMap::new();
        for (o, _) in self.calls() {
            *m.entry(o).or_insert(0) += 1;
        }
        m
    }
}

#[listener(name = "Clerk")]
impl ShopHandler for Clerk {
    async fn on_order_paid(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push((*order, meta.attempt()));
        if *order == 1 {
            if let Some(gate) = &self.gate {
                let _permit = gate.acquire().await.unwrap();
            }
            tokio::time::sleep(self.slow).await;
        }
        if self.fail_first == Some(*order) && self.failed.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(format!("order {order} failed").into());
        }
        Ok(())
    }
}

fn options_for(path: &std::path::Path) -> SqliteConnectOptions {
    SqliteConnectOptions::from_str("sqlite://")
        .unwrap()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
}

async fn store_at(path: &std::path::Path) -> SqliteStore<Shop> {
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options_for(path))
        .await
        .unwrap();
    SqliteStore::new(pool).await.unwrap()
}

fn tmpdir() -> tempfile::TempDir {
    // On disk (fsync is real), not tmpfs.
    // On disk, in the target directory.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

async fn commit(store: &SqliteStore<Shop>, orders: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let tx = store.begin().await.unwrap();
    for o in orders {
        tx.emit_order_paid(o);
    }
    tx.commit().await.unwrap()
}

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {DEADLINE:?}"))
}

/// Durable: "a lease, renewed while the process lives". One process, one
/// listener, concurrency 1, a handler of 400 ms; a short lease and a short
/// poll interval (both within what the setters accept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_kept_while_the_process_lives_with_a_short_poll() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    commit(&store, [1, 2, 3]).await;
    let clerk = Clerk {
        slow: Duration::from_millis(400),
        ..Clerk::default()
    };
    store
        .spawn_with(
            clerk.clone(),
            ListenerOptions::new(),
            Durable::new()
                .start(Start::Beginning)
                .lease(Duration::from_millis(60))
                .poll_interval(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    within("idle", store.idle()).await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    println!("calls: {:?}", clerk.calls());
    assert_eq!(
        clerk.per_order().get(&1).copied(),
        Some(1),
        "order 1 was handled more than once by one listener in one live process: {:?}",
        clerk.calls()
    );
}

/// Same, the default poll (500 ms), a lease of 300 ms: a handler of 1.5 s
/// beside many listeners of this process writing (the store's gate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_kept_while_the_process_lives_behind_a_held_outbox() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("event_bus=debug")
        .with_test_writer()
        .try_init();
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    let other = store_at(&dir.path().join("shop.db")).await; // a second process
    commit(&store, [1]).await;
    let clerk = Clerk {
        slow: Duration::from_millis(1500),
        ..Clerk::default()
    };
    let durable = Durable::new()
        .start(Start::Beginning)
        .lease(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(50));
    store
        .spawn_with(clerk.clone(), ListenerOptions::new(), durable.clone())
        .await
        .unwrap();
    // Wait until this process has order 1 in hand.
    within("order 1 taken", async {
        while clerk.calls().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The other process runs the same listener.
    let other_clerk = Clerk::default();
    other
        .spawn_with(other_clerk.clone(), ListenerOptions::new(), durable)
        .await
        .unwrap();
    // The application, in this process, holds an outbox transaction for
    // 800 ms (its own slow work in it).
    let tx = store.begin().await.unwrap();
    tx.emit_order_paid(2);
    tokio::time::sleep(Duration::from_millis(800)).await;
    tx.commit().await.unwrap();
    within("idle", store.idle()).await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    other.shutdown(Duration::from_secs(5)).await;
    println!(
        "this process: {:?}; other: {:?}",
        clerk.calls(),
        other_clerk.calls()
    );
    let ones = clerk.per_order().get(&1).copied().unwrap_or(0)
        + other_clerk.per_order().get(&1).copied().unwrap_or(0);
    assert_eq!(
        ones, 1,
        "order 1 handled {ones} times while its first process lived"
    );
}

/// `Durable::prefetch`: "How many events the process leases ahead of its
/// handler (at least 1)". A big prefetch.
#[tokio::test]
async fn a_huge_prefetch_spawns_without_a_panic() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    let s = store.clone();
    let spawned = tokio::spawn(async move {
        s.spawn_with(
            Clerk::default(),
            ListenerOptions::new(),
            Durable::new().prefetch(usize::MAX),
        )
        .await
        .map(drop)
    })
    .await;
    println!("{spawned:?}");
    assert!(spawned.is_ok(), "spawn_with panicked");
}

#[tokio::test]
async fn a_large_prefetch_still_delivers_every_event() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    commit(&store, [7]).await;
    let clerk = Clerk::default();
    let running = store
        .spawn_with(
            clerk.clone(),
            ListenerOptions::new(),
            Durable::new().start(Start::Beginning).prefetch(1 << 58),
        )
        .await
        .unwrap();
    within("idle", store.idle()).await.unwrap();
    println!(
        "status {:?}, report {:?}, calls {:?}, progress {:?}",
        running.status(),
        running.report(),
        clerk.calls(),
        store.progress().await.unwrap()
    );
    assert_eq!(
        clerk.calls().len(),
        1,
        "a committed event was never handed to the listener"
    );
}

#[tokio::test]
async fn a_poll_interval_of_duration_max_still_delivers() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    commit(&store, [7]).await;
    let clerk = Clerk::default();
    let running = store
        .spawn_with(
            clerk.clone(),
            ListenerOptions::new(),
            Durable::new()
                .start(Start::Beginning)
                .poll_interval(Duration::MAX),
        )
        .await
        .unwrap();
    within("idle", store.idle()).await.unwrap();
    commit(&store, [8]).await;
    within("idle", store.idle()).await.unwrap();
    println!(
        "status {:?}, report {:?}, calls {:?}",
        running.status(),
        running.report(),
        clerk.calls()
    );
    assert_eq!(
        clerk.calls().len(),
        2,
        "committed events were never handed to the listener"
    );
}

#[tokio::test]
async fn a_concurrency_of_usize_max_spawns_without_a_panic() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    let s = store.clone();
    let spawned = tokio::spawn(async move {
        s.spawn_with(
            Clerk::default(),
            ListenerOptions::new().concurrency(usize::MAX),
            Durable::new(),
        )
        .await
        .map(drop)
    })
    .await;
    println!("{spawned:?}");
    assert!(spawned.is_ok(), "spawn_with panicked");
}

/// `Store::replay`: "What it held in progress is forgotten (a finish for it
/// is ignored)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_of_a_delivery_forgotten_by_replay_is_ignored() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    commit(&store, [1]).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let clerk = Clerk {
        gate: Some(gate.clone()),
        fail_first: Some(1),
        ..Clerk::default()
    };
    store
        .spawn_with(
            clerk.clone(),
            ListenerOptions::new().retry(RetryPolicy::none()),
            Durable::new().start(Start::Beginning),
        )
        .await
        .unwrap();
    within("order 1 taken", async {
        while clerk.calls().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Replay while order 1 is in the handler: its delivery is forgotten.
    store.replay("Clerk", Start::Beginning).await.unwrap();
    // Let the worker claim the replayed delivery.
    within("replayed delivery claimed", async {
        loop {
            // A claim of the replayed log holds it.
            let leased: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM event_bus_claims WHERE listener = 'Clerk'",
            )
            .fetch_one(store.pool())
            .await
            .unwrap();
            if leased == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The forgotten attempt fails (its last: no retries); the replayed
    // delivery then succeeds.
    gate.add_permits(10);
    within("idle", store.idle()).await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    let dead = store.dead_letters(Some("Clerk")).await.unwrap();
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT position, state FROM event_bus_deliveries")
            .fetch_all(store.pool())
            .await
            .unwrap();
    println!(
        "calls {:?}; dead {:?}; rows {rows:?}",
        clerk.calls(),
        dead.iter()
            .map(|d| (d.position, d.attempts, d.error.clone()))
            .collect::<Vec<_>>()
    );
    assert!(
        dead.is_empty(),
        "the forgotten delivery's failure was recorded on the replayed delivery, which was handled"
    );
}

/// `Scope::Instance`: "durable (SQL log): one checkpoint per listener name
/// and process, so every process handles every event".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_instance_hands_every_event_to_every_process() {
    let dir = tmpdir();
    let a = store_at(&dir.path().join("shop.db")).await;
    let b = store_at(&dir.path().join("shop.db")).await;
    let (ca, cb) = (Clerk::default(), Clerk::default());
    let options = ListenerOptions::new().scope(Scope::Instance);
    let durable = Durable::new().poll_interval(Duration::from_millis(10));
    a.spawn_with(ca.clone(), options.clone(), durable.clone())
        .await
        .unwrap();
    b.spawn_with(cb.clone(), options, durable).await.unwrap();
    for o in 10..30 {
        commit(&a, [o]).await;
    }
    within("idle", async {
        loop {
            a.idle().await.unwrap();
            b.idle().await.unwrap();
            if ca.calls().len() + cb.calls().len() >= 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    println!(
        "a handled {}, b handled {}",
        ca.calls().len(),
        cb.calls().len()
    );
    assert_eq!((ca.calls().len(), cb.calls().len()), (20, 20));
}

/// Two stores on one file (two processes), each with listeners and writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_under_load_hand_each_group_every_event_once() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let a = store_at(&path).await;
    let b = store_at(&path).await;
    let mut clerks = Vec::new();
    for (i, store) in [&a, &b].into_iter().enumerate() {
        for g in 0..4 {
            let clerk = Clerk::default();
            store
                .spawn_with(
                    clerk.clone(),
                    ListenerOptions::new().concurrency(2),
                    Durable::new()
                        .group(format!("g{g}"))
                        .start(Start::Beginning)
                        .poll_interval(Duration::from_millis(2)),
                )
                .await
                .unwrap();
            clerks.push((i, g, clerk));
        }
    }
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = if t % 2 == 0 { a.clone() } else { b.clone() };
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40u64 {
                let order = 1000 + t * 1000 + i;
                match store.begin().await {
                    Ok(tx) => {
                        tx.emit_order_paid(order);
                        if let Err(e) = tx.commit().await {
                            errors.lock().unwrap().push(format!("commit: {e}"));
                        }
                    }
                    Err(e) => errors.lock().unwrap().push(format!("begin: {e}")),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    within("idle a", a.idle()).await.unwrap();
    within("idle b", b.idle()).await.unwrap();
    let committed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM event_bus_events")
        .fetch_one(a.pool())
        .await
        .unwrap();
    for g in 0..4 {
        let total: usize = clerks
            .iter()
            .filter(|(_, gg, _)| *gg == g)
            .map(|(_, _, c)| c.calls().len())
            .sum();
        println!("group g{g}: {total} calls for {committed} events");
        assert_eq!(total as i64, committed, "group g{g}");
    }
    let errors = errors.lock().unwrap().clone();
    println!(
        "errors: {}: {:?}",
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>()
    );
    assert!(errors.is_empty());
}

/// A user transaction begun with `pool.begin()` beside the store's writers:
/// read, then emit (`Store::outbox`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_transaction_begun_immediate_beside_the_store_s_writers_commits() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    sqlx::raw_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        .execute(store.pool())
        .await
        .unwrap();
    for g in 0..4 {
        store
            .spawn_with(
                Clerk::default(),
                ListenerOptions::new(),
                Durable::new()
                    .group(format!("g{g}"))
                    .poll_interval(Duration::from_millis(2)),
            )
            .await
            .unwrap();
    }
    let mut errors = Vec::new();
    for i in 0..100i64 {
        // As `Store::outbox` tells: a writer from the start on SQLite.
        let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
        // Reads first (the pattern that fails in a deferred transaction).
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, i);
        tokio::time::sleep(Duration::from_millis(3)).await;
        let written = sqlx::query("INSERT INTO orders (id) VALUES ($1)")
            .bind(i)
            .execute(&mut *tx)
            .await;
        if let Err(e) = written {
            errors.push(format!("insert: {e}"));
            continue;
        }
        let outbox = store.outbox(tx);
        outbox.emit_order_paid(i as u64);
        if let Err(e) = outbox.commit().await {
            errors.push(format!("commit: {e}"));
        }
    }
    println!(
        "errors: {} of 100: {:?}",
        errors.len(),
        errors.iter().take(2).collect::<Vec<_>>()
    );
    store.shutdown(Duration::from_secs(5)).await;
    assert!(errors.is_empty());
}

/// The claim's lease is computed before the claim waits for the store's
/// write turn: an outbox held open (here 500 ms, lease 200 ms) makes the
/// worker insert leases that have already expired, and its next claim
/// takes the same events again. No handler is slow beyond 300 ms, nothing
/// dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_claimed_behind_a_held_outbox_are_delivered_once() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    let clerk = Clerk {
        slow: Duration::from_millis(300),
        ..Clerk::default()
    };
    store
        .spawn_with(
            clerk.clone(),
            ListenerOptions::new(),
            Durable::new()
                .lease(Duration::from_millis(200))
                .poll_interval(Duration::from_millis(20)),
        )
        .await
        .unwrap();
    let tx = store.begin().await.unwrap();
    tx.emit_order_paid(1);
    tx.emit_order_paid(2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.commit().await.unwrap();
    within("idle", store.idle()).await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    println!("calls: {:?}", clerk.calls());
    assert_eq!(
        clerk.calls().len(),
        2,
        "each event once: {:?}",
        clerk.calls()
    );
}

/// `Store::shutdown`: "is stopped after it (what it still held is given
/// back, to be handled again)". A retry waiting out its delay at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waiting_at_shutdown_comes_back_with_its_own_attempt() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let store = store_at(&path).await;
    commit(&store, [5]).await;
    let clerk = Clerk {
        fail_first: Some(5),
        ..Clerk::default()
    };
    let retry = RetryPolicy::exponential(3).initial_backoff(Duration::from_millis(1500));
    let durable = Durable::new().start(Start::Beginning);
    store
        .spawn_with(
            clerk.clone(),
            ListenerOptions::new().retry(retry),
            durable.clone(),
        )
        .await
        .unwrap();
    within("first attempt", async {
        while clerk.calls().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    within("the failure to be recorded", async {
        loop {
            let recorded: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM event_bus_deliveries WHERE last_error IS NOT NULL",
            )
            .fetch_one(store.pool())
            .await
            .unwrap();
            if recorded == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    store.shutdown(Duration::from_millis(100)).await;
    drop(store);
    let again = store_at(&path).await;
    again
        .spawn_with(clerk.clone(), ListenerOptions::new().retry(retry), durable)
        .await
        .unwrap();
    within("idle", again.idle()).await.unwrap();
    again.shutdown(Duration::from_secs(5)).await;
    println!("calls (order, attempt): {:?}", clerk.calls());
    assert_eq!(
        clerk.calls(),
        vec![(5, 1), (5, 2)],
        "the second attempt is numbered 3"
    );
}

/// The documented `first_time` pattern in handlers of 4 listeners of
/// concurrency 4, beside the store's writers.
#[derive(Clone)]
struct Receipts(sqlx::SqlitePool, &'static str, Arc<Mutex<Vec<String>>>);

#[listener(name = "Receipts")]
impl ShopHandler for Receipts {
    async fn on_order_paid(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        let done: Result<(), sqlx::Error> = async {
            let mut tx = self.0.begin().await?;
            if event_bus::sql::first_time::<sqlx::Sqlite>(&mut tx, self.1, &meta)
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?
            {
                sqlx::query("INSERT INTO receipts (listener, order_id) VALUES ($1, $2)")
                    .bind(self.1)
                    .bind(*order as i64)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        }
        .await;
        if let Err(e) = &done {
            self.2.lock().unwrap().push(e.to_string());
        }
        Ok(done?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_time_pattern_under_concurrency_keeps_every_effect_once() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    sqlx::raw_sql(
        "CREATE TABLE receipts (listener TEXT, order_id INTEGER, PRIMARY KEY (listener, order_id))",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    for name in ["r1", "r2", "r3", "r4"] {
        store
            .spawn_with(
                Receipts(store.pool().clone(), name, errors.clone()),
                ListenerOptions::new()
                    .concurrency(4)
                    .retry(RetryPolicy::exponential(5).initial_backoff(Duration::from_millis(5))),
                Durable::new().start(Start::Beginning).group(name),
            )
            .await
            .unwrap();
    }
    for o in 0..200u64 {
        commit(&store, [o]).await;
    }
    within("idle", store.idle()).await.unwrap();
    let receipts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM receipts")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let dead = store.dead_letters(None).await.unwrap().len();
    store.shutdown(Duration::from_secs(5)).await;
    let errors = errors.lock().unwrap().clone();
    println!(
        "receipts {receipts} of 800, dead {dead}, handler errors {}: {:?}",
        errors.len(),
        errors.iter().take(2).collect::<Vec<_>>()
    );
    assert_eq!((receipts, dead, errors.len()), (800, 0, 0));
}

/// `Store::shutdown(deadline)` while the application holds an outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_with_an_outbox_open_in_another_task() {
    let dir = tmpdir();
    let store = store_at(&dir.path().join("shop.db")).await;
    store
        .spawn_with(
            Clerk::default(),
            ListenerOptions::new(),
            Durable::new().poll_interval(Duration::from_millis(10)),
        )
        .await
        .unwrap();
    let tx = store.begin().await.unwrap();
    let holder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.commit().await.unwrap();
    });
    let started = std::time::Instant::now();
    store.shutdown(Duration::from_millis(200)).await;
    let took = started.elapsed();
    holder.await.unwrap();
    // The deadline, the second the finishes are given to be written, and
    // room for a loaded machine; the outbox is held for 5 s.
    assert!(
        took < Duration::from_millis(2_500),
        "shutdown(200ms) took {took:?}"
    );
}
