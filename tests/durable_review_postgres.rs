//! The durable tier's ordering promises under attack on PostgreSQL
//! (127.0.0.1:5432; ignored in a plain `cargo test`, run by `.ci/run`):
//! the programs of an adversarial review, kept as regression tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::sql::{Durable, PgStore, Start};
use event_bus::{DomainEvent, HandlerError, ListenerOptions, listener};
use serde::{Deserialize, Serialize};
use sqlx::Executor;
use sqlx::postgres::PgPoolOptions;

const DEADLINE: Duration = Duration::from_secs(60);
const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

#[derive(Debug, Clone, PartialEq, DomainEvent, Serialize, Deserialize)]
enum Shop {
    OrderPaid { order: u64 },
    OrderShipped { order: u64 },
}

#[derive(Clone, Default)]
struct Clerk(Arc<Mutex<Vec<u64>>>);

#[listener(name = "Clerk")]
impl ShopHandler for Clerk {
    async fn on_order_paid(&self, order: &u64) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(*order);
        Ok(())
    }
}

#[derive(Clone, Default)]
struct Shipper(Arc<Mutex<Vec<u64>>>);

#[listener(name = "Shipper")]
impl ShopHandler for Shipper {
    async fn on_order_shipped(&self, order: &u64) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(*order);
        Ok(())
    }
}

struct Db(String);

impl Db {
    async fn new(name: &str) -> Self {
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
    async fn store(&self) -> PgStore<Shop> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&format!("{SERVER}/{}", self.0))
            .await
            .unwrap();
        PgStore::new(pool).await.unwrap()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
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

fn counts(v: &[u64]) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for o in v {
        *m.entry(*o).or_insert(0) += 1;
    }
    m
}

/// Concurrent outbox transactions (12 tasks) in two processes (two stores),
/// each running the same two listeners (one of a subset): every event once
/// per listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL on 127.0.0.1:5432 (run by .ci/run)"]
async fn concurrent_outboxes_in_two_processes_every_event_once_per_group() {
    let db = Db::new("review_pg_concurrent").await;
    let a = db.store().await;
    let b = db.store().await;
    let (clerks, shippers) = (Clerk::default(), Shipper::default());
    for store in [&a, &b] {
        let durable = Durable::new().start(Start::Beginning).prefetch(4);
        store
            .spawn_with(
                clerks.clone(),
                ListenerOptions::new().concurrency(3),
                durable.clone(),
            )
            .await
            .unwrap();
        store
            .spawn_with(shippers.clone(), ListenerOptions::new(), durable)
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for t in 0..12u64 {
        let store = if t % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            for i in 0..40u64 {
                let order = t * 1000 + i;
                let tx = store.begin().await.unwrap();
                tx.emit_order_paid(order);
                if i % 3 == 0 {
                    tx.emit_order_shipped(order);
                }
                if i % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::timeout(DEADLINE, async {
        a.idle().await.unwrap();
        b.idle().await.unwrap();
    })
    .await
    .expect("idle");
    let paid = counts(&clerks.0.lock().unwrap());
    let shipped = counts(&shippers.0.lock().unwrap());
    let missing_paid = (0..12u64)
        .flat_map(|t| (0..40u64).map(move |i| t * 1000 + i))
        .filter(|o| !paid.contains_key(o))
        .count();
    let twice_paid = paid.values().filter(|n| **n > 1).count();
    let missing_shipped = (0..12u64)
        .flat_map(|t| (0..40u64).filter(|i| i % 3 == 0).map(move |i| t * 1000 + i))
        .filter(|o| !shipped.contains_key(o))
        .count();
    let twice_shipped = shipped.values().filter(|n| **n > 1).count();
    println!(
        "paid: {} distinct, {missing_paid} missing, {twice_paid} twice; shipped: {} distinct, {missing_shipped} missing, {twice_shipped} twice; progress {:?}",
        paid.len(),
        shipped.len(),
        a.progress().await.unwrap()
    );
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        (missing_paid, twice_paid, missing_shipped, twice_shipped),
        (0, 0, 0, 0)
    );
}

/// `Start::Now`: "the listener sees what is committed from now on", spawned
/// while other tasks commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL on 127.0.0.1:5432 (run by .ci/run)"]
async fn a_listener_started_now_amid_commits_sees_every_later_one() {
    let db = Db::new("review_pg_now").await;
    let a = db.store().await;
    let spawned = Arc::new(AtomicBool::new(false));
    let must: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (a, spawned, must, stop, next) = (
            a.clone(),
            spawned.clone(),
            must.clone(),
            stop.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let order = next.fetch_add(1, Ordering::SeqCst);
                let after = spawned.load(Ordering::SeqCst);
                let tx = a.begin().await.unwrap();
                tx.emit_order_paid(order);
                tx.commit().await.unwrap();
                if after {
                    must.lock().unwrap().push(order);
                }
            }
        }));
    }
    // Commits under way before the spawn, and after it.
    until("commits before the spawn", || {
        next.load(Ordering::SeqCst) >= 50
    })
    .await;
    let clerk = Clerk::default();
    a.spawn_with(clerk.clone(), ListenerOptions::new(), Durable::new())
        .await
        .unwrap();
    spawned.store(true, Ordering::SeqCst);
    until("commits after the spawn", || {
        must.lock().unwrap().len() >= 200
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::timeout(DEADLINE, a.idle())
        .await
        .expect("idle")
        .unwrap();
    let seen = counts(&clerk.0.lock().unwrap());
    let must = must.lock().unwrap().clone();
    let missing: Vec<_> = must.iter().filter(|o| !seen.contains_key(o)).collect();
    println!(
        "{} must be seen, {} seen, missing {:?}",
        must.len(),
        seen.len(),
        missing
    );
    a.shutdown(Duration::from_secs(5)).await;
    assert!(missing.is_empty());
}

/// Yields until `condition` holds, or panics naming `what` after
/// [`DEADLINE`].
async fn until(what: &str, condition: impl Fn() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} did not happen within {DEADLINE:?}"));
}
