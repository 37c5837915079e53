//! The durable tier as the scenario suite sees it, on any database the
//! tier runs on: `tests/scenarios_sqlite.rs` and
//! `tests/scenarios_postgres.rs` give it a fresh database per scenario.
//!
//! Publishing is synchronous in the suite ([`Publish`]), and an outbox
//! commit is not: a writer task commits what is published, in publish
//! order, batched into transactions of up to [`BATCH`] events. Everything
//! else is the store's own API.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use event_bus::codec::JsonCodec;
use event_bus::runner::RunReport;
use event_bus::sql::{Backend, Durable, DurableListener, Start, Store};
use event_bus::{BatchListener, Envelope, InBatches, Listener, ListenerOptions, OneByOne, Publish};
use futures::stream::{BoxStream, StreamExt};
use sqlx::Pool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::scenarios::{Capabilities, Counts, Letter, Running, ScenarioEvent, Stopped, Tier};

/// The most events the writer commits in one transaction.
const BATCH: usize = 256;

/// Leases short enough that a scenario sees one expire, long enough that a
/// loaded machine renews them in time.
const LEASE: Duration = Duration::from_secs(2);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A database the scenarios run on, fresh per scenario.
pub(crate) trait Db: Backend + Sized {
    /// The tier's name in skip messages.
    const NAME: &'static str;

    /// A pool on a fresh, empty database for `scenario`, and what to keep
    /// alive (and drop after) with it.
    fn fresh(
        scenario: &'static str,
    ) -> impl Future<Output = (Pool<Self>, Box<dyn Send + Sync>)> + Send;

    /// Inserts `bytes` into the log as a row the codec may not decode.
    fn insert_raw(
        pool: &Pool<Self>,
        id: String,
        name: String,
        bytes: Vec<u8>,
    ) -> impl Future<Output = ()> + Send;

    /// The payloads at `positions`, in order.
    fn payloads(
        pool: &Pool<Self>,
        positions: Vec<u64>,
    ) -> impl Future<Output = Vec<Vec<u8>>> + Send;
}

/// Who wants every committed event: the scenarios' taps.
type Taps = Mutex<Vec<mpsc::UnboundedSender<Arc<Envelope<ScenarioEvent>>>>>;

enum Write {
    Event(ScenarioEvent),
    Raw(Vec<u8>),
    Flush(oneshot::Sender<()>),
}

/// A store of its own per scenario, with a writer for what is published.
pub(crate) struct SqlTier<DB: Db>(Arc<State<DB>>);

impl<DB: Db> Clone for SqlTier<DB> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

struct State<DB: Db> {
    store: Store<ScenarioEvent, DB>,
    writes: mpsc::UnboundedSender<Write>,
    closed: AtomicBool,
    refused: AtomicU64,
    taps: Arc<Taps>,
    handles: Mutex<Vec<SqlHandle>>,
    _database: Box<dyn Send + Sync>,
}

impl<DB: Db> SqlTier<DB> {
    /// Waits until the writer has committed everything published so far.
    async fn flush(&self) {
        let (done, committed) = oneshot::channel();
        if self.0.writes.send(Write::Flush(done)).is_ok() {
            let _ = committed.await;
        }
    }

    async fn start<M, L: event_bus::Spawnable<ScenarioEvent, M>>(
        &self,
        listener: L,
        options: ListenerOptions,
        durable: Durable,
    ) -> SqlHandle {
        self.flush().await;
        let durable = durable
            .lease(LEASE)
            .poll_interval(Duration::from_millis(50));
        let listener = self
            .0
            .store
            .spawn_with(listener, options, durable)
            .await
            .expect("spawn a durable listener");
        let handle = SqlHandle(listener);
        lock(&self.0.handles).push(handle.clone());
        handle
    }
}

