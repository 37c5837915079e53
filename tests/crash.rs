//! The durable tier survives `kill -9` anywhere: each scenario runs the
//! emitter or the listener in a child process (this test binary, run again
//! as [`child`] with `EVENT_BUS_CRASH_ROLE` set), kills it with SIGKILL at a
//! chosen point it reports on its stdout, and checks what a restarted
//! listener (in this process) is handed.
//!
//! On SQLite in `cargo test` (a database file per scenario); on PostgreSQL
//! through the ignored `*_on_postgresql` tests that `.ci/run` runs. The
//! store is an `AnyStore`, so the child opens the same database from its
//! URL.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::sql::{AnyStore, Durable, Start, first_time};
use event_bus::{DomainEvent, HandlerError, ListenerOptions, Meta, RetryPolicy, listener};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;

const DEADLINE: Duration = Duration::from_secs(60);

/// Short, so that a restart takes a dead child's events soon.
const LEASE: Duration = Duration::from_millis(400);

/// The retry policy of the scenario whose attempts survive the restart.
fn three_attempts() -> RetryPolicy {
    RetryPolicy::exponential(3)
        .initial_backoff(Duration::from_millis(50))
        .jitter(false)
}

#[derive(Debug, Clone, PartialEq, DomainEvent, Serialize, Deserialize)]
enum Shop {
    OrderPaid { order: u64 },
}

async fn open(url: &str) -> AnyStore<Shop> {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .expect("open the database");
    if url.starts_with("sqlite") {
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&pool)
            .await
            .expect("WAL");
    }
    for table in [
        "CREATE TABLE IF NOT EXISTS effects (order_id BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS handled (event_id TEXT NOT NULL, process TEXT NOT NULL)",
    ] {
        sqlx::query(table).execute(&pool).await.expect("a table");
    }
    AnyStore::new(pool).await.expect("the store's tables")
}

async fn count(store: &AnyStore<Shop>, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .expect("a count")
}

// ---------------------------------------------------------------------------
// The child

/// What the child does, by `EVENT_BUS_CRASH_ROLE`; nothing when unset.
#[test]
fn child() {
    let Ok(role) = std::env::var("EVENT_BUS_CRASH_ROLE") else {
        return;
    };
    let url = std::env::var("EVENT_BUS_CRASH_URL").expect("EVENT_BUS_CRASH_URL");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = open(&url).await;
        match role.as_str() {
            "commit" => {
                let tx = store.begin().await.unwrap();
                for order in 0..100 {
                    tx.emit_order_paid(order);
                }
                tx.commit().await.unwrap();
                say("committed");
            }
            "handle" => {
                let options = ListenerOptions::new().retry(three_attempts());
                let durable = Durable::new().start(Start::Beginning).lease(LEASE);
                store
                    .spawn_with(
                        Crasher {
                            store: store.clone(),
                        },
                        options,
                        durable,
                    )
                    .await
                    .unwrap();
                say("listening");
            }
            "share" => {
                // Long: no process dies in this scenario, and a renewal
                // waits behind the other processes' writes on SQLite.
                let durable = Durable::new()
                    .start(Start::Beginning)
                    .lease(Duration::from_secs(20))
                    .poll_interval(Duration::from_millis(20))
                    .prefetch(16);
                let sharer = Sharer {
                    store: store.clone(),
                    process: std::process::id().to_string(),
                };
                store
                    .spawn_with(sharer, ListenerOptions::new().concurrency(4), durable)
                    .await
                    .unwrap();
                say("listening");
            }
            other => panic!("unknown role {other}"),
        }
        // Until killed.
        std::future::pending::<()>().await;
    });
}

fn say(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").unwrap();
    stdout.flush().unwrap();
}

/// The child's listener: order 1 holds the handler forever (a crash mid
/// handler), order 2 commits its effect and then holds (a crash after the
/// handler, before the ack), order 3 fails (a crash between retries).
struct Crasher {
    store: AnyStore<Shop>,
}

