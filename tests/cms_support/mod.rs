//! What the CMS's test crates (`tests/cms.rs`, `tests/cms_review.rs`)
//! share: a server on an ephemeral port with a real HTTP client, a database
//! of its own on PostgreSQL, and the check that search and cache equal the
//! database. Each crate declares the app (`mod app`) at its root, as the
//! app names its modules from there.

// Each crate uses a part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::app::{self, AppState, Config};

/// A running CMS and a client for it.
pub(crate) struct Cms {
    pub(crate) url: String,
    pub(crate) http: reqwest::Client,
    pub(crate) state: Arc<AppState>,
    _data: Option<tempfile::TempDir>,
    server: app::server::Background,
}

/// An answer as the client saw it. `body` is `Null` when `text` is not
/// JSON, so that a test can say which answer broke its promise.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) content_type: Option<String>,
    /// The `x-cache` header of a cached read.
    pub(crate) cache: Option<String>,
    pub(crate) text: String,
    pub(crate) body: Value,
}

/// The config of a CMS on the data in `dir`, nothing held.
pub(crate) fn config_in(dir: &std::path::Path, database_url: Option<String>) -> Config {
    Config {
        data_dir: dir.to_owned(),
        database_url,
        nats_url: None,
        hooks: app::hooks::Hooks::default(),
    }
}

impl Cms {
    /// On SQLite in a fresh data directory.
    pub(crate) async fn start() -> Self {
        Self::start_on(None).await
    }

