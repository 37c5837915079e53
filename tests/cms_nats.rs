//! The CMS across processes: two instances on one PostgreSQL database and
//! one nats-server (each test's own), each with its own data directory,
//! search index and cache. The outbox is relayed into JetStream; the
//! welcome mailer, a group listener, handles each new user once across
//! both; each cache hears of the other's writes. Ignored in a plain
//! `cargo test`: `.ci/run` runs it with the servers.

#![cfg(all(feature = "search", feature = "cache"))]

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/cms/app/mod.rs"]
mod app;

mod cms_support;

#[allow(dead_code)]
#[path = "nats_tier/server.rs"]
mod server;

use std::collections::HashMap;
use std::time::Duration;

use cms_support::{Cms, Postgres};
use reqwest::StatusCode;
use serde_json::{Value, json};
use server::NatsServer;

const DEADLINE: Duration = Duration::from_secs(60);

/// Asks `ask` until `done` holds of its answer, or panics naming `what`
/// after [`DEADLINE`]; what it waits for happens in other tasks and on
/// servers.
async fn eventually<T, F: Future<Output = T>>(
    what: &str,
    mut ask: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let answer = ask().await;
        if done(&answer) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{what} did not happen within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn notifications(cms: &Cms) -> Vec<Value> {
    let answer = cms.get("/notifications").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    answer.body["notifications"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and PostgreSQL"]
async fn two_processes_share_the_welcome_mailer_and_hear_each_others_writes() {
    let server = NatsServer::start();
    let database = Postgres::create("cms_nats").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = |dir: &std::path::Path| {
        let mut config = cms_support::config_in(dir, Some(database.url.clone()));
        config.nats_url = Some(server.url());
        config
    };
    let a = Cms::launch(&config(dir_a.path())).await;
    let b = Cms::launch(&config(dir_b.path())).await;
    a.index_ready().await;
    b.index_ready().await;
    assert_ne!(a.state.instance, b.state.instance);

    // New users on both: each gets one welcome, from either process.
    let mut users = Vec::new();
    for n in 0..15 {
        users.push(a.user(&format!("ada{n}")).await);
        users.push(b.user(&format!("bob{n}")).await);
    }
    let sent = eventually(
        "a welcome for each new user",
        || notifications(&a),
        |sent| sent.len() >= users.len(),
    )
    .await;
    let mut per_user: HashMap<i64, usize> = HashMap::new();
    for notification in &sent {
        *per_user
            .entry(notification["user_id"].as_i64().unwrap())
            .or_default() += 1;
        let by = notification["handled_by"].as_str().unwrap();
        assert!(
            by == a.state.instance || by == b.state.instance,
            "handled by {by}"
        );
    }
    let mut welcomed: Vec<i64> = per_user.keys().copied().collect();
    welcomed.sort_unstable();
    let mut expected = users.clone();
    expected.sort_unstable();
    assert_eq!(welcomed, expected, "each new user welcomed");
    assert!(per_user.values().all(|&n| n == 1), "{per_user:?}");
    // One group: what the two mailers handled is each user once (a
    // redelivery would be handled again, and write nothing).
    let handled: u64 = [&a, &b]
        .iter()
        .map(|cms| {
            cms.state
                .listeners
                .distributed_named("welcome-mailer")
                .expect("the mailer runs on JetStream")
                .report()
                .handled
        })
        .sum();
    assert!(handled >= users.len() as u64, "{handled}");

    // A post written on A, read through B's cache, then changed on A: B's
    // cache hears of it (without NATS, B would answer the old title from
    // its cache).
    let post = a.new_post(users[0], "First title").await;
    let id = post["id"].as_i64().unwrap();
    let publish = a.post(&format!("/posts/{id}/publish"), json!({})).await;
    assert_eq!(publish.status, StatusCode::OK, "{}", publish.text);
    let path = format!("/posts/{id}");
    let cached = eventually(
        "B to cache the post",
        || b.get(&path),
        |answer| answer.cache.as_deref() == Some("hit"),
    )
    .await;
    assert_eq!(cached.body["title"], "First title");
    let changed = a
        .put(&format!("/posts/{id}"), json!({ "title": "Second title" }))
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.text);
    eventually(
        "B to answer the new title",
        || b.get(&path),
        |answer| answer.body["title"] == "Second title",
    )
    .await;
    // Each search index, its own, holds what the other process wrote.
    eventually(
        "B's index to find the post A changed",
        || b.search("second"),
        |hits| hits.iter().any(|hit| hit["id"] == id),
    )
    .await;
    eventually(
        "A's index to find a user B created",
        || a.search("bob3"),
        |hits| !hits.is_empty(),
    )
    .await;

    let health = b.get("/health").await;
    let tiers: Vec<&str> = health.body["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["tier"].as_str())
        .collect();
    assert!(tiers.contains(&"jetstream"), "{}", health.text);

    let (report_a, report_b) = tokio::join!(a.stop(), b.stop());
    for report in [&report_a, &report_b] {
        let mailer = report.listener("welcome-mailer").unwrap();
        assert_eq!(mailer.dead_lettered, 0);
        let relay = report.listener("nats-relay").unwrap();
        assert_eq!(relay.dead_lettered, 0);
    }
    database.drop_now().await;
}

/// Promise (`/admin/dead-letters`, admin.rs): with `NATS_URL`, the dead
/// letters of the listeners on JetStream are listed beside the database's
/// (`tier: "jetstream"`), and the redrive hands them to their listener
/// again: a welcome the mailer gave up on (its table was away for a
/// while) is sent once the table is back and the letter redriven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and PostgreSQL"]
async fn the_mailers_dead_letters_on_jetstream_are_listed_and_redriven() {
    use sqlx::Executor;

    let server = NatsServer::start();
    let database = Postgres::create("cms_nats_dead").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = cms_support::config_in(dir.path(), Some(database.url.clone()));
    config.nats_url = Some(server.url());
    let cms = Cms::launch(&config).await;
    cms.index_ready().await;

    cms.state
        .db
        .execute("ALTER TABLE notifications RENAME TO notifications_away")
        .await
        .unwrap();
    let user = cms.user("ada").await;
    let letters = eventually(
        "the mailer's dead letter",
        || cms.get("/admin/dead-letters"),
        |answer| {
            answer.body["dead_letters"]
                .as_array()
                .is_some_and(|letters| !letters.is_empty())
        },
    )
    .await;
    let letters = letters.body["dead_letters"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["tier"], "jetstream");
    assert_eq!(letter["listener"], "welcome-mailer");
    assert_eq!(letter["event"], "user.created");
    assert_eq!(letter["attempts"], 6);
    assert!(letter["id"].is_string(), "{letter}");

    cms.state
        .db
        .execute("ALTER TABLE notifications_away RENAME TO notifications")
        .await
        .unwrap();
    let redriven = cms.post("/admin/dead-letters/redrive", json!({})).await;
    assert_eq!(redriven.status, StatusCode::OK, "{}", redriven.text);
    assert_eq!(redriven.body["redriven"], 1);
    let sent = eventually(
        "the redriven welcome",
        || notifications(&cms),
        |sent| !sent.is_empty(),
    )
    .await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["user_id"].as_i64(), Some(user));
    let letters = cms.get("/admin/dead-letters").await;
    assert_eq!(letters.body["dead_letters"], json!([]), "{}", letters.text);

    cms.stop().await;
    database.drop_now().await;
}
