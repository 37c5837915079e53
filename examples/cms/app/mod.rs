//! The CMS: an axum API over a SQL database whose handlers write a row and
//! emit its event in one transaction (the durable tier's outbox); a durable
//! listener, reading the store's log, keeps the search index in step, one
//! on this process's bus the cache, and a group listener sends each new
//! user a welcome. With `NATS_URL`, the outbox is relayed into JetStream,
//! where the welcome mailer is shared by every process and each process's
//! cache hears of the others' writes.

pub(crate) mod admin;
pub(crate) mod cache;
pub(crate) mod db;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod hooks;
pub(crate) mod listeners;
pub(crate) mod mailer;
pub(crate) mod posts;
pub(crate) mod search;
pub(crate) mod server;
pub(crate) mod system;
pub(crate) mod telemetry;
pub(crate) mod users;
pub(crate) mod welcome;
pub(crate) mod write;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use event_bus::EventBus;
#[cfg(feature = "cache")]
use event_bus::LagPolicy;
use event_bus::nats::{Distributed, JetStream};
use event_bus::sql::{AnyStore, Durable, Start};
use event_bus::{ListenerOptions, RetryPolicy};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use tower_http::timeout::TimeoutLayer;

use self::error::ApiError;
use self::events::AppEvent;
use self::listeners::Listeners;

/// The largest request body, answered 413 past it.
pub(crate) const BODY_LIMIT: usize = 1024 * 1024;

/// Where the CMS keeps its data.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Holds the SQLite file (unless `database_url` is set) and the search
    /// index.
    pub(crate) data_dir: PathBuf,
    /// A `sqlite:` or `postgres:` URL; default `sqlite://{data_dir}/cms.db`.
    pub(crate) database_url: Option<String>,
    /// A NATS server with JetStream (`nats://127.0.0.1:4222`): the outbox
    /// is relayed into its stream `CMS`, and the listeners that span
    /// processes run on it. None by default.
    pub(crate) nats_url: Option<String>,
    /// Where a test holds the CMS mid-way (the index's replay, searches);
    /// nothing is held by default, and never from the environment.
    pub(crate) hooks: hooks::Hooks,
}

impl Config {
    /// `CMS_DATA_DIR` (default `./cms-data`), `DATABASE_URL` and
    /// `NATS_URL`.
    pub(crate) fn from_env() -> Self {
        Self {
            data_dir: std::env::var_os("CMS_DATA_DIR")
                .map_or_else(|| PathBuf::from("cms-data"), PathBuf::from),
            database_url: std::env::var("DATABASE_URL").ok(),
            nats_url: std::env::var("NATS_URL").ok().filter(|url| !url.is_empty()),
            hooks: hooks::Hooks::default(),
        }
    }

    fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("cms.db").display()
            )
        })
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) db: AnyPool,
    /// The durable tier on `db`: the outbox the handlers write their events
    /// in, and the log the listeners read.
    pub(crate) store: AnyStore<AppEvent>,
    /// The listeners this process runs on the store and on JetStream.
    pub(crate) listeners: Listeners,
    /// The JetStream tier, with `NATS_URL`.
    pub(crate) nats: Option<JetStream<AppEvent>>,
    /// This data directory's name among the processes on one database.
    pub(crate) instance: String,
    /// This process's bus: every event committed here, emitted after its
    /// commit, for the listeners whose state is this process's memory.
    pub(crate) bus: EventBus<AppEvent>,
    pub(crate) prometheus: PrometheusHandle,
    /// The writes running on tasks of their own.
    writes: tokio_util::task::TaskTracker,
    #[cfg(feature = "search")]
    pub(crate) search: Arc<search::SearchIndex>,
    #[cfg(feature = "cache")]
    pub(crate) cache: Arc<cache::Cache>,
}

/// A failing row (a database blip) is tried again with backoff, six
/// attempts in all; on the durable tier each is persisted, so a retry
/// survives a restart, and then it is a dead delivery.
fn retrying() -> ListenerOptions {
    ListenerOptions::new().retry(
        RetryPolicy::exponential(6)
            .initial_backoff(Duration::from_millis(50))
            .max_backoff(Duration::from_secs(2)),
    )
}

/// The options of a listener on the bus that keeps a copy of the database:
/// never drop (handlers emit with `emit_wait`), retry as [`retrying`].
#[cfg(feature = "cache")]
fn lossless() -> ListenerOptions {
    retrying()
        .capacity(4096)
        .lag_policy(LagPolicy::Backpressure)
}

