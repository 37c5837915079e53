//! The durable tier against what it replaces, side by side in one run, as
//! ratios: `cargo bench --bench durable` (SQLite in a temporary file, and
//! PostgreSQL on 127.0.0.1:5432 when it answers, in a database made for
//! the run and dropped after).
//!
//! - **outbox**: a transaction that inserts one row and emits its event,
//!   against the same transaction without the event; alternating blocks,
//!   medians per transaction.
//! - **delivery**: 10,000 events committed in batches of 100, read by one
//!   durable listener (concurrency 1, a handler that does nothing) until it
//!   is idle, against a raw sqlx loop that reads the same rows in pages of
//!   100 (`FOR UPDATE SKIP LOCKED` on PostgreSQL) and stores a checkpoint
//!   per page. The listener's prefetch is 200: a claim waits for room for
//!   half of it, so it too reads 100 at a time.
//! - **latency**: from an outbox commit's call to the start of the
//!   handler, p50/p99 over 200 events committed one at a time: a listener
//!   of the committing store (woken in process), and one of another store
//!   on the same database (PostgreSQL: woken by `NOTIFY`; SQLite: its poll,
//!   every 50 ms).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_bus::sql::{AnyStore, Durable, Start};
use event_bus::{DomainEvent, HandlerError, ListenerOptions, listener};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};

#[derive(Debug, Clone, DomainEvent, Serialize, Deserialize)]
enum Bench {
    ItemAdded { id: i64, title: String },
}

const TRANSACTIONS: usize = 400;
const EVENTS: i64 = 10_000;
const LATENCY_SAMPLES: usize = 200;
/// Rounds of the delivery case, each the tier then the raw loop.
const ROUNDS: usize = 7;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let sqlite = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        );
        run("SQLite", &sqlite).await;
        let server = std::env::var("EVENT_BUS_BENCH_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        match sqlx::PgPool::connect(&format!("{server}/postgres")).await {
            Ok(admin) => {
                let name = format!("event_bus_bench_{}", std::process::id());
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&admin)
                    .await
                    .unwrap();
                run("PostgreSQL", &format!("{server}/{name}")).await;
                sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
                    .execute(&admin)
                    .await
                    .unwrap();
            }
            Err(error) => println!("PostgreSQL: skipped ({error})"),
        }
    });
}

async fn pool(url: &str) -> AnyPool {
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .unwrap();
    if url.starts_with("sqlite") {
        for pragma in ["PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL"] {
            sqlx::query(pragma).execute(&pool).await.unwrap();
        }
    }
    pool
}

