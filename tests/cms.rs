//! The example CMS end to end: a server on an ephemeral port, driven by a
//! real HTTP client. Every wait is on the bus's `quiesce`, with a deadline.
//! The same scenarios run on SQLite and, in CI, on PostgreSQL.

// Built with `--no-default-features`, some helpers serve no test.
#![cfg_attr(not(all(feature = "search", feature = "cache")), allow(dead_code))]

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/cms/app/mod.rs"]
mod app;

use std::sync::Arc;
use std::time::Duration;

use app::events::{AppEvent, AppEventKind};
use app::{AppState, Config};
use event_bus::{Envelope, HandlerError, KindSet, Listener};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Cms {
    url: String,
    http: reqwest::Client,
    state: Arc<AppState>,
    _data: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    cache: Option<String>,
    body: Value,
}

impl Cms {
    /// On SQLite in a fresh data directory.
    async fn start() -> Self {
        Self::start_on(None).await
    }

    async fn start_on(database_url: Option<String>) -> Self {
        let data = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: data.path().to_owned(),
            database_url,
        };
        let state = app::build(&config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(axum::serve(listener, app::router(state.clone())).into_future());
        Self {
            url,
            http: reqwest::Client::new(),
            state,
            _data: data,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status();
        let cache = response
            .headers()
            .get("x-cache")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{status} answer is not JSON: {text}"))
        };
        Answer {
            status,
            cache,
            body,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", self.url)))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(self.http.post(format!("{}{path}", self.url)).json(&body))
            .await
    }

    async fn put(&self, path: &str, body: Value) -> Answer {
        self.send(self.http.put(format!("{}{path}", self.url)).json(&body))
            .await
    }

    async fn delete(&self, path: &str) -> Answer {
        self.send(self.http.delete(format!("{}{path}", self.url)))
            .await
    }

    async fn quiesce(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.state.bus.quiesce())
            .await
            .expect("the bus did not settle within 30s");
    }

