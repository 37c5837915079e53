//! The durable tier's claims (ranges of the log, taken over whole when
//! their process dies) under attack: the programs of a second adversarial
//! review, kept as regression tests. A "process" that dies is a store on a
//! runtime of its own, shut down in the background (its tasks dropped, no
//! write after).

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::sql::{Durable, SqliteStore, Start};
use event_bus::{DomainEvent, HandlerError, ListenerOptions, Meta, RetryPolicy, listener};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, DomainEvent, Serialize, Deserialize)]
enum Shop {
    OrderPaid { order: u64 },
    OrderShipped { order: u64 },
}

/// A call: (order, attempt, position).
type Call = (u64, u32, u64);

/// Records every call; orders in `block` never finish (until the process
/// dies), orders in `fail` always fail. With `store`, each call checks,
/// while it runs, that the checkpoint is below its own position.
#[derive(Clone, Default)]
struct Probe {
    calls: Arc<Mutex<Vec<Call>>>,
    block: Arc<HashSet<u64>>,
    fail: Arc<HashSet<u64>>,
    store: Option<SqliteStore<Shop>>,
    /// (position, checkpoint) seen by a call that found the checkpoint at
    /// or past its own position.
    passed: Arc<Mutex<Vec<(u64, u64)>>>,
    slow_odd: bool,
    /// Orders that fail their first attempt.
    fail_once: Arc<HashSet<u64>>,
    /// Orders whose second attempt never finishes.
    block_second: Arc<HashSet<u64>>,
    /// Orders that wait for a permit of this gate (each call takes one).
    gate: Option<(u64, Arc<tokio::sync::Semaphore>)>,
}

impl Probe {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    fn orders(&self) -> Vec<u64> {
        self.calls().into_iter().map(|c| c.0).collect()
    }
    async fn call(&self, order: u64, meta: &Meta) -> Result<(), HandlerError> {
        self.calls
            .lock()
            .unwrap()
            .push((order, meta.attempt(), meta.sequence()));
        if let Some(store) = &self.store {
            for p in store.progress().await.unwrap() {
                if p.listener == "Probe" && p.checkpoint >= meta.sequence() {
                    self.passed
                        .lock()
                        .unwrap()
                        .push((meta.sequence(), p.checkpoint));
                }
            }
        }
        if self.slow_odd && order % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(order % 7 * 3)).await;
        }
        if let Some((gated, gate)) = &self.gate {
            if *gated == order {
                gate.acquire().await.unwrap().forget();
            }
        }
        if meta.attempt() == 1 && self.fail_once.contains(&order) {
            return Err(format!("order {order} failed once").into());
        }
        if meta.attempt() == 2 && self.block_second.contains(&order) {
            std::future::pending::<()>().await;
        }
        if self.block.contains(&order) {
            std::future::pending::<()>().await;
        }
        if self.fail.contains(&order) {
            return Err(format!("order {order} failed").into());
        }
        Ok(())
    }
}

#[listener(name = "Probe")]
impl ShopHandler for Probe {
    async fn on_order_paid(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.call(*order, &meta).await
    }
}

/// Only the shipped orders.
#[derive(Clone, Default)]
struct Shipper(Probe);