async fn run(database: &str, url: &str) {
    let pool = pool(url).await;
    sqlx::query("CREATE TABLE items (id BIGINT PRIMARY KEY, title TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE raw_checkpoint (id INTEGER PRIMARY KEY, position BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let store = AnyStore::<Bench>::new(pool.clone()).await.unwrap();
    println!("{database}");
    outbox(&store).await;
    delivery(&store, url).await;
    latency(&store, url).await;
    store.shutdown(Duration::from_secs(5)).await;
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

async fn outbox(store: &AnyStore<Bench>) {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let mut id = 0_i64;
    for block in 0..TRANSACTIONS / 20 {
        for emit in [block % 2 == 0, block % 2 == 1] {
            for _ in 0..10 {
                id += 1;
                let started = Instant::now();
                let mut tx = store.begin().await.unwrap();
                sqlx::query("INSERT INTO items (id, title) VALUES ($1, $2)")
                    .bind(id)
                    .bind("a title of some length")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                if emit {
                    tx.emit_item_added(id, "a title of some length".to_owned());
                }
                tx.commit().await.unwrap();
                if emit { &mut with } else { &mut without }.push(started.elapsed());
            }
        }
    }
    let (with, without) = (median(with), median(without));
    println!(
        "  outbox: transaction with its event {with:?}, without {without:?}: {:.2}x the time",
        with.as_secs_f64() / without.as_secs_f64()
    );
}

/// A listener that does nothing, and counts.
struct Counter(Arc<Mutex<u64>>);

#[listener]
impl BenchHandler for Counter {
    async fn on_item_added(&self, _id: &i64, _title: &String) -> Result<(), HandlerError> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
}

async fn delivery(store: &AnyStore<Bench>, url: &str) {
    let first = first_position(store).await;
    for batch in 0..EVENTS / 100 {
        let tx = store.begin().await.unwrap();
        for i in 0..100 {
            tx.emit_item_added(batch * 100 + i, "a title of some length".to_owned());
        }
        tx.commit().await.unwrap();
    }
    let postgres = url.starts_with("postgres");
    let mut rates = (Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        // The tier.
        let counted = Arc::new(Mutex::new(0));
        let name = format!("counter-{round}");
        let started = Instant::now();
        store
            .spawn_with(
                Counter(counted.clone()),
                ListenerOptions::new(),
                // Claims of 100, as the raw loop reads.
                Durable::new()
                    .group(name.as_str())
                    .start(Start::After(first))
                    .prefetch(200),
            )
            .await
            .unwrap();
        store.idle().await.unwrap();
        let tier = started.elapsed();
        assert_eq!(*counted.lock().unwrap(), EVENTS as u64);

        // The raw loop.
        let started = Instant::now();
        let read = raw_loop(store.pool(), first, postgres).await;
        let raw = started.elapsed();
        assert_eq!(read, EVENTS);
        rates.0.push(EVENTS as f64 / tier.as_secs_f64());
        rates.1.push(EVENTS as f64 / raw.as_secs_f64());
        ratios.push(raw.as_secs_f64() / tier.as_secs_f64());
    }
    let median_of = |mut rates: Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (tier, raw) = (median_of(rates.0), median_of(rates.1));
    println!(
        "  delivery: durable listener {tier:.0} events/s, raw sqlx loop {raw:.0} events/s (medians); \
         median ratio of {ROUNDS} rounds: {:.2}x",
        median_of(ratios)
    );
}

async fn first_position(store: &AnyStore<Bench>) -> u64 {
    let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM event_bus_events")
        .fetch_one(store.pool())
        .await
        .unwrap();
    last.unsigned_abs()
}

/// Reads every event after `first` in pages of 100, each page and its
/// checkpoint in one transaction, decoding nothing.
async fn raw_loop(pool: &AnyPool, first: u64, postgres: bool) -> i64 {
    sqlx::query("DELETE FROM raw_checkpoint")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO raw_checkpoint (id, position) VALUES (1, $1)")
        .bind(i64::try_from(first).unwrap())
        .execute(pool)
        .await
        .unwrap();
    let page = if postgres {
        "SELECT position, payload FROM event_bus_events WHERE position > $1 ORDER BY position LIMIT 100 FOR UPDATE SKIP LOCKED"
    } else {
        "SELECT position, payload FROM event_bus_events WHERE position > $1 ORDER BY position LIMIT 100"
    };
    let mut read = 0;
    loop {
        let mut tx = if postgres {
            pool.begin().await.unwrap()
        } else {
            pool.begin_with("BEGIN IMMEDIATE").await.unwrap()
        };
        let checkpoint: i64 =
            sqlx::query_scalar("SELECT position FROM raw_checkpoint WHERE id = 1")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        let rows = sqlx::query(page)
            .bind(checkpoint)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let Some(last) = rows.last().map(|row| row.get::<i64, _>(0)) else {
            break;
        };
        read += i64::try_from(rows.len()).unwrap();
        sqlx::query("UPDATE raw_checkpoint SET position = $1 WHERE id = 1")
            .bind(last)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    read
}

/// Records when each event's handler started.
#[derive(Clone, Default)]
struct Stopwatch(Arc<Mutex<HashMap<i64, Instant>>>);

#[listener]
impl BenchHandler for Stopwatch {
    async fn on_item_added(&self, id: &i64, _title: &String) -> Result<(), HandlerError> {
        self.0.lock().unwrap().insert(*id, Instant::now());
        Ok(())
    }
}

async fn latency(store: &AnyStore<Bench>, url: &str) {
    let here = Stopwatch::default();
    store
        .spawn_with(
            here.clone(),
            ListenerOptions::new(),
            Durable::new().group("latency-here"),
        )
        .await
        .unwrap();
    let other = AnyStore::<Bench>::new(pool(url).await).await.unwrap();
    let there = Stopwatch::default();
    other
        .spawn_with(
            there.clone(),
            ListenerOptions::new(),
            Durable::new()
                .group("latency-there")
                .poll_interval(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    let mut committed = HashMap::new();
    for id in 0..LATENCY_SAMPLES as i64 {
        let tx = store.begin().await.unwrap();
        tx.emit_item_added(1_000_000 + id, String::new());
        // From the commit call: the wake-up is part of it, so the handler
        // may start before it returns.
        committed.insert(1_000_000 + id, Instant::now());
        tx.commit().await.unwrap();
        // Spaced, so that each commit finds the listeners waiting.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(here.0.lock().unwrap().contains_key(&(1_000_000 + id))
            && there.0.lock().unwrap().contains_key(&(1_000_000 + id)))
        {
            assert!(
                Instant::now() < deadline,
                "an event was not handled in 10 s"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let report = |name: &str, watch: &Stopwatch| {
        let started = watch.0.lock().unwrap();
        let mut samples: Vec<Duration> = committed
            .iter()
            .map(|(id, at)| started[id].saturating_duration_since(*at))
            .collect();
        let (p50, p99) = (
            percentile(&mut samples, 0.5),
            percentile(&mut samples, 0.99),
        );
        println!("  latency, commit call to handler start, {name}: p50 {p50:?}, p99 {p99:?}");
    };
    report("same process (woken at commit)", &here);
    let wake = if url.starts_with("postgres") {
        "woken by NOTIFY"
    } else {
        "polling every 50 ms"
    };
    report(&format!("another store ({wake})"), &there);
    other.shutdown(Duration::from_secs(5)).await;
}
