//! The example CMS end to end: a server on an ephemeral port, driven by a
//! real HTTP client. Every wait is on a condition (the writes done, the
//! store's `idle`, the index ready), with a deadline. The same scenarios
//! run on SQLite and, in CI, on PostgreSQL.

// Built with `--no-default-features`, some helpers serve no test.
#![cfg_attr(not(all(feature = "search", feature = "cache")), allow(dead_code))]

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/cms/app/mod.rs"]
mod app;

mod cms_support;

use std::sync::Arc;
#[cfg(feature = "search")]
use std::time::Duration;

use app::events::{AppEvent, AppEventKind};
#[cfg(feature = "search")]
use app::hooks::Gate;
use cms_support::{Answer, Cms};
#[cfg(all(feature = "search", feature = "cache"))]
use cms_support::{Postgres, assert_search_and_cache_equal_the_database};
use event_bus::sql::Durable;
use event_bus::{Envelope, HandlerError, KindSet, Listener, ListenerOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Each answer has its status and a JSON `error`, and names the field
/// where one is given.
fn assert_json_errors(cases: impl IntoIterator<Item = (Answer, u16, Option<&'static str>)>) {
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

/// `text` as a query string value: spaces and parentheses escaped.
fn encoded(text: &str) -> String {
    text.replace(' ', "%20")
        .replace('(', "%28")
        .replace(')', "%29")
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
    cms.state
        .spawn(Faulty, ListenerOptions::new(), Durable::new())
        .await
        .unwrap();
    let ada = cms.user("ada").await;

    let created = cms.new_post(ada, "Still created").await;
    cms.quiesce().await;
    let id = created["id"].as_i64().unwrap();
    let stored = cms.get(&format!("/posts/{id}")).await;
    assert_eq!(stored.body, created);

    let metrics = cms.get("/metrics/json").await.body;
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
    assert_json_errors(cases);
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
async fn health_reports_the_database_and_each_listener() {
    let cms = Cms::start().await;
    let health = cms.get("/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["status"], "ok", "{}", health.body);
    assert_eq!(health.body["database"]["ok"], true);
    let listeners = health.body["listeners"].as_array().unwrap();
    let names: Vec<&str> = listeners
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    // The welcome mailer runs with or without search and cache.
    let mut expected = vec!["welcome-mailer"];
    if cfg!(feature = "search") {
        expected.push("search");
        assert_eq!(health.body["search_index"]["ready"], true);
    }
    if cfg!(feature = "cache") {
        expected.push("cache");
    }
    assert_eq!(names, expected);
    for listener in listeners {
        assert_eq!(listener["status"], "running");
        assert_eq!(listener["lagging"], false);
        assert_eq!(listener["failing"], false);
        assert_eq!(listener["dead_letters"], 0);
    }

    // A listener with a dead letter makes the service degraded, not down.
    cms.state
        .spawn(Faulty, ListenerOptions::new(), Durable::new())
        .await
        .unwrap();
    let ada = cms.user("ada").await;
    cms.new_post(ada, "Fails once").await;
    cms.quiesce().await;
    let health = cms.get("/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["status"], "degraded");
    let faulty = health.body["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "faulty")
        .unwrap()
        .clone();
    assert_eq!(faulty["failing"], true);
    assert_eq!(faulty["dead_letters"], 1);

    // The database gone: 503, and says so.
    cms.state.db.close().await;
    let health = cms.get("/health").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.body["status"], "down");
    assert_eq!(health.body["database"]["ok"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_prometheus_text_and_json() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    cms.get(&format!("/users/{ada}")).await;
    cms.quiesce().await;

    let response = cms
        .http
        .get(format!("{}/metrics", cms.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    assert!(
        text.contains("# TYPE event_bus_emitted_total counter"),
        "{text}"
    );
    assert!(
        text.contains("event_bus_emitted_total{event=\"user.created\"}"),
        "{text}"
    );
    assert!(
        text.contains(
            "cms_http_requests_total{route=\"/users/{id}\",method=\"GET\",status=\"200\"}"
        ),
        "{text}"
    );
    if cfg!(feature = "search") {
        assert!(
            text.contains("event_bus_handled_total{listener=\"search\"}"),
            "{text}"
        );
    }

    let metrics = cms.get("/metrics/json").await.body;
    let names: Vec<&str> = metrics["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    let mut expected = vec!["welcome-mailer"];
    if cfg!(feature = "search") {
        expected.push("search");
    }
    if cfg!(feature = "cache") {
        expected.push("cache");
    }
    assert_eq!(names, expected);
    assert_eq!(metrics["emitted"], 1);
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
    use app::db::{self, Post};
    use futures::StreamExt;
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
    // 20 clients at a time.
    futures::stream::iter(burst)
        .buffer_unordered(20)
        .collect::<Vec<()>>()
        .await;
    cms.quiesce().await;
    assert_search_and_cache_equal_the_database(cms).await;

    let posts: Vec<Post> = db::posts(&cms.state.db).await.unwrap();
    let burst_posts: Vec<&Post> = posts.iter().filter(|p| post_ids.contains(&p.id)).collect();
    assert_eq!(burst_posts.len(), 50, "ten posts were deleted");
    assert_eq!(burst_posts.iter().filter(|p| p.published).count(), 40);
    let (listeners, error) = cms.state.listener_states().await;
    assert_eq!(error, None);
    for listener in &listeners {
        assert_eq!(listener.dropped, 0, "{listener:?}");
        assert_eq!(listener.lag, Some(0), "{listener:?}");
        assert_eq!(listener.dead_lettered, 0, "{listener:?}");
    }
}

impl Cms {
    async fn user_named(&self, i: usize) -> i64 {
        let id = self.user(&format!("user{i}")).await;
        self.get(&format!("/users/{id}")).await;
        id
    }
}

#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_clients_hang_up_still_reach_search_and_cache() {
    disconnect_scenario(&Cms::start().await).await;
}

/// Clients give up on their writes after 1 to 20 ms, mid-request; every
/// write the server committed still reaches the index and the cache.
#[cfg(all(feature = "search", feature = "cache"))]
async fn disconnect_scenario(cms: &Cms) {
    use futures::StreamExt;

    let ada = cms.user("hangup").await;
    let mut ids = Vec::new();
    for n in 0..10 {
        let id = cms.new_post(ada, &format!("Steady {n}")).await["id"]
            .as_i64()
            .unwrap();
        cms.post(&format!("/posts/{id}/publish"), json!({})).await;
        // Cached, so a lost invalidation would show.
        cms.get(&format!("/posts/{id}")).await;
        ids.push(id);
    }
    cms.quiesce().await;

    let gave_up = futures::stream::iter(0..100_u64)
        .map(|n| {
            let id = ids[n as usize % ids.len()];
            let request = cms
                .http
                .put(format!("{}/posts/{id}", cms.url))
                .json(&json!({ "title": format!("Moved {n}") }))
                .timeout(Duration::from_millis(1 + n % 20));
            async move { request.send().await.is_err() }
        })
        .buffer_unordered(20)
        .filter(|gave_up| std::future::ready(*gave_up))
        .count()
        .await;
    assert!(gave_up > 0, "no client hung up; the test proves nothing");

    cms.quiesce().await;
    assert_search_and_cache_equal_the_database(cms).await;
    for id in ids {
        let read = cms.get(&format!("/posts/{id}")).await;
        let row = app::db::post(&cms.state.db, id).await.unwrap().unwrap();
        assert_eq!(read.body["title"], row.title.as_str());
    }
}

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_or_huge_search_query_is_a_400_and_the_server_stays_up() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Nested words").await["id"]
        .as_i64()
        .unwrap();
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;

    let deep = format!("{}nested{}", "(".repeat(400), ")".repeat(400));
    let nine = format!("{}nested{}", "(".repeat(9), ")".repeat(9));
    let wide = vec!["nested"; 17].join(" OR ");
    let long = "a".repeat(257);
    // Words joined by commas are terms too.
    let commas = vec!["nested"; 17].join(",");
    for query in [&deep, &nine, &wide, &long, &commas] {
        let answer = cms
            .send(
                cms.http
                    .get(format!("{}/search?q={}", cms.url, encoded(query))),
            )
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
        assert!(answer.body["error"].as_str().unwrap().contains("at most"));
    }
    // At the bounds, it searches.
    let eight = format!("{}nested{}", "(".repeat(8), ")".repeat(8));
    let sixteen = vec!["nested"; 16].join(" OR ");
    // Parentheses inside a phrase are text, not nesting.
    let quoted = format!("\"{}nested{}\"", "(".repeat(9), ")".repeat(9));
    for query in [&eight, &sixteen, &quoted] {
        let answer = cms
            .send(
                cms.http
                    .get(format!("{}/search?q={}", cms.url, encoded(query))),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(ids(answer.body["hits"].as_array().unwrap()), [id]);
    }
    assert_eq!(cms.get("/health").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn races_with_deletes_answer_4xx_never_500() {
    race_scenario(&Cms::start().await).await;
}

/// A comment racing the deletion of its post, and a post racing the
/// deletion of its author: each answer is a success or the 4xx that says
/// what happened, and the database holds no orphan.
async fn race_scenario(cms: &Cms) {
    use futures::future::join_all;

    let ada = cms.user("racer").await;
    let posts: Vec<i64> =
        join_all((0..30).map(|n| async move { cms.new_post(ada, &format!("Race {n}")).await }))
            .await
            .iter()
            .map(|p| p["id"].as_i64().unwrap())
            .collect();
    let outcomes = join_all(posts.iter().map(|&id| async move {
        let (comments, post) = (format!("/posts/{id}/comments"), format!("/posts/{id}"));
        let comment = cms.post(&comments, json!({ "author_id": ada, "body": "me first" }));
        let delete = cms.delete(&post);
        let (comment, delete) = tokio::join!(comment, delete);
        (comment, delete)
    }))
    .await;
    for (comment, delete) in outcomes {
        assert!(
            [StatusCode::CREATED, StatusCode::NOT_FOUND].contains(&comment.status),
            "comment: {} {}",
            comment.status,
            comment.body
        );
        assert!(comment.body.is_object(), "{}", comment.body);
        assert_eq!(delete.status, StatusCode::NO_CONTENT, "{}", delete.body);
    }

    let authors: Vec<(i64, String)> = join_all((0..30).map(|n| async move {
        let name = format!("doomed{n}");
        (cms.user(&name).await, name)
    }))
    .await;
    let outcomes = join_all(authors.iter().map(|(id, name)| async move {
        let post = cms.post(
            "/posts",
            json!({ "title": format!("By {name}"), "body": "", "author_id": id }),
        );
        let user = format!("/users/{id}");
        let delete = cms.delete(&user);
        tokio::join!(post, delete)
    }))
    .await;
    for (post, delete) in outcomes {
        match post.status {
            StatusCode::CREATED => {
                assert_eq!(delete.status, StatusCode::CONFLICT, "{}", delete.body)
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                assert_eq!(post.body["field"], "author_id");
                assert_eq!(delete.status, StatusCode::NO_CONTENT, "{}", delete.body);
            }
            other => panic!("post: {other} {}", post.body),
        }
        assert!(delete.text.is_empty() || delete.body["error"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_mistake_is_a_4xx_with_a_json_error() {
    http_mistakes_scenario(&Cms::start().await).await;
}

async fn http_mistakes_scenario(cms: &Cms) {
    let ada = cms.user("careless").await;
    let id = cms.new_post(ada, "Target").await["id"].as_i64().unwrap();
    let url = &cms.url;
    let http = &cms.http;
    let japanese = "語".repeat(10_000);
    let cases = [
        // Wrong method.
        (
            cms.send(http.patch(format!("{url}/posts/{id}"))).await,
            405,
            None,
        ),
        (
            cms.send(http.delete(format!("{url}/posts"))).await,
            405,
            None,
        ),
        // Body over the 1 MiB limit.
        (
            cms.send(
                http.post(format!("{url}/users"))
                    .header("content-type", "application/json")
                    .body(vec![b' '; app::BODY_LIMIT + 1024]),
            )
            .await,
            413,
            None,
        ),
        // URI and headers over their limits.
        (
            cms.send(http.get(format!("{url}/posts/{}", "x".repeat(9000))))
                .await,
            414,
            None,
        ),
        (
            cms.send(
                http.get(format!("{url}/health"))
                    .header("x-big", "y".repeat(20_000)),
            )
            .await,
            431,
            None,
        ),
        // Not JSON.
        (
            cms.send(http.post(format!("{url}/users")).body("username=bob"))
                .await,
            415,
            None,
        ),
        // Text no database column should hold: NUL, other controls.
        (
            cms.post(
                "/posts",
                json!({ "title": "nul\u{0}here", "body": "", "author_id": ada }),
            )
            .await,
            422,
            Some("title"),
        ),
        (
            cms.put(&format!("/posts/{id}"), json!({ "body": "bell\u{7}" }))
                .await,
            422,
            Some("body"),
        ),
        (
            cms.post(
                "/users",
                json!({ "username": "nul", "email": "n\u{0}@example.com" }),
            )
            .await,
            422,
            Some("email"),
        ),
        (
            cms.post(
                &format!("/posts/{id}/comments"),
                json!({ "author_id": ada, "body": "\u{0}" }),
            )
            .await,
            422,
            Some("body"),
        ),
        // Comment length is in characters: 10,000 of them fit, 10,001 not.
        (
            cms.post(
                &format!("/posts/{id}/comments"),
                json!({ "author_id": ada, "body": format!("{japanese}語") }),
            )
            .await,
            422,
            Some("body"),
        ),
        // Both or neither author.
        (
            cms.post("/posts", json!({ "title": "T", "body": "" }))
                .await,
            422,
            Some("author_id"),
        ),
        (
            cms.post(
                "/posts",
                json!({ "title": "T", "body": "", "author": "nobody" }),
            )
            .await,
            422,
            Some("author"),
        ),
        // Paging out of bounds.
        (cms.get("/posts?limit=0").await, 400, None),
        (cms.get("/users?limit=101").await, 400, None),
        (cms.get("/users?after=x").await, 400, None),
    ];
    assert_json_errors(cases);
    let fits = cms
        .post(
            &format!("/posts/{id}/comments"),
            json!({ "author_id": ada, "body": japanese }),
        )
        .await;
    assert_eq!(fits.status, StatusCode::CREATED, "{}", fits.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_titles_get_ascii_slugs_and_a_collision_gets_a_suffix() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let cases = [
        ("Grüße aus Köln", "grusse-aus-koln"),
        ("東京", "dong-jing"),
        ("Hello, World!", "hello-world"),
        ("hello world", "hello-world-2"),
        ("HELLO — WORLD", "hello-world-3"),
        ("Hello world 2", "hello-world-2-2"),
        ("2024", "post-2024"),
        ("!!!", "post"),
        ("???", "post-2"),
    ];
    for (title, slug) in cases {
        let post = cms.new_post(ada, title).await;
        assert_eq!(post["slug"], slug, "{title}");
        let read = cms.get(&format!("/posts/{slug}")).await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.body["title"], title);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_post_route_takes_a_slug_as_well_as_an_id() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let post = cms.new_post(ada, "By slug").await;
    let (id, slug) = (post["id"].as_i64().unwrap(), "by-slug");
    assert_eq!(post["slug"], slug);
    let comments = format!("/posts/{slug}/comments");
    let created = cms
        .post(&comments, json!({ "author_id": ada, "body": "via slug" }))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["post_id"], id);
    let listed = cms.get(&comments).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    assert_eq!(
        listed.body,
        cms.get(&format!("/posts/{id}/comments")).await.body
    );
    assert_eq!(listed.body[0]["body"], "via slug");
    assert_eq!(
        cms.post(&format!("/posts/{slug}/publish"), json!({}))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        cms.delete(&format!("/posts/{slug}")).await.status,
        StatusCode::NO_CONTENT
    );
    for path in [format!("/posts/{slug}"), format!("/posts/{id}"), comments] {
        let answer = cms.get(&path).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert!(answer.body["error"].is_string(), "{path}");
    }
    assert_eq!(
        cms.delete(&format!("/posts/{slug}")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[cfg(feature = "cache")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_read_right_after_a_write_sees_the_write() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let post = cms.new_post(ada, "First words").await;
    let id = post["id"].as_i64().unwrap();
    let slug = post["slug"].as_str().unwrap().to_owned();
    let paths = [format!("/posts/{id}"), format!("/posts/{slug}")];
    let comments = format!("/posts/{id}/comments");
    cms.quiesce().await;

    // Each round: fill the cache, write, read at once (no waiting on the bus).
    for round in 0..20 {
        for path in paths.iter().chain([&comments, &format!("/users/{ada}")]) {
            cms.get(path).await;
            assert_eq!(cms.get(path).await.cache.as_deref(), Some("hit"), "{path}");
        }
        let title = format!("Words {round}");
        assert_eq!(
            cms.put(&paths[0], json!({ "title": title })).await.status,
            StatusCode::OK
        );
        for path in &paths {
            assert_eq!(cms.get(path).await.body["title"], title.as_str(), "{path}");
        }
        let body = format!("comment {round}");
        cms.post(&comments, json!({ "author_id": ada, "body": body }))
            .await;
        let listed = cms.get(&comments).await.body;
        assert_eq!(listed.as_array().unwrap().len(), round + 1);
        let email = format!("ada{round}@example.com");
        cms.put(&format!("/users/{ada}"), json!({ "email": email }))
            .await;
        assert_eq!(
            cms.get(&format!("/users/{ada}")).await.body["email"],
            email.as_str()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_posts_are_listed_a_page_at_a_time() {
    let cms = Cms::start().await;
    let mut users = Vec::new();
    for n in 0..5 {
        users.push(cms.user(&format!("pager{n}")).await);
    }
    for n in 0..5 {
        cms.new_post(users[0], &format!("Page {n}")).await;
    }
    for (path, count) in [("/users", 5), ("/posts", 5)] {
        let mut seen = Vec::new();
        let mut next = Some(format!("{path}?limit=2"));
        let mut pages = 0;
        while let Some(page) = next.take() {
            pages += 1;
            assert!(pages <= 4, "more pages than rows");
            let answer = cms.get(&page).await;
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
            let items = answer.body["items"].as_array().unwrap();
            assert!(items.len() <= 2);
            seen.extend(ids(items));
            next = answer.body["next"].as_str().map(str::to_owned);
        }
        assert_eq!(seen.len(), count);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }
    assert_eq!(
        cms.get("/users").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_walkthrough_works_fresh_after_seed_and_twice() {
    let cms = Cms::start().await;
    walk_through(&cms).await;
    app::welcome::seed(&cms.state).await.unwrap();
    walk_through(&cms).await;
    walk_through(&cms).await;
}

/// Runs the steps `main` prints, as their curl commands would.
#[cfg(all(feature = "search", feature = "cache"))]
async fn walk_through(cms: &Cms) {
    let steps = app::welcome::steps(&cms.state).await.unwrap();
    let mut slug = None;
    for step in &steps {
        let line = step.curl(&cms.url);
        assert!(line.starts_with("curl -s"), "{line}");
        let url = format!("{}{}", cms.url, step.path);
        let mut request = match step.method {
            "GET" => cms.http.get(&url),
            "POST" => cms.http.post(&url),
            other => panic!("unexpected method {other}"),
        };
        if let Some(body) = &step.body {
            request = request.json(body);
        }
        if step.path.starts_with("/search") {
            // As a person types the next command: the bus has caught up.
            cms.quiesce().await;
        }
        let answer = cms.send(request).await;
        assert!(
            answer.status.is_success(),
            "{line}: {} {}",
            answer.status,
            answer.body
        );
        if step.path == "/posts" {
            slug = answer.body["slug"].as_str().map(str::to_owned);
        }
        if step.path.starts_with("/search") {
            let titles: Vec<&str> = answer.body["hits"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|h| h["title"].as_str())
                .collect();
            assert!(titles.contains(&"Hello, events"), "{}", answer.body);
        }
        if step.note.contains("x-cache") {
            assert_eq!(answer.cache.as_deref(), Some("miss"));
            let again = cms.send(cms.http.get(&url)).await;
            assert_eq!(again.cache.as_deref(), Some("hit"));
        }
    }
    let slug = slug.expect("the walk-through creates a post");
    assert!(steps.iter().any(|s| s.path == format!("/posts/{slug}")));
}

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_blip_is_retried_and_leaves_no_dead_letter() {
    use std::sync::atomic::Ordering;

    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Before the blip").await["id"]
        .as_i64()
        .unwrap();
    cms.quiesce().await;
    cms.state.search.failing_reads.store(2, Ordering::Relaxed);
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;

    assert_eq!(ids(&cms.search("blip").await), [id]);
    let search = cms.state.listeners.named("search").unwrap().report();
    assert_eq!(search.retried, 2);
    assert_eq!(search.dead_lettered, 0);
}

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_dead_letter_is_listed_and_redriving_it_indexes_its_row() {
    use std::sync::atomic::Ordering;

    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Outage").await["id"].as_i64().unwrap();
    cms.quiesce().await;
    // Every attempt the listener makes fails; the redriven one works.
    cms.state.search.failing_reads.store(6, Ordering::Relaxed);
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;
    let search = cms.state.listeners.named("search").unwrap().report();
    assert_eq!(search.dead_lettered, 1);
    // The store keeps the dead delivery for an operator; nothing repairs
    // the row behind their back.
    assert!(cms.search("outage").await.is_empty());

    let letters = cms.get("/admin/dead-letters").await;
    assert_eq!(letters.status, StatusCode::OK);
    let listed = letters.body["dead_letters"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{}", letters.body);
    assert_eq!(listed[0]["listener"], "search");
    assert_eq!(listed[0]["event"], "post.published");
    assert_eq!(listed[0]["attempts"], 6);
    assert!(listed[0]["error"].as_str().unwrap().contains("injected"));

    let redriven = cms.post("/admin/dead-letters/redrive", json!({})).await;
    assert_eq!(redriven.body["redriven"], 1);
    cms.quiesce().await;
    let letters = cms.get("/admin/dead-letters").await.body;
    assert_eq!(letters["dead_letters"], json!([]));
    assert_eq!(ids(&cms.search("outage").await), [id]);
}

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_index_is_rebuilt_from_the_log_at_start() {
    let data = tempfile::tempdir().unwrap();
    let cms = Cms::start_in(data.path(), None).await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Survivor").await["id"].as_i64().unwrap();
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;
    let report = cms.stop().await;
    assert!(report.drained(), "{report}");

    std::fs::write(data.path().join("search/meta.json"), b"{ not json").unwrap();
    let cms = Cms::start_in(data.path(), None).await;
    let answer = cms.get("/search?q=survivor").await;
    assert_eq!(answer.body["source"], "index");
    assert_eq!(ids(answer.body["hits"].as_array().unwrap()), [id]);
    cms.stop().await;
}

/// While the index is rebuilt at start (replayed from the log, its
/// directory gone), a search answers from the database (`"source":
/// "database"`) and answers right: the published posts that match, newest
/// first, a post published during the build among them, no draft. Once the
/// index is built, searches answer from it, and it holds the post published
/// while the replay was held.
#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_answer_from_the_database_while_the_index_is_rebuilt() {
    let data = tempfile::tempdir().unwrap();
    let cms = Cms::start_in(data.path(), None).await;
    let ada = cms.user("ada").await;
    let engines = cms.new_post(ada, "Analytical engines").await["id"]
        .as_i64()
        .unwrap();
    cms.post(&format!("/posts/{engines}/publish"), json!({}))
        .await;
    cms.new_post(ada, "Analytical drafts").await;
    cms.quiesce().await;
    assert!(cms.stop().await.drained());

    // Restart on that data without the index, the replay held before it
    // writes any.
    std::fs::remove_dir_all(data.path().join("search")).unwrap();
    let rebuild = Gate::closed();
    let mut config = cms_support::config_in(data.path(), None);
    config.hooks.rebuild = Some(rebuild.clone());
    let cms = Cms::launch(&config).await;
    tokio::time::timeout(Duration::from_secs(30), rebuild.arrivals(1))
        .await
        .expect("the replay did not start within 30s");
    let health = cms.get("/health").await;
    assert_eq!(
        health.body["search_index"]["ready"], false,
        "{}",
        health.text
    );

    let answer = cms.get("/search?q=analytical").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["source"], "database", "{}", answer.text);
    let hits = answer.body["hits"].as_array().unwrap();
    assert_eq!(ids(hits), [engines], "{}", answer.text);
    assert_eq!(hits[0]["title"], "Analytical engines");
    let answer = cms.get("/search?q=ada").await;
    assert_eq!(answer.body["source"], "database", "{}", answer.text);
    assert_eq!(answer.body["hits"][0]["username"], "ada", "{}", answer.text);

    let notes = cms.new_post(ada, "Analytical notes").await["id"]
        .as_i64()
        .unwrap();
    cms.post(&format!("/posts/{notes}/publish"), json!({}))
        .await;
    // The search listener is held: wait for the writes only.
    cms.state.writes_done().await;
    let answer = cms.get("/search?q=analytical").await;
    assert_eq!(answer.body["source"], "database", "{}", answer.text);
    assert_eq!(
        ids(answer.body["hits"].as_array().unwrap()),
        [notes, engines],
        "{}",
        answer.text
    );

    rebuild.open();
    cms.index_ready().await;
    // Ready once it has replayed the log as it was at start; the post
    // published while it was held comes after.
    cms.quiesce().await;
    let answer = cms.get("/search?q=analytical").await;
    assert_eq!(answer.body["source"], "index", "{}", answer.text);
    let mut found = ids(answer.body["hits"].as_array().unwrap());
    found.sort_unstable();
    assert_eq!(found, [engines, notes], "{}", answer.text);
    cms.stop().await;
}

/// Searches that hold every slot on the blocking pool answer 503 with a
/// JSON error once their deadline passes, and keep their slots while they
/// run on; meanwhile `/health` answers at once, and the next search, which
/// finds no slot free, answers 503 too. Once they end, searching works
/// again.
#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_with_every_slot_taken_is_a_json_503_and_health_still_answers() {
    // As many as `search::SEARCHES`.
    const SLOTS: usize = 4;
    let data = tempfile::tempdir().unwrap();
    let searches = Gate::closed();
    // A failed assertion must not leave blocking threads held: the
    // runtime's shutdown would wait for them for ever.
    let _open_at_the_end = OpenOnDrop(searches.clone());
    let mut config = cms_support::config_in(data.path(), None);
    config.hooks.search = Some(searches.clone());
    let cms = Cms::launch(&config).await;
    cms.index_ready().await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Busy bees").await["id"].as_i64().unwrap();
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;

    let held: Vec<_> = (0..SLOTS)
        .map(|_| {
            let search = cms.http.get(format!("{}/search?q=busy", cms.url));
            tokio::spawn(search.send())
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(30), searches.arrivals(SLOTS))
        .await
        .expect("the searches did not all start within 30s");
    let health = tokio::time::timeout(Duration::from_secs(1), cms.get("/health"))
        .await
        .expect("/health did not answer within 1s while every search slot was taken");
    assert_eq!(health.status, StatusCode::OK, "{}", health.text);

    let assert_busy = |status: StatusCode, content_type: Option<&str>, body: &Value| {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(content_type, Some("application/json"));
        assert!(body["error"].as_str().unwrap().contains("busy"), "{body}");
    };
    for search in held {
        let answer = tokio::time::timeout(Duration::from_secs(30), search)
            .await
            .expect("a held search did not answer within 30s")
            .unwrap()
            .unwrap();
        let (status, content_type) = (answer.status(), answer.headers().get("content-type"));
        let content_type = content_type.map(|v| v.to_str().unwrap().to_owned());
        let body: Value = answer.json().await.unwrap();
        assert_busy(status, content_type.as_deref(), &body);
    }
    let next = tokio::time::timeout(Duration::from_secs(30), cms.get("/search?q=busy"))
        .await
        .expect("a search with every slot taken did not answer within 30s");
    assert_busy(next.status, next.content_type.as_deref(), &next.body);
    assert_eq!(
        searches.arrived(),
        SLOTS,
        "the next search got a slot: more than {SLOTS} ran at once"
    );

    searches.open();
    let answer = cms.get("/search?q=busy").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["source"], "index", "{}", answer.text);
    assert_eq!(ids(answer.body["hits"].as_array().unwrap()), [id]);
}

/// Opens its gate when dropped.
#[cfg(feature = "search")]
struct OpenOnDrop(Gate);

#[cfg(feature = "search")]
impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_report_lists_each_listener() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    cms.new_post(ada, "Last words").await;
    let report = cms.stop().await;
    let search = report.listener("search").unwrap();
    assert_eq!(search.handled, 1);
    assert_eq!(search.dropped, 0);
    assert_eq!(search.dead_lettered, 0);
    assert_eq!(search.lag, Some(0));
    assert!(report.drained());
}

/// The scenarios above on PostgreSQL, in a database made for the run.
#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL on 127.0.0.1:5432 (run by .ci/run)"]
async fn the_scenarios_pass_on_postgresql() {
    let database = Postgres::create("cms_test").await;
    let cms = Cms::start_on(Some(database.url.clone())).await;
    bad_input_scenario(&cms).await;
    http_mistakes_scenario(&cms).await;
    race_scenario(&cms).await;
    disconnect_scenario(&cms).await;
    burst_scenario(&cms).await;

    database.drop(&cms).await;
}

// ---------------------------------------------------------------------------
// The durable tier: the row and its event commit together; the search
// listener's log survives restarts and refills its index.
// ---------------------------------------------------------------------------

/// How many events the store's log holds.
async fn events_in_the_log(cms: &Cms) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM event_bus_events")
        .fetch_one(&cms.state.db)
        .await
        .unwrap()
}

/// A failure after the row is written (here the event's own insert,
/// refused by a trigger) rolls the row back with its event: a create leaves
/// no post, an update leaves the old title, and the cache marks the writes
/// set are taken back. Without the trigger the same requests commit both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_and_its_event_roll_back_together_on_a_failure_after_the_insert() {
    use sqlx::Executor;

    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Kept title").await["id"]
        .as_i64()
        .unwrap();
    cms.quiesce().await;
    let path = format!("/posts/{id}");
    cms.get(&path).await;
    if cfg!(feature = "cache") {
        assert_eq!(cms.get(&path).await.cache.as_deref(), Some("hit"));
    }
    let before = events_in_the_log(&cms).await;
    cms.state
        .db
        .execute(
            "CREATE TRIGGER refuse_post_events BEFORE INSERT ON event_bus_events \
             WHEN NEW.name LIKE 'post.%' BEGIN SELECT RAISE(ABORT, 'injected'); END",
        )
        .await
        .unwrap();

    let created = cms
        .post(
            "/posts",
            json!({ "title": "Never there", "body": "", "author_id": ada }),
        )
        .await;
    assert_eq!(
        created.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        created.text
    );
    assert!(created.body["error"].is_string(), "{}", created.text);
    let updated = cms.put(&path, json!({ "title": "Never written" })).await;
    assert_eq!(
        updated.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        updated.text
    );
    cms.quiesce().await;

    let posts = app::db::posts(&cms.state.db).await.unwrap();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].title, "Kept title");
    assert_eq!(events_in_the_log(&cms).await, before);
    #[cfg(feature = "cache")]
    assert_eq!(
        cms.state.cache.in_flux(),
        0,
        "a rolled-back write left its marks"
    );
    assert_eq!(cms.get(&path).await.body["title"], "Kept title");

    cms.state
        .db
        .execute("DROP TRIGGER refuse_post_events")
        .await
        .unwrap();
    let updated = cms.put(&path, json!({ "title": "Now written" })).await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text);
    assert_eq!(events_in_the_log(&cms).await, before + 1);
    assert_eq!(cms.get(&path).await.body["title"], "Now written");
}

/// The search index's directory deleted between two runs: the next start
/// replays the search listener's group from the log's first event, and the
/// index holds every user and published post as they are, the edit and the
/// deletion included.
#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_search_index_is_rebuilt_by_replaying_the_log() {
    let data = tempfile::tempdir().unwrap();
    let cms = Cms::start_in(data.path(), None).await;
    let ada = cms.user("ada").await;
    cms.user("grace").await;
    let mut posts = Vec::new();
    for title in ["Replayed engines", "Replayed moths", "Replayed drafts"] {
        posts.push(cms.new_post(ada, title).await["id"].as_i64().unwrap());
    }
    for id in &posts[..2] {
        cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    }
    cms.put(
        &format!("/posts/{}", posts[0]),
        json!({ "title": "Replayed looms" }),
    )
    .await;
    cms.delete(&format!("/posts/{}", posts[1])).await;
    cms.quiesce().await;
    assert!(cms.stop().await.drained());

    std::fs::remove_dir_all(data.path().join("search")).unwrap();
    let cms = Cms::start_in(data.path(), None).await;
    cms.quiesce().await;
    assert_eq!(cms.state.search.documents(), 3, "two users and one post");
    assert_search_and_cache_equal_the_database(&cms).await;
    let answer = cms.get("/search?q=replayed").await;
    assert_eq!(answer.body["source"], "index", "{}", answer.text);
    assert_eq!(ids(answer.body["hits"].as_array().unwrap()), [posts[0]]);
    cms.stop().await;
}

/// A search event that failed every attempt is a dead delivery in the
/// database: after a restart `/admin/dead-letters` still lists it, the
/// index still lacks its row, and a redrive indexes it and empties the
/// list.
#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_delivery_outlives_a_restart_and_is_redriven_through_the_admin_api() {
    use std::sync::atomic::Ordering;

    let data = tempfile::tempdir().unwrap();
    let cms = Cms::start_in(data.path(), None).await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Lazarus").await["id"].as_i64().unwrap();
    cms.quiesce().await;
    cms.state.search.failing_reads.store(6, Ordering::Relaxed);
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;
    cms.stop().await;

    let cms = Cms::start_in(data.path(), None).await;
    let letters = cms.get("/admin/dead-letters").await;
    assert_eq!(letters.status, StatusCode::OK, "{}", letters.text);
    let listed = letters.body["dead_letters"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{}", letters.body);
    assert_eq!(listed[0]["listener"], "search");
    assert_eq!(listed[0]["event"], "post.published");
    assert_eq!(listed[0]["attempts"], 6);
    assert!(listed[0]["error"].as_str().unwrap().contains("injected"));
    let health = cms.get("/health").await;
    assert_eq!(health.body["status"], "degraded", "{}", health.text);
    assert!(cms.search("lazarus").await.is_empty());

    let redriven = cms.post("/admin/dead-letters/redrive", json!({})).await;
    assert_eq!(redriven.body["redriven"], 1, "{}", redriven.text);
    cms.quiesce().await;
    assert_eq!(ids(&cms.search("lazarus").await), [id]);
    let letters = cms.get("/admin/dead-letters").await.body;
    assert_eq!(letters["dead_letters"], json!([]));
    assert_eq!(cms.get("/health").await.body["status"], "ok");
    cms.stop().await;
}

/// A post published while the search listener is stopped is in the log,
/// not the index; the next start goes on from the listener's checkpoint
/// and makes it searchable.
#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_published_while_the_search_listener_is_stopped_is_searchable_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let cms = Cms::start_in(data.path(), None).await;
    let ada = cms.user("ada").await;
    cms.quiesce().await;
    let search = cms.state.listeners.named("search").unwrap();
    search.abort();
    tokio::time::timeout(Duration::from_secs(30), search.finished())
        .await
        .expect("the search listener did not stop within 30s");
    let id = cms.new_post(ada, "Offline words").await["id"]
        .as_i64()
        .unwrap();
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.state.writes_done().await;
    assert!(cms.search("offline").await.is_empty());
    cms.stop().await;

    let cms = Cms::start_in(data.path(), None).await;
    cms.quiesce().await;
    let answer = cms.get("/search?q=offline").await;
    assert_eq!(answer.body["source"], "index", "{}", answer.text);
    assert_eq!(ids(answer.body["hits"].as_array().unwrap()), [id]);
    cms.stop().await;
}

/// Without NATS the welcome mailer is a durable group listener on the
/// store: each new user gets one welcome, even when its event is handed to
/// the mailer again (a replay of its group from the log's start).
#[tokio::test]
async fn each_new_user_is_welcomed_once_even_when_the_mailer_replays() {
    let cms = Cms::start().await;
    let ids = [cms.user("wanda").await, cms.user("walt").await];
    cms.quiesce().await;
    let welcomes = |answer: &Answer| -> Vec<i64> {
        let mut ids: Vec<i64> = answer.body["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                assert_eq!(n["kind"], "welcome");
                assert_eq!(n["handled_by"].as_str(), Some(cms.state.instance.as_str()));
                n["user_id"].as_i64().unwrap()
            })
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(welcomes(&cms.get("/notifications").await), ids);

    let mailer = cms.state.listeners.named("welcome-mailer").unwrap();
    let handled = mailer.report().handled;
    cms.state
        .store
        .replay("welcome-mailer", event_bus::sql::Start::Beginning)
        .await
        .unwrap();
    cms.user("wendy").await;
    cms.quiesce().await;
    // Handed both events again, and the new one: three more handled, one
    // more welcome.
    assert_eq!(mailer.report().handled, handled + 3);
    let after = welcomes(&cms.get("/notifications").await);
    assert_eq!(after.len(), 3, "{after:?}");
    assert_eq!(&after[..2], &ids);
}