#[listener(name = "Shipper")]
impl ShopHandler for Shipper {
    async fn on_order_shipped(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.0.call(*order, &meta).await
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

/// Waits, up to the deadline, until `cond` holds (looking every 5 ms).
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    within(what, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

fn no_retry() -> RetryPolicy {
    RetryPolicy::exponential(1).jitter(false)
}

/// A process of its own: a runtime with a store on `path` and `probe`
/// spawned on it; `kill` shuts the runtime down with nothing written after.
struct Process {
    rt: Option<tokio::runtime::Runtime>,
    _store: SqliteStore<Shop>,
}

impl Process {
    async fn start<F, Fut>(path: &std::path::Path, spawn: F) -> Self
    where
        F: FnOnce(SqliteStore<Shop>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let path = path.to_owned();
        let store = rt
            .spawn(async move {
                let store = store_at(&path).await;
                spawn(store.clone()).await;
                store
            })
            .await
            .unwrap();
        Self {
            rt: Some(rt),
            _store: store,
        }
    }
    fn kill(mut self) {
        self.rt.take().unwrap().shutdown_background();
    }
}

fn short(prefetch: usize) -> Durable {
    Durable::new()
        .start(Start::Beginning)
        .lease(Duration::from_millis(150))
        .poll_interval(Duration::from_millis(20))
        .prefetch(prefetch)
}

/// `Store::discard`: "the listener will not be handed it again". Process A
/// (concurrency 2, one claim of orders 1..=6) blocks on order 1, so its
/// claim's `done_to` stays at 0, and order 3 fails for good (dead). The
/// dead delivery is discarded, then A dies; B takes A's claim over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarded_delivery_is_not_handed_again_after_a_take_over() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let main = store_at(&path).await;
    commit(&main, 1..=6).await;
    let a = Probe {
        block: Arc::new(HashSet::from([1])),
        fail: Arc::new(HashSet::from([3])),
        ..Probe::default()
    };
    let a2 = a.clone();
    let process = Process::start(&path, move |store| async move {
        store
            .spawn_with(
                a2,
                ListenerOptions::new().concurrency(2).retry(no_retry()),
                short(16),
            )
            .await
            .unwrap();
    })
    .await;
    until("order 3 dead in A", async || {
        main.dead_letters(Some("Probe")).await.unwrap().len() == 1 && a.orders().len() == 6
    })
    .await;
    assert_eq!(main.discard("Probe", Some(3)).await.unwrap(), 1);
    process.kill();
    let b = Probe {
        fail: Arc::new(HashSet::from([3])),
        ..Probe::default()
    };
    main.spawn_with(
        b.clone(),
        ListenerOptions::new().concurrency(2).retry(no_retry()),
        short(16),
    )
    .await
    .unwrap();
    within("idle", main.idle()).await.unwrap();
    let dead = main.dead_letters(Some("Probe")).await.unwrap();
    main.shutdown(Duration::from_secs(5)).await;
    println!("A: {:?}\nB: {:?}", a.calls(), b.calls());
    assert!(
        !b.orders().contains(&3),
        "the discarded order 3 was handed to B again: B's calls {:?}, dead again: {:?}",
        b.calls(),
        dead.iter()
            .map(|d| (d.position, d.attempts))
            .collect::<Vec<_>>()
    );
}

/// "Checkpoints move past the lowest unfinished position only". Every
/// call reads the checkpoint while it runs: it must be below the call's
/// own position. Concurrency 4, slow odd orders (finishing out of order),
/// every tenth order failing once... here: failing for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_stays_below_every_running_handler() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let store = store_at(&path).await;
    commit(&store, 1..=150).await;
    let probe = Probe {
        store: Some(store.clone()),
        slow_odd: true,
        fail: Arc::new((1..=150).filter(|o| o % 10 == 0).collect()),
        ..Probe::default()
    };
    store
        .spawn_with(
            probe.clone(),
            ListenerOptions::new().concurrency(4).retry(
                RetryPolicy::exponential(2)
                    .initial_backoff(Duration::from_millis(5))
                    .jitter(false),
            ),
            Durable::new().start(Start::Beginning).prefetch(8),
        )
        .await
        .unwrap();
    within("idle", store.idle()).await.unwrap();
    let progress = store.progress().await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    let passed = probe.passed.lock().unwrap().clone();
    assert!(
        passed.is_empty(),
        "checkpoint at or past a running handler: {passed:?}"
    );
    let p = progress.iter().find(|p| p.listener == "Probe").unwrap();
    assert_eq!((p.checkpoint, p.unfinished, p.dead), (150, 0, 15), "{p:?}");
}

/// Two processes of one group, A with a large prefetch and B with a small
/// one (so that taking A's claims over splits them). A dies with orders in
/// hand; B must handle every order A did not, those of A's claims as the
/// second attempt, and end with the checkpoint at the log's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_process_s_claims_are_taken_over_split_and_all_handled() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let main = store_at(&path).await;
    commit(&main, 1..=200).await;
    let a = Probe {
        block: Arc::new(HashSet::from([5])),
        slow_odd: true,
        ..Probe::default()
    };
    let a2 = a.clone();
    let process = Process::start(&path, move |store| async move {
        store
            .spawn_with(a2, ListenerOptions::new().concurrency(3), short(100))
            .await
            .unwrap();
    })
    .await;
    until("A holds order 5 and has handled some", async || {
        let orders = a.orders();
        orders.contains(&5) && orders.len() >= 20
    })
    .await;
    process.kill();
    let a_calls = a.calls();
    let b = Probe::default();
    main.spawn_with(b.clone(), ListenerOptions::new().concurrency(2), short(7))
        .await
        .unwrap();
    within("idle", main.idle()).await.unwrap();
    let progress = main.progress().await.unwrap();
    main.shutdown(Duration::from_secs(5)).await;
    let b_calls = b.calls();
    let mut per_order: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (o, at, _) in a_calls.iter().chain(b_calls.iter()) {
        per_order.entry(*o).or_default().push(*at);
    }
    let missing: Vec<u64> = (1..=200).filter(|o| !per_order.contains_key(o)).collect();
    assert!(missing.is_empty(), "never handled: {missing:?}");
    assert!(
        b.orders().contains(&5),
        "order 5, in A's hands when it died, was not handed to B"
    );
    let a_orders: HashSet<u64> = a_calls.iter().map(|c| c.0).collect();
    let wrong: Vec<Call> = b_calls
        .iter()
        .filter(|(o, at, _)| a_orders.contains(o) && *at != 2)
        .copied()
        .collect();
    assert!(
        wrong.is_empty(),
        "orders A was handed came to B not as attempt 2: {wrong:?}"
    );
    let p = progress.iter().find(|p| p.listener == "Probe").unwrap();
    assert_eq!((p.checkpoint, p.unfinished), (200, 0), "{p:?}");
}

