//! The CMS: an axum API over a SQL database whose handlers write and emit one
//! event each; listeners keep the search index and the cache in step.

pub(crate) mod admin;
pub(crate) mod cache;
pub(crate) mod db;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod hooks;
pub(crate) mod posts;
pub(crate) mod search;
pub(crate) mod server;
pub(crate) mod system;
pub(crate) mod telemetry;
pub(crate) mod users;
pub(crate) mod welcome;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use event_bus::{EventBus, LagPolicy, ListenerOptions, Publish, RetryPolicy};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use tower_http::timeout::TimeoutLayer;

use self::error::ApiError;
use self::events::AppEvent;

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
    /// Where a test holds the CMS mid-way (the index rebuild, searches);
    /// nothing is held by default, and never from the environment.
    pub(crate) hooks: hooks::Hooks,
}

impl Config {
    /// `CMS_DATA_DIR` (default `./cms-data`) and `DATABASE_URL`.
    pub(crate) fn from_env() -> Self {
        Self {
            data_dir: std::env::var_os("CMS_DATA_DIR")
                .map_or_else(|| PathBuf::from("cms-data"), PathBuf::from),
            database_url: std::env::var("DATABASE_URL").ok(),
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
    pub(crate) bus: EventBus<AppEvent>,
    /// What the handlers emit on.
    pub(crate) events: Events,
    pub(crate) prometheus: PrometheusHandle,
    /// The writes running on tasks of their own.
    writes: tokio_util::task::TaskTracker,
    #[cfg(feature = "search")]
    pub(crate) search: Arc<search::SearchIndex>,
    #[cfg(feature = "cache")]
    pub(crate) cache: Arc<cache::Cache>,
}

/// The handlers' publisher: the bus, with the cache told first which keys
/// each event will make stale, so a read right after a write sees it.
/// `state.events.emit_post_updated_wait(&post).await` waits while a
/// listener's queue is full, and so loses nothing.
pub(crate) struct Events {
    bus: EventBus<AppEvent>,
    #[cfg(feature = "cache")]
    cache: Arc<cache::Cache>,
}

impl Events {
    fn expect(&self, event: &AppEvent) {
        #[cfg(feature = "cache")]
        self.cache.expect(event);
        #[cfg(not(feature = "cache"))]
        let _ = event;
    }
}

impl Publish<AppEvent> for Events {
    fn publish(&self, event: AppEvent) {
        self.expect(&event);
        self.bus.emit(event);
    }

    fn publish_wait(&self, event: AppEvent) -> impl Future<Output = ()> + Send {
        self.expect(&event);
        self.bus.emit_wait(event)
    }
}

/// The options of the listeners that keep a copy of the database: never
/// drop (handlers emit with `emit_wait`), retry a failing row with backoff.
fn lossless() -> ListenerOptions {
    ListenerOptions::new()
        .capacity(4096)
        .lag_policy(LagPolicy::Backpressure)
        .retry(
            RetryPolicy::exponential(6)
                .initial_backoff(Duration::from_millis(50))
                .max_backoff(Duration::from_secs(2)),
        )
}

/// Opens the database and the index, and starts the listeners; the index is
/// rebuilt in the background.
pub(crate) async fn build(
    config: &Config,
) -> Result<Arc<AppState>, Box<dyn std::error::Error + Send + Sync>> {
    // Before the bus: its listeners register their counters at spawn.
    let prometheus = telemetry::prometheus();
    std::fs::create_dir_all(&config.data_dir)?;
    let db = db::connect(&config.database_url()).await?;
    let bus = EventBus::new();

    #[cfg(feature = "search")]
    let search = {
        let index = Arc::new(search::SearchIndex::open(
            &config.data_dir.join("search"),
            config.hooks.clone(),
        )?);
        // One index commit per batch: a burst of edits costs a few commits,
        // not one each. Spawned before the rebuild, so that nothing emitted
        // while it runs is missed.
        bus.spawn_with(
            search::SearchIndexer {
                db: db.clone(),
                index: index.clone(),
            },
            lossless(),
        );
        index.rebuild_in_background(db.clone());
        index
    };
    #[cfg(feature = "cache")]
    let cache = {
        let cache = Arc::new(cache::Cache::new(10_000));
        bus.spawn_with(cache::CacheInvalidator(cache.clone()), lossless());
        cache
    };

    let state = Arc::new(AppState {
        events: Events {
            bus: bus.clone(),
            #[cfg(feature = "cache")]
            cache: cache.clone(),
        },
        db,
        bus,
        prometheus,
        writes: tokio_util::task::TaskTracker::new(),
        #[cfg(feature = "search")]
        search,
        #[cfg(feature = "cache")]
        cache,
    });
    #[cfg(feature = "search")]
    admin::reconcile(&state);
    Ok(state)
}

/// Every route of the API, with its limits.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(users::routes())
        .merge(posts::routes())
        .merge(system::routes())
        .merge(admin::routes())
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
    /// (or the request timeout) drops the handler, never a write between its
    /// commit and its event. Shutdown waits for these tasks
    /// ([`AppState::writes_done`]) before it drains the bus.
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