#[listener(name = "crash")]
impl ShopHandler for Crasher {
    async fn on_order_paid(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        match *order {
            1 => {
                say(&format!("entered 1 {}", meta.attempt()));
                std::future::pending().await
            }
            2 => {
                effect(&self.store, "crash", *order, &meta).await?;
                say("effected 2");
                std::future::pending().await
            }
            3 => {
                say(&format!("failed 3 {}", meta.attempt()));
                Err("order 3 is refused".into())
            }
            _ => Ok(()),
        }
    }
}

/// Writes the order's effect once per event, in one transaction with the
/// record that it was applied.
async fn effect(
    store: &AnyStore<Shop>,
    listener: &str,
    order: u64,
    meta: &Meta,
) -> Result<(), HandlerError> {
    let mut tx = store.pool().begin().await?;
    if first_time::<sqlx::Any>(&mut tx, listener, meta).await? {
        sqlx::query("INSERT INTO effects (order_id) VALUES ($1)")
            .bind(i64::try_from(order)?)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// One of the processes sharing a group: records every handling.
struct Sharer {
    store: AnyStore<Shop>,
    process: String,
}

#[listener(name = "sharers")]
impl ShopHandler for Sharer {
    async fn on_order_paid(&self, _order: &u64, meta: Meta) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO handled (event_id, process) VALUES ($1, $2)")
            .bind(meta.id().to_string())
            .bind(&self.process)
            .execute(self.store.pool())
            .await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The parent

/// A child process in `role` on the database at `url`; killed with
/// SIGKILL when dropped.
struct Process {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Process {
    fn start(role: &str, url: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child", "--nocapture", "--test-threads=1"])
            .env("EVENT_BUS_CRASH_ROLE", role)
            .env("EVENT_BUS_CRASH_URL", url)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the child");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    /// Reads the child's lines until one is `line`; panics if it ends first.
    /// (The read blocks: call it from `spawn_blocking`, or before the
    /// runtime has work of its own.)
    fn wait_for(&mut self, line: &str) {
        for read in self.lines.by_ref() {
            let read = read.expect("the child's stdout");
            // The test harness may have begun the line (`test child ... `).
            if read.ends_with(line) {
                return;
            }
        }
        panic!("the child ended before it said {line:?}");
    }

    /// SIGKILL, and waits until the process is gone.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the child");
        self.child.wait().expect("reap the child");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the restarted listener is handed: (order, attempt) per call.
#[derive(Clone, Default)]
struct Restarted {
    calls: Arc<Mutex<Vec<(u64, u32)>>>,
    store: Option<AnyStore<Shop>>,
}

#[listener(name = "crash")]
impl ShopHandler for Restarted {
    async fn on_order_paid(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push((*order, meta.attempt()));
        if let Some(store) = &self.store {
            effect(store, "crash", *order, &meta).await?;
        }
        if *order == 3 {
            return Err("order 3 is refused".into());
        }
        Ok(())
    }
}

async fn restart(store: &AnyStore<Shop>) -> Restarted {
    let restarted = Restarted {
        store: Some(store.clone()),
        ..Restarted::default()
    };
    let options = ListenerOptions::new().retry(three_attempts());
    let durable = Durable::new()
        .start(Start::Beginning)
        .lease(LEASE)
        .poll_interval(Duration::from_millis(20));
    store
        .spawn_with(restarted.clone(), options, durable)
        .await
        .unwrap();
    restarted
}

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {DEADLINE:?}"))
}

/// Waits until `sql` counts `expected` rows.
async fn until_count(store: &AnyStore<Shop>, what: &str, sql: &str, expected: i64) {
    within(what, async {
        while count(store, sql).await != expected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Waits until `restarted` has been handed `calls` calls and the store is
/// idle.
async fn until_calls(store: &AnyStore<Shop>, restarted: &Restarted, calls: usize) {
    within("the restarted listener's calls", async {
        while restarted.calls.lock().unwrap().len() < calls {
            store.idle().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        store.idle().await.unwrap();
    })
    .await;
}

/// A database for a scenario: a file in a temporary directory, or (with
/// `EVENT_BUS_CRASH_POSTGRES` unset and `postgres` asked for) a database
/// of its own on the local server, dropped after.
struct Database {
    url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<String>,
}

impl Database {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("crash.db").display()
        );
        Self {
            url,
            _dir: Some(dir),
            postgres: None,
        }
    }

    async fn postgres() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let server = std::env::var("EVENT_BUS_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!(
            "event_bus_crash_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
            .await
            .unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        Self {
            url: format!("{server}/{name}"),
            _dir: None,
            postgres: Some(server),
        }
    }

    async fn drop_now(self) {
        if let Some(server) = &self.postgres {
            let name = self.url.rsplit('/').next().unwrap();
            let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
                .await
                .unwrap();
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&admin)
                .await
                .unwrap();
        }
    }
}

/// Runs `step` (blocking on the child's stdout) off the runtime.
async fn blocking<T: Send + 'static>(step: impl FnOnce() -> T + Send + 'static) -> T {
    within("the child", tokio::task::spawn_blocking(step))
        .await
        .expect("the child's step")
}

async fn killed_after_commit_nothing_is_lost(database: Database) {
    let mut emitter = Process::start("commit", &database.url);
    let emitter = blocking(move || {
        emitter.wait_for("committed");
        emitter
    })
    .await;
    emitter.kill();
    let store = open(&database.url).await;
    let restarted = Restarted::default();
    store
        .spawn_with(
            restarted.clone(),
            ListenerOptions::new(),
            Durable::new().start(Start::Beginning),
        )
        .await
        .unwrap();
    until_calls(&store, &restarted, 100).await;
    let orders: Vec<u64> = restarted
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(orders, (0..100).collect::<Vec<_>>());
    store.shutdown(DEADLINE).await;
    database.drop_now().await;
}

/// Order 1 is in the handler when the child dies: the restart is handed it
/// with attempt 2, after the lease expired.
async fn killed_mid_handler_the_event_comes_again_with_attempt_two(database: Database) {
    let store = open(&database.url).await;
    let tx = store.begin().await.unwrap();
    tx.emit_order_paid(0);
    tx.emit_order_paid(1);
    tx.commit().await.unwrap();
    let mut handler = Process::start("handle", &database.url);
    let handler = blocking(move || {
        handler.wait_for("entered 1 1");
        handler
    })
    .await;
    // Order 0's ack written: only order 1 is left to come again.
    until_count(
        &store,
        "order 0's ack to be written",
        "SELECT CAST(COALESCE(SUM(unfinished), 0) AS BIGINT) FROM event_bus_claims",
        1,
    )
    .await;
    handler.kill();

    let restarted = restart(&store).await;
    until_calls(&store, &restarted, 1).await;
    assert_eq!(*restarted.calls.lock().unwrap(), [(1, 2)]);
    store.shutdown(DEADLINE).await;
    database.drop_now().await;
}

/// Order 2's effect committed, its ack not: it comes again, and the
/// idempotency record keeps the effect once.
async fn killed_after_the_handler_before_the_ack_the_effect_stays_once(database: Database) {
    let store = open(&database.url).await;
    let tx = store.begin().await.unwrap();
    tx.emit_order_paid(2);
    tx.commit().await.unwrap();
    let mut handler = Process::start("handle", &database.url);
    let handler = blocking(move || {
        handler.wait_for("effected 2");
        handler
    })
    .await;
    handler.kill();

    let restarted = restart(&store).await;
    until_calls(&store, &restarted, 1).await;
    assert_eq!(*restarted.calls.lock().unwrap(), [(2, 2)]);
    assert_eq!(count(&store, "SELECT COUNT(*) FROM effects").await, 1);
    store.shutdown(DEADLINE).await;
    database.drop_now().await;
}

/// Order 3 failed twice in the child, whose retries are rows: the restart
/// makes the third and last attempt, and the delivery is dead with all
/// three counted.
async fn attempts_survive_a_kill_and_the_last_one_is_dead(database: Database) {
    let store = open(&database.url).await;
    let tx = store.begin().await.unwrap();
    tx.emit_order_paid(3);
    tx.commit().await.unwrap();
    let mut handler = Process::start("handle", &database.url);
    let handler = blocking(move || {
        handler.wait_for("failed 3 2");
        handler
    })
    .await;
    // The second failure is recorded before the kill.
    until_count(
        &store,
        "the second failure to be recorded",
        "SELECT COUNT(*) FROM event_bus_deliveries WHERE attempts = 2 AND last_error IS NOT NULL",
        1,
    )
    .await;
    handler.kill();

    let restarted = Restarted::default();
    let options = ListenerOptions::new().retry(three_attempts());
    let durable = Durable::new()
        .lease(LEASE)
        .poll_interval(Duration::from_millis(20));
    store
        .spawn_with(restarted.clone(), options, durable)
        .await
        .unwrap();
    within("the dead delivery", async {
        while store.dead_letters(None).await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The restart makes the third attempt, the last.
    let calls = restarted.calls.lock().unwrap().clone();
    assert_eq!(calls, [(3, 3)], "{calls:?}");
    let dead = store.dead_letters(None).await.unwrap();
    assert_eq!((dead.len(), dead[0].attempts), (1, 3), "{dead:?}");
    assert!(dead[0].error.contains("refused"), "{dead:?}");
    store.shutdown(DEADLINE).await;
    database.drop_now().await;
}

/// Two processes of one group listener share 10,000 events, each handled
/// once (the handling is recorded without any idempotency: a second
/// handling would be a second row).
async fn two_processes_of_a_group_share_ten_thousand_events_once(database: Database) {
    const EVENTS: i64 = 10_000;
    let store = open(&database.url).await;
    let first = Process::start("share", &database.url);
    let second = Process::start("share", &database.url);
    let mut processes = Vec::new();
    for mut process in [first, second] {
        processes.push(
            blocking(move || {
                process.wait_for("listening");
                process
            })
            .await,
        );
    }
    for chunk in 0..EVENTS / 100 {
        let tx = store.begin().await.unwrap();
        for order in 0..100 {
            tx.emit_order_paid(u64::try_from(chunk * 100 + order).unwrap());
        }
        tx.commit().await.unwrap();
    }
    until_count(
        &store,
        "every event to be handled",
        "SELECT COUNT(DISTINCT event_id) FROM handled",
        EVENTS,
    )
    .await;
    // Idle: nothing left in flight, so no handling is still to come.
    within("the group to be idle", async {
        loop {
            let progress = store.progress().await.unwrap();
            if progress
                .iter()
                .any(|p| p.listener == "sharers" && p.lag == 0 && p.unfinished == 0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    for process in processes {
        process.kill();
    }
    assert_eq!(count(&store, "SELECT COUNT(*) FROM handled").await, EVENTS);
    let shares: Vec<(String, i64)> =
        sqlx::query_as("SELECT process, COUNT(*) FROM handled GROUP BY process ORDER BY process")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(shares.len(), 2, "both processes took part: {shares:?}");
    println!("the two processes handled {shares:?}");
    store.shutdown(DEADLINE).await;
    database.drop_now().await;
}

macro_rules! crash_scenarios {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Database::sqlite().await).await;
                }
            )*
        }

        mod postgresql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL on 127.0.0.1:5432 (run by .ci/run)"]
                async fn $name() {
                    super::$name(super::Database::postgres().await).await;
                }
            )*
        }
    };
}

crash_scenarios!(
    killed_after_commit_nothing_is_lost,
    killed_mid_handler_the_event_comes_again_with_attempt_two,
    killed_after_the_handler_before_the_ack_the_effect_stays_once,
    attempts_survive_a_kill_and_the_last_one_is_dead,
    two_processes_of_a_group_share_ten_thousand_events_once,
);