/// "A retry made in place ... a process that dies during it hands the next
/// process that same attempt again." A fails order 2's first attempt (a
/// delay of 50 ms) and dies in its second, with order 1 blocking (so the
/// claim stays); B must get order 2 as attempt 2, and order 1 as attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_dying_in_a_retry_in_place_hands_that_attempt_again() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let main = store_at(&path).await;
    commit(&main, 1..=3).await;
    let a = Probe {
        block: Arc::new(HashSet::from([1])),
        fail_once: Arc::new(HashSet::from([2])),
        block_second: Arc::new(HashSet::from([2])),
        ..Probe::default()
    };
    let a2 = a.clone();
    let retry = RetryPolicy::exponential(5)
        .initial_backoff(Duration::from_millis(50))
        .jitter(false);
    let retry2 = retry;
    let process = Process::start(&path, move |store| async move {
        store
            .spawn_with(
                a2,
                ListenerOptions::new().concurrency(2).retry(retry2),
                short(16),
            )
            .await
            .unwrap();
    })
    .await;
    until("A in order 2's second attempt", async || {
        a.calls().contains(&(2, 2, 2))
    })
    .await;
    process.kill();
    let b = Probe::default();
    main.spawn_with(
        b.clone(),
        ListenerOptions::new().concurrency(2).retry(retry),
        short(16),
    )
    .await
    .unwrap();
    within("idle", main.idle()).await.unwrap();
    main.shutdown(Duration::from_secs(5)).await;
    let mut b_calls = b.calls();
    b_calls.sort_unstable();
    println!("A: {:?}\nB: {b_calls:?}", a.calls());
    let first: Vec<(u64, u32)> = b_calls.iter().map(|c| (c.0, c.1)).collect();
    assert!(
        first.contains(&(1, 2)),
        "order 1 not as attempt 2: {b_calls:?}"
    );
    assert!(
        first.contains(&(2, 2)),
        "order 2 not as attempt 2 again: {b_calls:?}"
    );
    assert!(
        !first.contains(&(2, 3)),
        "order 2's in-place attempt counted twice: {b_calls:?}"
    );
}

/// A listener of one kind whose claims span events of the other: A dies
/// holding shipped orders; B (small prefetch: splits) handles every
/// shipped order and none paid, the checkpoint ends at the log's end and
/// nothing is unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_filtered_listener_s_claims_are_taken_over_across_other_kinds() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let main = store_at(&path).await;
    {
        let tx = main.begin().await.unwrap();
        for o in 1..=120u64 {
            if o % 3 == 0 {
                tx.emit_order_shipped(o);
            } else {
                tx.emit_order_paid(o);
            }
        }
        tx.commit().await.unwrap();
    }
    let a = Shipper(Probe {
        block: Arc::new(HashSet::from([9])),
        ..Probe::default()
    });
    let a2 = a.clone();
    let process = Process::start(&path, move |store| async move {
        store
            .spawn_with(a2, ListenerOptions::new().concurrency(2), short(30))
            .await
            .unwrap();
    })
    .await;
    until("A holds order 9", async || a.0.orders().contains(&9)).await;
    process.kill();
    let b = Shipper::default();
    main.spawn_with(b.clone(), ListenerOptions::new().concurrency(2), short(3))
        .await
        .unwrap();
    within("idle", main.idle()).await.unwrap();
    let progress = main.progress().await.unwrap();
    main.shutdown(Duration::from_secs(5)).await;
    let handled: HashSet<u64> = a.0.orders().into_iter().chain(b.0.orders()).collect();
    let expected: HashSet<u64> = (1..=120).filter(|o| o % 3 == 0).collect();
    assert_eq!(handled, expected, "A {:?} B {:?}", a.0.calls(), b.0.calls());
    let p = progress.iter().find(|p| p.listener == "Shipper").unwrap();
    assert_eq!((p.checkpoint, p.unfinished, p.lag), (120, 0, 0), "{p:?}");
}

