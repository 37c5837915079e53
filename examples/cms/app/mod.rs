//! The CMS: an axum API over a SQL database whose handlers write and emit one
//! event each; listeners keep the search index and the cache in step.

pub(crate) mod cache;
pub(crate) mod db;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod posts;
pub(crate) mod search;
pub(crate) mod system;
pub(crate) mod users;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use event_bus::EventBus;
use sqlx::AnyPool;

use self::error::ApiError;
use self::events::AppEvent;

/// Where the CMS keeps its data.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Holds the SQLite file (unless `database_url` is set) and the search
    /// index.
    pub(crate) data_dir: PathBuf,
    /// A `sqlite:` or `postgres:` URL; default `sqlite://{data_dir}/cms.db`.
    pub(crate) database_url: Option<String>,
}

impl Config {
    /// `CMS_DATA_DIR` (default `./cms-data`) and `DATABASE_URL`.
    pub(crate) fn from_env() -> Self {
        Self {
            data_dir: std::env::var_os("CMS_DATA_DIR")
                .map_or_else(|| PathBuf::from("cms-data"), PathBuf::from),
            database_url: std::env::var("DATABASE_URL").ok(),
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
    #[cfg(feature = "search")]
    pub(crate) search: Arc<search::SearchIndex>,
    #[cfg(feature = "cache")]
    pub(crate) cache: Arc<cache::Cache>,
}

/// The emit helpers (`state.emit_user_created(&user)`) work on the state.
impl AsRef<EventBus<AppEvent>> for AppState {
    fn as_ref(&self) -> &EventBus<AppEvent> {
        &self.bus
    }
}

/// Opens the database and the index, and starts the listeners.
pub(crate) async fn build(
    config: &Config,
) -> Result<Arc<AppState>, Box<dyn std::error::Error + Send + Sync>> {
    std::fs::create_dir_all(&config.data_dir)?;
    let db = db::connect(&config.database_url()).await?;
    let bus = EventBus::new();

    #[cfg(feature = "search")]
    let search = {
        let index = Arc::new(search::SearchIndex::open(&config.data_dir.join("search"))?);
        index.rebuild(&db).await?;
        // One index commit per batch: a burst of edits costs a few commits,
        // not one each.
        bus.spawn(search::SearchIndexer {
            db: db.clone(),
            index: index.clone(),
        });
        index
    };
    #[cfg(feature = "cache")]
    let cache = {
        let cache = Arc::new(cache::Cache::new(10_000));
        bus.spawn(cache::CacheInvalidator(cache.clone()));
        cache
    };

    Ok(Arc::new(AppState {
        db,
        bus,
        #[cfg(feature = "search")]
        search,
        #[cfg(feature = "cache")]
        cache,
    }))
}

/// Every route of the API.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(users::routes())
        .merge(posts::routes())
        .merge(system::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
}

/// A path id: a 404 when it is not a number, as no row has that id.
pub(crate) fn parse_id(id: &str, what: &str) -> Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::NotFound(format!("no {what} {id}")))
}