/// Commits what is published, in order, and hands what it committed to
/// the taps.
async fn write<DB: Db>(
    store: Store<ScenarioEvent, DB>,
    mut writes: mpsc::UnboundedReceiver<Write>,
    taps: Arc<Taps>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while writes.recv_many(&mut batch, BATCH).await > 0 {
        let mut events = Vec::new();
        for write in batch.drain(..) {
            match write {
                Write::Event(event) => events.push(event),
                Write::Raw(bytes) => {
                    commit(&store, std::mem::take(&mut events), &taps).await;
                    let (id, name) = identity(&bytes);
                    DB::insert_raw(store.pool(), id, name, bytes).await;
                }
                Write::Flush(done) => {
                    commit(&store, std::mem::take(&mut events), &taps).await;
                    let _ = done.send(());
                }
            }
        }
        commit(&store, events, &taps).await;
    }
}

async fn commit<DB: Db>(store: &Store<ScenarioEvent, DB>, events: Vec<ScenarioEvent>, taps: &Taps) {
    if events.is_empty() {
        return;
    }
    let tx = store.begin().await.expect("begin a transaction");
    for event in events {
        tx.publish(event);
    }
    let positions = tx.commit().await.expect("commit the events");
    if lock(taps).is_empty() {
        return;
    }
    let payloads = DB::payloads(store.pool(), positions).await;
    let mut taps = lock(taps);
    for payload in payloads {
        let envelope = Arc::new(
            JsonCodec
                .decode(&payload)
                .expect("a committed event decodes"),
        );
        taps.retain(|tap| tap.send(Arc::clone(&envelope)).is_ok());
    }
}

/// The id and name raw bytes say they have, where they say it.
fn identity(bytes: &[u8]) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    let id = value
        .get("id")
        .and_then(|id| id.as_str())
        .and_then(|id| Uuid::parse_str(id).ok())
        .unwrap_or_else(Uuid::new_v4);
    let name = value
        .get("type")
        .and_then(|name| name.as_str())
        .unwrap_or("unknown");
    (id.to_string(), name.to_owned())
}