/// Schema version 1 (`git show 9e573d6:event-bus/src/sql/schema.rs`) with
/// a listener whose process died: orders 1..=4 leased (lease expired),
/// order 5 pending, head 5, checkpoint 0; order 6 after the head. The
/// upgraded store hands 1..=4 as attempt 2, 5 as attempt 2 (its row says
/// one attempt was handed out), 6 as attempt 1, and ends at version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_with_leased_and_pending_rows_is_upgraded() {
    const V1: &str = "
CREATE TABLE IF NOT EXISTS event_bus_schema (version INTEGER NOT NULL);
INSERT INTO event_bus_schema (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM event_bus_schema);
CREATE TABLE IF NOT EXISTS event_bus_events (
    position    INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    recorded_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS event_bus_listeners (
    listener   TEXT    PRIMARY KEY,
    head       INTEGER NOT NULL,
    checkpoint INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS event_bus_deliveries (
    listener    TEXT    NOT NULL,
    position    INTEGER NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('pending', 'leased', 'dead')),
    attempts    INTEGER NOT NULL,
    owner       TEXT,
    lease_until INTEGER NOT NULL,
    next_try_at INTEGER NOT NULL,
    last_error  TEXT,
    failed_at   INTEGER,
    PRIMARY KEY (listener, position)
);
CREATE INDEX IF NOT EXISTS event_bus_deliveries_position ON event_bus_deliveries (position);
CREATE TABLE IF NOT EXISTS event_bus_handled (
    listener   TEXT    NOT NULL,
    event_id   TEXT    NOT NULL,
    handled_at INTEGER NOT NULL,
    PRIMARY KEY (listener, event_id)
);";
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    // The payloads as the store writes them: from a v2 store on another file.
    let donor = store_at(&dir.path().join("donor.db")).await;
    commit(&donor, 1..=6).await;
    let rows: Vec<(i64, String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT position, id, name, payload FROM event_bus_events ORDER BY position",
    )
    .fetch_all(donor.pool())
    .await
    .unwrap();
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options_for(&path))
        .await
        .unwrap();
    sqlx::raw_sql(V1).execute(&pool).await.unwrap();
    for (position, id, name, payload) in rows {
        sqlx::query("INSERT INTO event_bus_events VALUES ($1, $2, $3, $4, 0)")
            .bind(position)
            .bind(id)
            .bind(name)
            .bind(payload)
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::raw_sql(
        "INSERT INTO event_bus_listeners VALUES ('Probe', 5, 0);
         INSERT INTO event_bus_deliveries VALUES ('Probe', 1, 'leased', 1, 'dead0000:1', 1, 0, NULL, NULL);
         INSERT INTO event_bus_deliveries VALUES ('Probe', 2, 'leased', 1, 'dead0000:1', 1, 0, NULL, NULL);
         INSERT INTO event_bus_deliveries VALUES ('Probe', 3, 'leased', 1, 'dead0000:1', 1, 0, NULL, NULL);
         INSERT INTO event_bus_deliveries VALUES ('Probe', 4, 'leased', 1, 'dead0000:1', 1, 0, NULL, NULL);
         INSERT INTO event_bus_deliveries VALUES ('Probe', 5, 'pending', 1, NULL, 0, 0, NULL, NULL);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let store = SqliteStore::<Shop>::new(pool).await.unwrap();
    let version: i64 = sqlx::query_scalar("SELECT version FROM event_bus_schema")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(version, 2);
    let probe = Probe::default();
    store
        .spawn_with(probe.clone(), ListenerOptions::new(), short(16))
        .await
        .unwrap();
    within("idle", store.idle()).await.unwrap();
    let progress = store.progress().await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    let mut calls: Vec<(u64, u32)> = probe.calls().into_iter().map(|c| (c.0, c.1)).collect();
    calls.sort_unstable();
    assert_eq!(calls, vec![(1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (6, 1)]);
    let p = progress.iter().find(|p| p.listener == "Probe").unwrap();
    assert_eq!((p.checkpoint, p.unfinished), (6, 0), "{p:?}");
}

/// `Store::idle`: "nothing is in progress". Sampled against the handler:
/// while a handler runs, `idle()` must not return. Order 1 blocks until
/// released; `idle()` is polled with a short timeout several times while it
/// blocks, each must time out; after the release it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_waits_for_a_retry_in_place_and_for_a_slow_handler() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let store = store_at(&path).await;
    commit(&store, 1..=40).await;
    let probe = Probe {
        block: Arc::new(HashSet::from([40])),
        fail_once: Arc::new((1..=39).filter(|o| o % 4 == 0).collect()),
        slow_odd: true,
        ..Probe::default()
    };
    let listener = store
        .spawn_with(
            probe.clone(),
            ListenerOptions::new().concurrency(3).retry(
                RetryPolicy::exponential(3)
                    .initial_backoff(Duration::from_millis(30))
                    .jitter(false),
            ),
            Durable::new().start(Start::Beginning).prefetch(6),
        )
        .await
        .unwrap();
    until("order 40 running", async || probe.orders().contains(&40)).await;
    // Order 40 never finishes: idle must not return.
    let early = tokio::time::timeout(Duration::from_millis(300), store.idle()).await;
    assert!(
        early.is_err(),
        "idle returned while order 40 was in its handler"
    );
    listener.abort();
    listener.finished().await;
    let progress = store.progress().await.unwrap();
    let p = progress.iter().find(|p| p.listener == "Probe").unwrap();
    assert_eq!(p.checkpoint, 39, "{p:?}; calls {:?}", probe.calls());
    store.shutdown(Duration::from_secs(5)).await;
}

/// `Store::shutdown`: "what it still held is given back, to be handled
/// again". Concurrency 2, both slots blocked (orders 1 and 2), the rest
/// prefetched or still in the log; a shutdown of 200 ms. The next run hands
/// every order not handled, 1 and 2 as attempt 2, the others as attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_with_both_slots_blocked_gives_everything_back() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let first = store_at(&path).await;
    commit(&first, 1..=40).await;
    let a = Probe {
        block: Arc::new(HashSet::from([1, 2])),
        ..Probe::default()
    };
    first
        .spawn_with(a.clone(), ListenerOptions::new().concurrency(2), short(10))
        .await
        .unwrap();
    until("orders 1 and 2 running", async || a.orders().len() == 2).await;
    let reports = first.shutdown(Duration::from_millis(200)).await;
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT position, state, attempts FROM event_bus_deliveries ORDER BY position",
    )
    .fetch_all(first.pool())
    .await
    .unwrap();
    let claims: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT done_to, up_to, unfinished FROM event_bus_claims")
            .fetch_all(first.pool())
            .await
            .unwrap();
    let after_first = first.progress().await.unwrap();
    println!("after the first run: {after_first:?}\nrows {rows:?}\nclaims {claims:?}\n{reports:?}");
    drop(first);
    let second = store_at(&path).await;
    let b = Probe::default();
    second
        .spawn_with(b.clone(), ListenerOptions::new().concurrency(2), short(10))
        .await
        .unwrap();
    within("idle", second.idle()).await.unwrap();
    second.shutdown(Duration::from_secs(5)).await;
    let mut calls: Vec<(u64, u32)> = b.calls().into_iter().map(|c| (c.0, c.1)).collect();
    calls.sort_unstable();
    let expected: Vec<(u64, u32)> = (1..=40).map(|o| (o, if o <= 2 { 2 } else { 1 })).collect();
    assert_eq!(calls, expected, "first run: {:?}", a.calls());
}

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