    /// In a fresh data directory, on `database_url` (else SQLite there).
    pub(crate) async fn start_on(database_url: Option<String>) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut cms = Self::start_in(data.path(), database_url).await;
        cms._data = Some(data);
        cms
    }

    /// On the data in `dir`; returns once the search index is built.
    pub(crate) async fn start_in(dir: &std::path::Path, database_url: Option<String>) -> Self {
        let cms = Self::launch(&config_in(dir, database_url)).await;
        cms.index_ready().await;
        cms
    }

    /// Through the same server as `main`'s, without waiting for the index:
    /// the data directory is the caller's to keep.
    pub(crate) async fn launch(config: &Config) -> Self {
        let state = app::build(config).await.unwrap();
        let server = app::server::Background::start(state.clone()).await.unwrap();
        Self {
            url: server.url.clone(),
            http: reqwest::Client::new(),
            state,
            _data: None,
            server,
        }
    }

    /// Waits until the search index is built.
    pub(crate) async fn index_ready(&self) {
        #[cfg(feature = "search")]
        tokio::time::timeout(Duration::from_secs(30), self.state.search.ready())
            .await
            .expect("the index was not built within 30s");
    }

    /// Stops the server and drains the listeners, as Ctrl-C does.
    pub(crate) async fn stop(self) -> app::listeners::Report {
        tokio::time::timeout(Duration::from_secs(30), self.server.stop())
            .await
            .expect("the server did not stop within 30s")
            .unwrap();
        self.state.shutdown(Duration::from_secs(10)).await
    }

    pub(crate) async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status();
        let header = |name| {
            response
                .headers()
                .get(name)
                .map(|v: &reqwest::header::HeaderValue| v.to_str().unwrap().to_owned())
        };
        let content_type = header("content-type");
        let cache = header("x-cache");
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            content_type,
            cache,
            text,
            body,
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", self.url)))
            .await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(self.http.post(format!("{}{path}", self.url)).json(&body))
            .await
    }

    pub(crate) async fn put(&self, path: &str, body: Value) -> Answer {
        self.send(self.http.put(format!("{}{path}", self.url)).json(&body))
            .await
    }

    pub(crate) async fn delete(&self, path: &str) -> Answer {
        self.send(self.http.delete(format!("{}{path}", self.url)))
            .await
    }

    /// Waits until every write has run and every listener has handled
    /// what the log holds for it (the store's `idle`).
    pub(crate) async fn quiesce(&self) {
        tokio::time::timeout(Duration::from_secs(30), async {
            self.state.writes_done().await;
            self.state.idle().await.unwrap();
        })
        .await
        .expect("the writes and the listeners did not settle within 30s");
    }

    pub(crate) async fn user(&self, username: &str) -> i64 {
        let answer = self
            .post(
                "/users",
                json!({ "username": username, "email": format!("{username}@example.com") }),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text);
        answer.body["id"].as_i64().unwrap()
    }

    pub(crate) async fn new_post(&self, author: i64, title: &str) -> Value {
        let answer = self
            .post(
                "/posts",
                json!({ "title": title, "body": "Lorem ipsum.", "author_id": author }),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text);
        answer.body
    }

    /// The hits of a search that must succeed.
    pub(crate) async fn search(&self, query: &str) -> Vec<Value> {
        let answer = self.get(&format!("/search?q={query}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        answer.body["hits"].as_array().unwrap().clone()
    }
}

/// A database of its own on the PostgreSQL server of `CMS_TEST_POSTGRES`
/// (default `postgres://postgres@127.0.0.1:5432`, trust auth), dropped by
/// [`drop`](Self::drop).
pub(crate) struct Postgres {
    admin: sqlx::AnyPool,
    name: String,
    /// The new database's URL.
    pub(crate) url: String,
}

impl Postgres {
    /// Creates `{prefix}_{pid}`, dropping a leftover of that name first; a
    /// prefix per test keeps the tests of one run apart.
    pub(crate) async fn create(prefix: &str) -> Self {
        use sqlx::Executor;

        let server = std::env::var("CMS_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        sqlx::any::install_default_drivers();
        let admin = sqlx::AnyPool::connect(&format!("{server}/postgres"))
            .await
            .unwrap();
        let name = format!("{prefix}_{}", std::process::id());
        admin
            .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
            .await
            .unwrap();
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        Self {
            admin,
            url: format!("{server}/{name}"),
            name,
        }
    }

    /// Drops the database, closing what connections are left on it (of
    /// CMS instances already stopped).
    pub(crate) async fn drop_now(self) {
        use sqlx::Executor;

        self.admin
            .execute(format!("DROP DATABASE {} WITH (FORCE)", self.name).as_str())
            .await
            .unwrap();
    }

    /// Stops `cms`'s listeners, closes its connections and drops the
    /// database.
    pub(crate) async fn drop(self, cms: &Cms) {
        use sqlx::Executor;

        cms.state.store.shutdown(Duration::from_secs(10)).await;
        cms.state.db.close().await;
        // FORCE: a server process can outlive its closed client connection
        // by more than the 5 seconds a plain DROP waits for it.
        self.admin
            .execute(format!("DROP DATABASE {} WITH (FORCE)", self.name).as_str())
            .await
            .unwrap();
    }
}

/// Once idle: the index holds exactly the users and the published posts, as
/// they are in the database, and the cache holds no row that differs from
/// it, nor a key still waiting for its invalidation.
#[cfg(all(feature = "search", feature = "cache"))]
pub(crate) async fn assert_search_and_cache_equal_the_database(cms: &Cms) {
    use app::cache::CacheKey;
    use app::db::{self, Comment, Post, User};

    let state = &cms.state;
    let users: Vec<User> = db::users(&state.db).await.unwrap();
    let posts: Vec<Post> = db::posts(&state.db).await.unwrap();
    let mut indexed: Vec<(String, i64, Option<String>)> = state
        .search
        .all()
        .unwrap()
        .into_iter()
        .map(|hit| (hit.kind.to_owned(), hit.id, hit.title.or(hit.username)))
        .collect();
    indexed.sort();
    let mut expected: Vec<(String, i64, Option<String>)> = users
        .iter()
        .map(|u| ("user".to_owned(), u.id, Some(u.username.clone())))
        .chain(
            posts
                .iter()
                .filter(|p| p.published)
                .map(|p| ("post".to_owned(), p.id, Some(p.title.clone()))),
        )
        .collect();
    expected.sort();
    assert_eq!(indexed, expected);

    for user in &users {
        if let Some(cached) = state.cache.peek::<User>(&CacheKey::User(user.id)) {
            assert_eq!(&cached, user);
        }
    }
    let max_id = posts.iter().map(|p| p.id).max().unwrap_or(0);
    for id in 1..=max_id {
        let row = posts.iter().find(|p| p.id == id);
        let by_id = state.cache.peek::<Post>(&CacheKey::Post(id));
        assert!(
            by_id.is_none() || by_id.as_ref() == row,
            "post {id}: {by_id:?} vs {row:?}"
        );
        if let Some(comments) = state.cache.peek::<Vec<Comment>>(&CacheKey::Comments(id)) {
            assert_eq!(comments, db::comments(&state.db, id).await.unwrap());
        }
    }
    for row in &posts {
        let by_slug = state
            .cache
            .peek::<Post>(&CacheKey::PostSlug(row.slug.clone()));
        assert!(
            by_slug.is_none() || by_slug.as_ref() == Some(row),
            "post {}",
            row.slug
        );
    }
    assert_eq!(state.cache.in_flux(), 0, "keys left in flux once idle");
}