impl<DB: Db> Publish<ScenarioEvent> for SqlTier<DB> {
    fn publish(&self, event: ScenarioEvent) {
        if self.0.closed.load(Ordering::SeqCst) || self.0.writes.send(Write::Event(event)).is_err()
        {
            self.0.refused.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl<DB: Db> Tier for SqlTier<DB> {
    const NAME: &'static str = <DB as Db>::NAME;

    const CAPABILITIES: Capabilities = Capabilities::none()
        .persistent()
        .groups()
        .replay()
        .decodes()
        .quiesce();

    type Handle = SqlHandle;

    async fn fresh(scenario: &'static str) -> Self {
        let (pool, database) = DB::fresh(scenario).await;
        let store = Store::new(pool).await.expect("create the tables");
        let (writes, written) = mpsc::unbounded_channel();
        let taps = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(write(store.clone(), written, taps.clone()));
        Self(Arc::new(State {
            store,
            writes,
            closed: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            taps,
            handles: Mutex::new(Vec::new()),
            _database: database,
        }))
    }

    async fn spawn<L: Listener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> SqlHandle {
        self.start::<OneByOne, _>(listener, options, Durable::new())
            .await
    }

    async fn spawn_batch<L: BatchListener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> SqlHandle {
        self.start::<InBatches, _>(listener, options, Durable::new())
            .await
    }

    async fn spawn_in_group<L: Listener<ScenarioEvent>>(
        &self,
        group: &'static str,
        listener: L,
        options: ListenerOptions,
    ) -> SqlHandle {
        let durable = Durable::new().group(group);
        self.start::<OneByOne, _>(listener, options, durable).await
    }

    async fn spawn_replaying<L: Listener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> SqlHandle {
        let durable = Durable::new().start(Start::Beginning);
        self.start::<OneByOne, _>(listener, options, durable).await
    }

    /// The drain covers what was published before the shutdown began: the
    /// writer commits it first.
    async fn shutdown(&self, deadline: Duration) -> Stopped {
        self.0.closed.store(true, Ordering::SeqCst);
        self.flush().await;
        let reports: Vec<RunReport> = self.0.store.shutdown(deadline).await;
        let progress = self.0.store.progress().await.expect("read the progress");
        let handles = lock(&self.0.handles).clone();
        let mut stopped = Stopped::default();
        let mut counted = std::collections::HashSet::new();
        for handle in &handles {
            let group = handle.0.group().to_owned();
            let Some(listener) = progress.iter().find(|p| p.listener == group) else {
                continue;
            };
            if !counted.insert(group) {
                continue;
            }
            let last = listener.checkpoint + listener.lag;
            let left = last - listener.head + listener.unfinished;
            *stopped
                .undelivered
                .entry(handle.0.name().to_owned())
                .or_default() += left;
        }
        stopped.drained = reports
            .iter()
            .all(|report| report.status == event_bus::ListenerStatus::Drained)
            && stopped.undelivered() == 0;
        stopped
    }

    async fn refused(&self) -> u64 {
        self.0.refused.load(Ordering::SeqCst)
    }

    async fn dead_letters(&self) -> Vec<Letter> {
        let letters = self
            .0
            .store
            .dead_letters(None)
            .await
            .expect("read the dead letters");
        letters
            .into_iter()
            .map(|letter| Letter {
                id: Some(letter.id),
                listener: letter.listener,
                error: letter.error,
                attempts: letter.attempts,
            })
            .collect()
    }

    async fn tap(&self) -> BoxStream<'static, Arc<Envelope<ScenarioEvent>>> {
        self.flush().await;
        let (tap, tapped) = mpsc::unbounded_channel();
        lock(&self.0.taps).push(tap);
        tokio_stream_of(tapped)
    }

    async fn quiesce(&self) {
        self.flush().await;
        self.0.store.idle().await.expect("read the progress");
    }

    async fn publish_raw(&self, bytes: Vec<u8>) {
        let _ = self.0.writes.send(Write::Raw(bytes));
        self.flush().await;
    }
}

fn tokio_stream_of<T: Send + 'static>(
    mut receiver: mpsc::UnboundedReceiver<T>,
) -> BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx)).boxed()
}

/// A durable listener, as the scenarios see it.
#[derive(Clone)]
pub(crate) struct SqlHandle(DurableListener);

impl Running for SqlHandle {
    fn counts(&self) -> Counts {
        let report = self.0.report();
        Counts {
            delivered: self.0.delivered(),
            handled: report.handled,
            failed: report.failed,
            retried: report.retried,
            dead_lettered: report.dead_lettered,
            dropped: 0,
        }
    }

    fn abort(&self) {
        self.0.abort();
    }

    async fn finished(&self) {
        self.0.finished().await;
    }
}

/// `Db::insert_raw` and `Db::payloads`, whose SQL every database takes as
/// it is: `impl Db for X { …; sql_tier::raw_rows!(); }`.
macro_rules! raw_rows {
    () => {
        async fn insert_raw(pool: &sqlx::Pool<Self>, id: String, name: String, bytes: Vec<u8>) {
            sqlx::query(
                "INSERT INTO event_bus_events (id, name, payload, recorded_at) VALUES ($1, $2, $3, 0)",
            )
            .bind(id)
            .bind(name)
            .bind(bytes)
            .execute(pool)
            .await
            .expect("insert a raw event");
        }

        async fn payloads(pool: &sqlx::Pool<Self>, positions: Vec<u64>) -> Vec<Vec<u8>> {
            let mut payloads = Vec::with_capacity(positions.len());
            for position in positions {
                let payload: Vec<u8> =
                    sqlx::query_scalar("SELECT payload FROM event_bus_events WHERE position = $1")
                        .bind(i64::try_from(position).expect("a position within i64"))
                        .fetch_one(pool)
                        .await
                        .expect("read a payload");
                payloads.push(payload);
            }
            payloads
        }
    };
}

pub(crate) use raw_rows;