struct PgDb(String);

impl PgDb {
    async fn new(name: &str) -> Self {
        use sqlx::Executor;
        let admin = sqlx::PgPool::connect(&format!("{SERVER}/postgres"))
            .await
            .unwrap();
        admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await
            .unwrap();
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        Self(name.to_string())
    }
    async fn store(&self) -> event_bus::sql::PgStore<Shop> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(20)
            .connect(&format!("{SERVER}/{}", self.0))
            .await
            .unwrap();
        event_bus::sql::PgStore::new(pool).await.unwrap()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    use sqlx::Executor;
                    let admin = sqlx::PgPool::connect(&format!("{SERVER}/postgres"))
                        .await
                        .unwrap();
                    let _ = admin
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                })
        })
        .join();
    }
}

#[derive(Clone, Default)]
struct PgClerk(Arc<Mutex<Vec<u64>>>);

#[listener(name = "PgClerk")]
impl ShopHandler for PgClerk {
    async fn on_order_paid(&self, order: &u64) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(*order);
        Ok(())
    }
}

/// "Order: ... in log order (commit order)", with the single-statement
/// insert (advisory lock + insert + NOTIFY in one CTE): 16 tasks commit
/// 40 transactions each (1 to 3 events) while a listener polls every
/// millisecond with a small prefetch. Every order must be handed (a
/// position committed behind one already read would be skipped), in
/// position order (concurrency 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL"]
async fn postgres_positions_commit_in_order_under_concurrent_outboxes() {
    let db = PgDb::new("review2_positions").await;
    let store = db.store().await;
    let clerk = PgClerk::default();
    store
        .spawn_with(
            clerk.clone(),
            ListenerOptions::new(),
            Durable::new()
                .start(Start::Beginning)
                .poll_interval(Duration::from_millis(1))
                .prefetch(4),
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for i in 0..40u64 {
                let tx = store.begin().await.unwrap();
                for k in 0..=(i % 3) {
                    tx.emit_order_paid(t * 1_000_000 + i * 10 + k);
                }
                positions.extend(tx.commit().await.unwrap());
                tokio::task::yield_now().await;
            }
            positions
        }));
    }
    let mut committed = 0;
    for task in tasks {
        committed += task.await.unwrap().len();
    }
    within("idle", store.idle()).await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    let handled = clerk.0.lock().unwrap().clone();
    let unique: HashSet<u64> = handled.iter().copied().collect();
    assert_eq!(
        unique.len(),
        committed,
        "handled {} of {committed}",
        unique.len()
    );
    // Each task's orders in its own order.
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for o in &handled {
        let t = o / 1_000_000;
        if let Some(prev) = last.insert(t, *o) {
            assert!(prev < *o, "task {t}: {o} after {prev}");
        }
    }
}