/// Opens the database, the store and the index, and starts the listeners.
///
/// - The search listener runs on the durable tier, on a group of its own
///   per data directory ([`listeners::instance`]): the index is a local
///   directory, so each instance must see every event its database commits,
///   whichever process committed it, and must never miss one (a crash
///   before its index commit leaves the event to be delivered again). The
///   CMS never prunes the log: it is what refills an index opened empty.
/// - The cache invalidator runs on this process's bus, fed after each
///   commit ([`AppState::commit`]): the cache is this process's memory, so
///   the invalidation of this process's writes must reach it before the
///   write answers (a read right after sees it), and what the bus loses in
///   a crash is what the crash loses of the cache anyway. Writes of other
///   processes on the same database reach it with `NATS_URL` (an instance
///   listener on JetStream, `cache-peers`), and not without: see `cache`.
/// - The welcome mailer is a group listener: on the store, or with
///   `NATS_URL` on JetStream, shared by every process of the group.
/// - With `NATS_URL`, the relay (a durable listener of the group
///   `nats-relay`, shared by the processes on the database) publishes
///   what the outbox commits into the stream.
pub(crate) async fn build(
    config: &Config,
) -> Result<Arc<AppState>, Box<dyn std::error::Error + Send + Sync>> {
    // Before the listeners: they register their counters at spawn.
    let prometheus = telemetry::prometheus();
    std::fs::create_dir_all(&config.data_dir)?;
    let db = db::connect(&config.database_url()).await?;
    let store = AnyStore::<AppEvent>::new(db.clone()).await?;
    let listeners = Listeners::default();
    let bus = EventBus::new();
    let instance = listeners::instance(&config.data_dir)?;
    let nats = match &config.nats_url {
        Some(url) => {
            let stream = JetStream::<AppEvent>::connect(url, event_bus::nats::Config::new("cms"))
                .await?
                .with_instance(instance.clone());
            let relay = stream
                .spawn_relay(&store, Durable::new().start(Start::Beginning))
                .await?;
            listeners.keep(relay);
            Some(stream)
        }
        None => None,
    };
    let mailer = mailer::WelcomeMailer {
        db: db.clone(),
        instance: instance.clone(),
    };
    match &nats {
        Some(stream) => {
            let distributed = Distributed::new().start(event_bus::nats::Start::Beginning);
            listeners
                .spawn_distributed(stream, mailer, retrying(), distributed)
                .await?;
        }
        None => {
            let durable = Durable::new().start(Start::Beginning);
            listeners.spawn(&store, mailer, retrying(), durable).await?;
        }
    }

    #[cfg(feature = "search")]
    let search = {
        let index = Arc::new(search::SearchIndex::open(
            &config.data_dir.join("search"),
            config.hooks.clone(),
        )?);
        let group = format!("search-{instance}");
        // An index opened empty (new, or deleted, or unreadable) is filled
        // again by its group reading the log from its first event; an index
        // that holds documents goes on from its group's checkpoint, which
        // moves only past what it committed.
        if index.needs_replay() {
            store.replay(&group, Start::Beginning).await?;
        }
        let durable = Durable::new().group(group.clone()).start(Start::Beginning);
        let indexer = search::SearchIndexer {
            db: db.clone(),
            index: index.clone(),
        };
        let spawned = listeners
            .spawn(&store, indexer, retrying(), durable)
            .await?;
        if index.needs_replay() {
            index.ready_once_replayed(store.clone(), spawned);
        }
        index
    };
    #[cfg(feature = "cache")]
    let cache = {
        let cache = Arc::new(cache::Cache::new(10_000));
        bus.spawn_with(cache::CacheInvalidator(cache.clone()), lossless());
        if let Some(stream) = &nats {
            let peers = cache::PeerInvalidator(cache.clone());
            let options = retrying().scope(event_bus::Scope::Instance);
            listeners
                .spawn_distributed(stream, peers, options, Distributed::new())
                .await?;
        }
        cache
    };

    Ok(Arc::new(AppState {
        db,
        store,
        listeners,
        nats,
        instance,
        bus,
        prometheus,
        writes: tokio_util::task::TaskTracker::new(),
        #[cfg(feature = "search")]
        search,
        #[cfg(feature = "cache")]
        cache,
    }))
}

/// Every route of the API, with its limits.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(users::routes())
        .merge(posts::routes())
        .merge(system::routes())
        .merge(admin::routes())
        .merge(mailer::routes())
        .route_layer(axum::middleware::from_fn(telemetry::track))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            server::REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn(server::limits))
        .layer(axum::middleware::from_fn(server::json_errors))
}

impl AppState {
    /// Runs a write to its end on a task of its own, whether or not the
    /// request that started it is still waiting: a client that disconnects
    /// (or the request timeout) drops the handler, never a transaction
    /// mid-statement or mid-commit, nor a write between its commit and its
    /// bus events. Shutdown waits for these tasks
    /// ([`AppState::writes_done`]) before it stops the listeners.
    pub(crate) async fn detached<T: Send + 'static>(
        &self,
        write: impl Future<Output = Result<T, ApiError>> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.writes
            .spawn(write)
            .await
            .map_err(|join| ApiError::Internal(join.into()))?
    }

    /// Waits until no write started by [`detached`](Self::detached) is
    /// running.
    pub(crate) async fn writes_done(&self) {
        self.writes.close();
        self.writes.wait().await;
        self.writes.reopen();
    }
}

/// A path id: a 404 when it is not a number, as no row has that id.
pub(crate) fn parse_id(id: &str, what: &str) -> Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::NotFound(format!("no {what} {id}")))
}

/// `?after=ID&limit=N` of a listing: rows with an id above `after`, `limit`
/// of them (default 20, at most 100).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageParams {
    #[serde(default)]
    pub(crate) after: i64,
    #[serde(default = "PageParams::default_limit")]
    pub(crate) limit: i64,
}

impl PageParams {
    const MAX_LIMIT: i64 = 100;

    fn default_limit() -> i64 {
        20
    }

    pub(crate) fn from_query(
        params: Result<axum::extract::Query<Self>, QueryRejection>,
    ) -> Result<Self, ApiError> {
        let axum::extract::Query(params) =
            params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
        if !(1..=Self::MAX_LIMIT).contains(&params.limit) {
            return Err(ApiError::BadRequest(format!(
                "`limit` must be 1 to {}",
                Self::MAX_LIMIT
            )));
        }
        Ok(params)
    }
}

/// One page of a listing, with the link to the next when there may be one.
#[derive(Debug, Serialize)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    pub(crate) next: Option<String>,
}

impl<T> Page<T> {
    pub(crate) fn of(
        items: Vec<T>,
        params: PageParams,
        path: &str,
        id: impl Fn(&T) -> i64,
    ) -> Self {
        let next = match items.last() {
            Some(last) if items.len() as i64 == params.limit => {
                Some(format!("{path}?after={}&limit={}", id(last), params.limit))
            }
            _ => None,
        };
        Self { items, next }
    }
}