    async fn user(&self, username: &str) -> i64 {
        let answer = self
            .post(
                "/users",
                json!({ "username": username, "email": format!("{username}@example.com") }),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.body["id"].as_i64().unwrap()
    }

    async fn new_post(&self, author: i64, title: &str) -> Value {
        let answer = self
            .post(
                "/posts",
                json!({ "title": title, "body": "Lorem ipsum.", "author_id": author }),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.body
    }

    async fn search(&self, query: &str) -> Vec<Value> {
        let answer = self.get(&format!("/search?q={query}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.body["hits"].as_array().unwrap().clone()
    }
}

fn ids(hits: &[Value]) -> Vec<i64> {
    hits.iter().map(|h| h["id"].as_i64().unwrap()).collect()
}

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_then_publish_makes_a_post_searchable() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let post = cms.new_post(ada, "Analytical engines").await;
    let id = post["id"].as_i64().unwrap();
    cms.quiesce().await;
    assert!(cms.search("analytical").await.is_empty(), "unpublished");

    let published = cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    assert_eq!(published.status, StatusCode::OK);
    assert_eq!(published.body["published"], true);
    cms.quiesce().await;

    let hits = cms.search("analytical").await;
    assert_eq!(ids(&hits), [id]);
    assert_eq!(hits[0]["kind"], "post");
    assert_eq!(hits[0]["title"], "Analytical engines");
    assert!(hits[0]["score"].as_f64().unwrap() > 0.0);

    let users = cms.get("/search?q=ada&kind=user").await.body["hits"].clone();
    assert_eq!(users[0]["username"], "ada");
    assert_eq!(users[0]["id"], ada);
    assert!(
        cms.get("/search?q=analytical&kind=user").await.body["hits"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_reaches_search_and_the_cached_read_misses_once_then_hits() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Old title").await["id"].as_i64().unwrap();
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;

    let path = format!("/posts/{id}");
    assert_eq!(cms.get(&path).await.cache.as_deref(), Some("miss"));
    assert_eq!(cms.get(&path).await.cache.as_deref(), Some("hit"));

    let updated = cms.put(&path, json!({ "title": "Brand new words" })).await;
    assert_eq!(updated.status, StatusCode::OK);
    cms.quiesce().await;

    let fresh = cms.get(&path).await;
    assert_eq!(fresh.cache.as_deref(), Some("miss"));
    assert_eq!(fresh.body["title"], "Brand new words");
    let again = cms.get(&path).await;
    assert_eq!(again.cache.as_deref(), Some("hit"));
    assert_eq!(again.body["title"], "Brand new words");
    // Also by slug, which stays as it was made.
    assert_eq!(
        cms.get("/posts/old-title").await.body["title"],
        "Brand new words"
    );

    assert_eq!(ids(&cms.search("brand").await), [id]);
    assert!(cms.search("old").await.is_empty());
}

#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_a_post_from_search_and_cache() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Ephemeral").await["id"].as_i64().unwrap();
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;
    let path = format!("/posts/{id}");
    cms.get(&path).await;
    assert_eq!(cms.get(&path).await.cache.as_deref(), Some("hit"));
    assert_eq!(cms.get("/posts/ephemeral").await.status, StatusCode::OK);

    assert_eq!(cms.delete(&path).await.status, StatusCode::NO_CONTENT);
    cms.quiesce().await;

    assert_eq!(cms.get(&path).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        cms.get("/posts/ephemeral").await.status,
        StatusCode::NOT_FOUND
    );
    assert!(cms.search("ephemeral").await.is_empty());
}

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublished_posts_are_never_searchable() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let draft = cms.new_post(ada, "Secret draft").await["id"]
        .as_i64()
        .unwrap();
    cms.put(
        &format!("/posts/{draft}"),
        json!({ "body": "still secret" }),
    )
    .await;
    cms.quiesce().await;
    assert!(cms.search("secret").await.is_empty());
}

#[cfg(feature = "cache")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comment_events_invalidate_the_comment_list() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let post = cms.new_post(ada, "Discuss").await["id"].as_i64().unwrap();
    let path = format!("/posts/{post}/comments");
    assert_eq!(cms.get(&path).await.cache.as_deref(), Some("miss"));
    let cached = cms.get(&path).await;
    assert_eq!(cached.cache.as_deref(), Some("hit"));
    assert_eq!(cached.body, json!([]));

    let comment = cms
        .post(&path, json!({ "author_id": ada, "body": "First!" }))
        .await;
    assert_eq!(comment.status, StatusCode::CREATED);
    cms.quiesce().await;
    let listed = cms.get(&path).await;
    assert_eq!(listed.cache.as_deref(), Some("miss"));
    assert_eq!(listed.body[0]["body"], "First!");
    assert_eq!(cms.get(&path).await.cache.as_deref(), Some("hit"));

    let comment_id = comment.body["id"].as_i64().unwrap();
    assert_eq!(
        cms.delete(&format!("/comments/{comment_id}")).await.status,
        StatusCode::NO_CONTENT
    );
    cms.quiesce().await;
    let listed = cms.get(&path).await;
    assert_eq!(listed.cache.as_deref(), Some("miss"));
    assert_eq!(listed.body, json!([]));
}

/// Fails on every post it hears about.
struct Faulty;

impl Listener<AppEvent> for Faulty {
    fn name(&self) -> &str {
        "faulty"
    }

    fn interests(&self) -> KindSet<AppEventKind> {
        AppEventKind::PostCreated.into()
    }

    async fn handle(
        &self,
        _: Arc<Envelope<AppEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        Err("injected fault".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_listener_leaves_the_response_unchanged_and_shows_in_metrics() {
    let cms = Cms::start().await;
    cms.state.bus.spawn(Faulty);
    let ada = cms.user("ada").await;

    let created = cms.new_post(ada, "Still created").await;
    cms.quiesce().await;
    let id = created["id"].as_i64().unwrap();
    let stored = cms.get(&format!("/posts/{id}")).await;
    assert_eq!(stored.body, created);

    let metrics = cms.get("/metrics").await.body;
    let faulty = metrics["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "faulty")
        .unwrap();
    assert_eq!(faulty["failed"], 1);
    assert_eq!(faulty["dead_lettered"], 1);
    assert_eq!(metrics["emitted"].as_u64().unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_status_and_a_json_error() {
    bad_input_scenario(&Cms::start().await).await;
}

async fn bad_input_scenario(cms: &Cms) {
    let ada = cms.user("ada").await;
    cms.new_post(ada, "Taken title").await;

    let cases = [
        (
            cms.post(
                "/posts",
                json!({ "title": "  ", "body": "", "author_id": ada }),
            )
            .await,
            422,
            Some("title"),
        ),
        (
            cms.post(
                "/users",
                json!({ "username": "bob", "email": "not-an-email" }),
            )
            .await,
            422,
            Some("email"),
        ),
        (
            cms.post(
                "/users",
                json!({ "username": "Bob Smith", "email": "b@example.com" }),
            )
            .await,
            422,
            Some("username"),
        ),
        (
            cms.post(
                "/posts",
                json!({ "title": "T", "body": "", "author_id": 999 }),
            )
            .await,
            422,
            Some("author_id"),
        ),
        (
            cms.post("/posts", json!({ "title": "T" })).await,
            422,
            Some("body"),
        ),
        (
            cms.post(
                "/users",
                json!({ "username": "ada", "email": "a@example.com" }),
            )
            .await,
            409,
            None,
        ),
        (
            cms.post(
                "/posts",
                json!({ "title": "Taken title", "body": "", "author_id": ada }),
            )
            .await,
            409,
            None,
        ),
        (cms.delete(&format!("/users/{ada}")).await, 409, None),
        (cms.get("/users/999").await, 404, None),
        (cms.get("/users/not-a-number").await, 404, None),
        (cms.get("/posts/999").await, 404, None),
        (cms.get("/posts/no-such-slug").await, 404, None),
        (
            cms.put("/posts/999", json!({ "title": "x" })).await,
            404,
            None,
        ),
        (cms.post("/posts/999/publish", json!({})).await, 404, None),
        (
            cms.post(
                "/posts/999/comments",
                json!({ "author_id": ada, "body": "hi" }),
            )
            .await,
            404,
            None,
        ),
        (cms.delete("/comments/999").await, 404, None),
        (cms.get("/nowhere").await, 404, None),
        (
            cms.send(
                cms.http
                    .post(format!("{}/users", cms.url))
                    .header("content-type", "application/json")
                    .body("{\"username\": "),
            )
            .await,
            400,
            None,
        ),
        (cms.get("/search").await, 400, None),
        (cms.get("/search?q=x&kind=robot").await, 400, None),
    ];
    for (i, (answer, status, field)) in cases.into_iter().enumerate() {
        assert_eq!(answer.status.as_u16(), status, "case {i}: {}", answer.body);
        assert!(
            answer.body["error"].is_string(),
            "case {i}: {}",
            answer.body
        );
        if let Some(field) = field {
            assert_eq!(answer.body["field"], field, "case {i}: {}", answer.body);
        }
    }
}

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_search_query_is_a_400() {
    let cms = Cms::start().await;
    let answer = cms.get("/search?q=title:(").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(
        answer.body["error"]
            .as_str()
            .unwrap()
            .contains("cannot parse")
    );
}

#[cfg(not(feature = "search"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_search_feature_search_answers_501() {
    let cms = Cms::start().await;
    let answer = cms.get("/search?q=anything").await;
    assert_eq!(answer.status, StatusCode::NOT_IMPLEMENTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer_json() {
    let cms = Cms::start().await;
    assert_eq!(cms.get("/health").await.body, json!({ "status": "ok" }));
    let metrics = cms.get("/metrics").await.body;
    let names: Vec<&str> = metrics["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    let mut expected = Vec::new();
    if cfg!(feature = "search") {
        expected.push("search");
    }
    if cfg!(feature = "cache") {
        expected.push("cache");
    }
    assert_eq!(names, expected);
}

/// 200 writes, most of them concurrent and racing reads that fill the cache;
/// once the bus is quiet, the index and the cache agree with every row.
#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_writes_leaves_search_and_cache_consistent() {
    burst_scenario(&Cms::start().await).await;
}

#[cfg(all(feature = "search", feature = "cache"))]
async fn burst_scenario(cms: &Cms) {
    use app::cache::CacheKey;
    use app::db::{self, Comment, Post, User};
    use futures::future::join_all;

    let mut writes = 0;

    // 20 users, then 60 posts, each read twice as it is written.
    let users = join_all((0..20).map(|i| cms.user_named(i))).await;
    writes += users.len();
    let posts: Vec<Value> = join_all((0..60).map(|i| {
        let cms = &cms;
        let author = users[i % users.len()];
        async move {
            let post = cms.new_post(author, &format!("Post number {i}")).await;
            let id = post["id"].as_i64().unwrap();
            cms.get(&format!("/posts/{id}")).await;
            cms.get(&format!("/posts/{}", post["slug"].as_str().unwrap()))
                .await;
            post
        }
    }))
    .await;
    writes += posts.len();
    let post_ids: Vec<i64> = posts.iter().map(|p| p["id"].as_i64().unwrap()).collect();

    // 120 more writes of every kind, all at once, each racing a read of what
    // it changes.
    let mut burst = Vec::new();
    for (n, &id) in post_ids.iter().enumerate() {
        let cms = &cms;
        let author = users[n % users.len()];
        let slug = posts[n]["slug"].as_str().unwrap().to_owned();
        if n < 40 {
            burst.push(Box::pin(async move {
                cms.post(&format!("/posts/{id}/publish"), json!({})).await;
                cms.get(&format!("/posts/{slug}")).await;
            })
                as std::pin::Pin<Box<dyn Future<Output = ()>>>);
        }
        if n % 3 != 0 {
            burst.push(Box::pin(async move {
                cms.put(
                    &format!("/posts/{id}"),
                    json!({ "title": format!("Retitled {n}") }),
                )
                .await;
                cms.get(&format!("/posts/{id}")).await;
            }));
        }
        if (40..60).contains(&n) && n % 2 == 0 {
            burst.push(Box::pin(async move {
                cms.delete(&format!("/posts/{id}")).await;
                cms.get(&format!("/posts/{id}")).await;
            }));
        }
        if n < 20 {
            burst.push(Box::pin(async move {
                let path = format!("/posts/{id}/comments");
                cms.post(
                    &path,
                    json!({ "author_id": author, "body": format!("comment {n}") }),
                )
                .await;
                cms.get(&path).await;
            }));
        }
    }
    for &user in users.iter().take(10) {
        let cms = &cms;
        burst.push(Box::pin(async move {
            cms.put(
                &format!("/users/{user}"),
                json!({ "email": format!("new{user}@example.com") }),
            )
            .await;
            cms.get(&format!("/users/{user}")).await;
        }));
    }
    writes += burst.len();
    assert_eq!(writes, 200);
    join_all(burst).await;
    cms.quiesce().await;

    let state = &cms.state;
    let users: Vec<User> = db::users(&state.db).await.unwrap();
    let posts: Vec<Post> = db::posts(&state.db).await.unwrap();
    let burst_posts: Vec<&Post> = posts.iter().filter(|p| post_ids.contains(&p.id)).collect();
    assert_eq!(burst_posts.len(), 50, "ten posts were deleted");
    assert_eq!(burst_posts.iter().filter(|p| p.published).count(), 40);

    // The index holds exactly the users and the published posts, as they are.
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

    // The cache holds no row that differs from the database.
    for user in &users {
        if let Some(cached) = state.cache.peek::<User>(&CacheKey::User(user.id)) {
            assert_eq!(&cached, user);
        }
    }
    for &id in &post_ids {
        let row = posts.iter().find(|p| p.id == id);
        let by_id = state.cache.peek::<Post>(&CacheKey::Post(id));
        assert!(
            by_id.is_none() || by_id.as_ref() == row,
            "post {id}: {by_id:?} vs {row:?}"
        );
        if let Some(row) = row {
            let by_slug = state
                .cache
                .peek::<Post>(&CacheKey::PostSlug(row.slug.clone()));
            assert!(
                by_slug.is_none() || by_slug.as_ref() == Some(row),
                "post {}",
                row.slug
            );
            if let Some(comments) = state.cache.peek::<Vec<Comment>>(&CacheKey::Comments(id)) {
                assert_eq!(comments, db::comments(&state.db, id).await.unwrap());
            }
        }
    }
}

impl Cms {
    async fn user_named(&self, i: usize) -> i64 {
        let id = self.user(&format!("user{i}")).await;
        self.get(&format!("/users/{id}")).await;
        id
    }
}

/// The scenarios above on PostgreSQL, in a database made for the run.
#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL on 127.0.0.1:5432 (run by .ci/run)"]
async fn the_scenarios_pass_on_postgresql() {
    use sqlx::Executor;

    let server = std::env::var("CMS_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    let name = format!("cms_test_{}", std::process::id());
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
        .await
        .unwrap();
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();

    let cms = Cms::start_on(Some(format!("{server}/{name}"))).await;
    bad_input_scenario(&cms).await;
    burst_scenario(&cms).await;

    cms.state.db.close().await;
    // FORCE: a server process can outlive its closed client connection by
    // more than the 5 seconds a plain DROP waits for it.
    admin
        .execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
        .await
        .unwrap();
}