/// At least once across a take-over: A (prefetch 10, concurrency 2) holds
/// one claim of orders 1..=10 of 40, both slots blocked, and dies; B
/// (prefetch 10) takes the claim over whole, filling its room. Every order
/// must come to B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_that_fills_the_room_does_not_skip_the_rest_of_the_log() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let main = store_at(&path).await;
    commit(&main, 1..=40).await;
    let a = Probe {
        block: Arc::new(HashSet::from([1, 2])),
        ..Probe::default()
    };
    let a2 = a.clone();
    let process = Process::start(&path, move |store| async move {
        store
            .spawn_with(a2, ListenerOptions::new().concurrency(2), short(10))
            .await
            .unwrap();
    })
    .await;
    until("orders 1 and 2 running in A", async || {
        a.orders().len() == 2
    })
    .await;
    process.kill();
    until("A's lease expired", async || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let live: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM event_bus_claims WHERE lease_until > $1")
                .bind(now)
                .fetch_one(main.pool())
                .await
                .unwrap();
        live == 0
    })
    .await;
    let b = Probe::default();
    main.spawn_with(b.clone(), ListenerOptions::new().concurrency(2), short(10))
        .await
        .unwrap();
    within("idle", main.idle()).await.unwrap();
    let progress = main.progress().await.unwrap();
    main.shutdown(Duration::from_secs(5)).await;
    let handled: HashSet<u64> = b.orders().into_iter().collect();
    let missing: Vec<u64> = (1..=40).filter(|o| !handled.contains(o)).collect();
    assert!(
        missing.is_empty(),
        "never handled: {missing:?}; {progress:?}"
    );
}

/// `Store::replay` while a handler runs: "what it held in progress is
/// forgotten (a finish for it is ignored)"; "it reads the log again from
/// there". Order 3 is held at a gate (concurrency 2), the listener is
/// replayed from the beginning, then the gate opens: every order is handled
/// again after the replay, and the end is at the log's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_during_in_flight_work_reads_everything_again() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let store = store_at(&path).await;
    commit(&store, 1..=30).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let probe = Probe {
        gate: Some((3, gate.clone())),
        ..Probe::default()
    };
    store
        .spawn_with(
            probe.clone(),
            ListenerOptions::new().concurrency(2),
            Durable::new().start(Start::Beginning).prefetch(8),
        )
        .await
        .unwrap();
    until("all but order 3 handled once", async || {
        let orders: HashSet<u64> = probe.orders().into_iter().collect();
        orders.len() == 30
    })
    .await;
    let before = probe.calls().len();
    store.replay("Probe", Start::Beginning).await.unwrap();
    gate.add_permits(1000);
    within("idle", store.idle()).await.unwrap();
    let progress = store.progress().await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    let again: HashSet<u64> = probe.calls()[before..].iter().map(|c| c.0).collect();
    let missing: Vec<u64> = (1..=30).filter(|o| !again.contains(o)).collect();
    assert!(
        missing.is_empty(),
        "not read again after the replay: {missing:?}"
    );
    let p = progress.iter().find(|p| p.listener == "Probe").unwrap();
    assert_eq!((p.checkpoint, p.unfinished), (30, 0), "{p:?}");
}

/// `Store::redrive` of a dead delivery inside a claim still held (order 1
/// at a gate): "handed to the listener again, as a first attempt". Orders
/// 4 and 5 fail every first attempt (no retries): redriven, each comes
/// once more as attempt 1 (and is dead again), and the checkpoint then
/// reaches the log's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_inside_a_held_claim_comes_once_as_a_first_attempt() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let store = store_at(&path).await;
    commit(&store, 1..=8).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let probe = Probe {
        gate: Some((1, gate.clone())),
        fail_once: Arc::new(HashSet::from([4, 5])),
        ..Probe::default()
    };
    store
        .spawn_with(
            probe.clone(),
            ListenerOptions::new().concurrency(2).retry(no_retry()),
            Durable::new()
                .start(Start::Beginning)
                .prefetch(16)
                .poll_interval(Duration::from_millis(20)),
        )
        .await
        .unwrap();
    until("4 and 5 dead", async || {
        store.dead_letters(None).await.unwrap().len() == 2
    })
    .await;
    assert_eq!(store.redrive("Probe", None).await.unwrap(), 2);
    until("4 and 5 handed again", async || probe.calls().len() == 10).await;
    gate.add_permits(1);
    within("idle", store.idle()).await.unwrap();
    let progress = store.progress().await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    let calls: Vec<(u64, u32)> = probe.calls().into_iter().map(|c| (c.0, c.1)).collect();
    let redriven: Vec<(u64, u32)> = calls
        .iter()
        .filter(|c| c.0 == 4 || c.0 == 5)
        .copied()
        .collect();
    assert_eq!(redriven.len(), 4, "{calls:?}");
    assert!(redriven.iter().all(|c| c.1 == 1), "{calls:?}");
    let p = progress.iter().find(|p| p.listener == "Probe").unwrap();
    assert_eq!((p.checkpoint, p.unfinished, p.dead), (8, 0, 2), "{p:?}");
}

/// A retry in place, then `abort()`: "what it held is given back (its
/// attempts counted)". Order 2 fails its first attempt (a 150 ms delay);
/// aborted during the delay, a new spawn in the same process hands it as
/// attempt 2, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_in_place_then_abort_comes_back_as_its_attempt() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let store = store_at(&path).await;
    commit(&store, 1..=4).await;
    let retry = RetryPolicy::exponential(3)
        .initial_backoff(Duration::from_millis(150))
        .jitter(false);
    let first = Probe {
        fail_once: Arc::new(HashSet::from([2])),
        ..Probe::default()
    };
    let running = store
        .spawn_with(
            first.clone(),
            ListenerOptions::new().retry(retry),
            short(16),
        )
        .await
        .unwrap();
    until("order 2 failed once", async || {
        first.calls().contains(&(2, 1, 2))
    })
    .await;
    running.abort();
    running.finished().await;
    let second = Probe::default();
    store
        .spawn_with(
            second.clone(),
            ListenerOptions::new().retry(retry),
            short(16),
        )
        .await
        .unwrap();
    within("idle", store.idle()).await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    let all: Vec<(u64, u32)> = first
        .calls()
        .into_iter()
        .chain(second.calls())
        .map(|c| (c.0, c.1))
        .collect();
    let twos: Vec<(u64, u32)> = all.iter().filter(|c| c.0 == 2).copied().collect();
    assert_eq!(twos, vec![(2, 1), (2, 2)], "all calls: {all:?}");
}

/// Two live processes of one group (concurrency 3 each, prefetch 8, a
/// lease of 300 ms), events committed while they run: "each handled by one
/// of them" — every order once, as attempt 1 (no lease lapses while both
/// live), and the checkpoint at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_processes_share_a_group_once_each() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let one = store_at(&path).await;
    let two = store_at(&path).await;
    let durable = Durable::new()
        .start(Start::Beginning)
        .lease(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(5))
        .prefetch(8);
    let a = Probe {
        slow_odd: true,
        ..Probe::default()
    };
    let b = Probe {
        slow_odd: true,
        ..Probe::default()
    };
    one.spawn_with(
        a.clone(),
        ListenerOptions::new().concurrency(3),
        durable.clone(),
    )
    .await
    .unwrap();
    two.spawn_with(b.clone(), ListenerOptions::new().concurrency(3), durable)
        .await
        .unwrap();
    for batch in 0..30u64 {
        let store = if batch % 2 == 0 { &one } else { &two };
        commit(store, (batch * 10 + 1)..=(batch * 10 + 10)).await;
    }
    within("idle one", one.idle()).await.unwrap();
    within("idle two", two.idle()).await.unwrap();
    let progress = one.progress().await.unwrap();
    one.shutdown(Duration::from_secs(5)).await;
    two.shutdown(Duration::from_secs(5)).await;
    let mut per: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (o, at, _) in a.calls().into_iter().chain(b.calls()) {
        per.entry(o).or_default().push(at);
    }
    let wrong: Vec<(u64, Vec<u32>)> = (1..=300)
        .filter_map(|o| {
            let got = per.get(&o).cloned().unwrap_or_default();
            (got != vec![1]).then_some((o, got))
        })
        .collect();
    assert!(wrong.is_empty(), "not once as attempt 1: {wrong:?}");
    let p = progress.iter().find(|p| p.listener == "Probe").unwrap();
    assert_eq!((p.checkpoint, p.unfinished), (300, 0), "{p:?}");
}

/// The take-over on PostgreSQL: as
/// `a_take_over_that_fills_the_room_does_not_skip_the_rest_of_the_log`,
/// with B's room larger than A's claim (so that the page after the head is
/// read in the same step): every order handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL"]
async fn postgres_a_dead_process_s_claim_is_taken_over() {
    let db = PgDb::new("review2_take_over").await;
    let main = db.store().await;
    {
        let tx = main.begin().await.unwrap();
        for o in 1..=40u64 {
            tx.emit_order_paid(o);
        }
        tx.commit().await.unwrap();
    }
    let a = Probe {
        block: Arc::new(HashSet::from([1, 2])),
        ..Probe::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = format!("{SERVER}/{}", db.0);
    let a2 = a.clone();
    rt.spawn(async move {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let store = event_bus::sql::PgStore::<Shop>::new(pool).await.unwrap();
        store
            .spawn_with(a2, ListenerOptions::new().concurrency(2), short(10))
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
    until("orders 1 and 2 running in A", async || {
        a.orders().len() == 2
    })
    .await;
    rt.shutdown_background();
    let b = Probe::default();
    main.spawn_with(b.clone(), ListenerOptions::new().concurrency(2), short(32))
        .await
        .unwrap();
    within("idle", main.idle()).await.unwrap();
    let progress = main.progress().await.unwrap();
    main.shutdown(Duration::from_secs(5)).await;
    let calls = b.calls();
    let handled: HashSet<u64> = calls.iter().map(|c| c.0).collect();
    let missing: Vec<u64> = (1..=40).filter(|o| !handled.contains(o)).collect();
    assert!(
        missing.is_empty(),
        "never handled: {missing:?}; {progress:?}"
    );
    let wrong: Vec<Call> = calls
        .iter()
        .filter(|c| c.0 <= 10 && c.1 != 2)
        .copied()
        .collect();
    assert!(wrong.is_empty(), "A's claim not as attempt 2: {wrong:?}");
}

/// The same skip in one live process, no crash: prefetch 1, order 1 dead,
/// order 2 held at a gate while orders 3..=10 are committed behind it (the
/// head at 3); order 1 is redriven, then the gate opens. The claim that
/// takes the redriven row fills the room: every order must still come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_taken_with_a_room_of_one_does_not_skip_the_log() {
    let dir = tmpdir();
    let path = dir.path().join("shop.db");
    let store = store_at(&path).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let probe = Probe {
        gate: Some((2, gate.clone())),
        fail: Arc::new(HashSet::from([1])),
        ..Probe::default()
    };
    store
        .spawn_with(
            probe.clone(),
            ListenerOptions::new().retry(no_retry()),
            Durable::new()
                .start(Start::Beginning)
                .prefetch(1)
                .poll_interval(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    commit(&store, 1..=2).await;
    until("order 1 dead, order 2 at the gate", async || {
        probe.orders().contains(&2) && store.dead_letters(None).await.unwrap().len() == 1
    })
    .await;
    commit(&store, 3..=10).await;
    assert_eq!(store.redrive("Probe", Some(1)).await.unwrap(), 1);
    gate.add_permits(1);
    within("idle", store.idle()).await.unwrap();
    let progress = store.progress().await.unwrap();
    store.shutdown(Duration::from_secs(5)).await;
    let handled: HashSet<u64> = probe.orders().into_iter().collect();
    let missing: Vec<u64> = (1..=10).filter(|o| !handled.contains(o)).collect();
    assert!(
        missing.is_empty(),
        "never handled: {missing:?}; {progress:?}; calls {:?}",
        probe.calls()
    );
}
