//! A bounded load driver for the CMS: starts it in-process on SQLite in a
//! temporary directory, seeds 20 users and 200 published posts, then runs
//! `--clients` clients (default 20) for `--seconds` (default 10), each
//! sending 4 reads (a post by id, a post by slug, a search, a comment list)
//! to 1 write (a retitle, or a comment), and prints requests/s, p50 and p99
//! for reads and writes. Then it measures publish-to-searchable: 100 times,
//! it publishes a post with a fresh word and searches until it is found.
//!
//! ```text
//! cargo run --release --example cms-load
//! cargo run --release --example cms-load -- --clients 20 --seconds 10
//! ```
//!
//! Every request goes to 127.0.0.1, and every loop is bounded in count and
//! time.

#[allow(dead_code, unreachable_pub)]
#[path = "app/mod.rs"]
mod app;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

const MAX_CLIENTS: usize = 64;
const MAX_SECONDS: u64 = 60;
/// The most requests one client sends, whatever the duration.
const MAX_REQUESTS: usize = 200_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let clients = arg("--clients").unwrap_or(20).clamp(1, MAX_CLIENTS as u64) as usize;
    let seconds = arg("--seconds").unwrap_or(10).clamp(1, MAX_SECONDS);

    let data = tempfile::tempdir()?;
    let state = app::build(&app::Config {
        data_dir: data.path().to_owned(),
        database_url: std::env::var("DATABASE_URL").ok(),
        nats_url: None,
        hooks: app::hooks::Hooks::default(),
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(60), state.search.ready()).await?;
    let server = app::server::Background::start(state.clone()).await?;
    let url = server.url.clone();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(MAX_CLIENTS)
        .timeout(Duration::from_secs(10))
        .build()?;

    // The data the clients read and write.
    let mut users = Vec::new();
    for n in 0..20 {
        let user = send(http.post(format!("{url}/users")).json(
            &json!({ "username": format!("load{n}"), "email": format!("load{n}@example.com") }),
        ))
        .await?;
        users.push(user["id"].as_i64().unwrap_or_default());
    }
    let mut posts = Vec::new();
    for n in 0..200 {
        let post = send(http.post(format!("{url}/posts")).json(&json!({
            "title": format!("Load test post {n}"),
            "body": format!("Words for the index: alpha beta gamma {n}"),
            "author_id": users[n % users.len()],
        })))
        .await?;
        let id = post["id"].as_i64().unwrap_or_default();
        send(http.post(format!("{url}/posts/{id}/publish"))).await?;
        posts.push((id, post["slug"].as_str().unwrap_or_default().to_owned()));
    }
    state.idle().await?;

    println!(
        "{clients} clients for {seconds}s against {url} (SQLite, release build: {})",
        !cfg!(debug_assertions)
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (http, url, posts, users) =
                (http.clone(), url.clone(), posts.clone(), users.clone());
            tokio::spawn(async move {
                let mut rng = 0x9E37_79B9_7F4A_7C15_u64 ^ (client as u64 + 1);
                let (mut reads, mut writes, mut errors) = (Vec::new(), Vec::new(), 0_u64);
                for n in 0..MAX_REQUESTS {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let (id, slug) = &posts[(next(&mut rng) as usize) % posts.len()];
                    let request = match n % 5 {
                        0 => http.get(format!("{url}/posts/{id}")),
                        1 => http.get(format!("{url}/posts/{slug}")),
                        2 => http.get(format!("{url}/search?q=gamma")),
                        3 => http.get(format!("{url}/posts/{id}/comments")),
                        _ if next(&mut rng) % 2 == 0 => http
                            .put(format!("{url}/posts/{id}"))
                            .json(&json!({ "title": format!("Retitled by {client} at {n}") })),
                        _ => http
                            .post(format!("{url}/posts/{id}/comments"))
                            .json(&json!({
                                "author_id": users[client % users.len()],
                                "body": format!("comment {n}"),
                            })),
                    };
                    let sent = Instant::now();
                    let ok = match request.send().await {
                        Ok(response) => {
                            response.status().is_success() && response.bytes().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    errors += u64::from(!ok);
                    if n % 5 == 4 { &mut writes } else { &mut reads }.push(sent.elapsed());
                }
                (reads, writes, errors)
            })
        })
        .collect();
    let (mut reads, mut writes, mut errors) = (Vec::new(), Vec::new(), 0);
    for task in tasks {
        let (r, w, e) = task.await?;
        reads.extend(r);
        writes.extend(w);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    report("reads", &mut reads, elapsed);
    report("writes", &mut writes, elapsed);
    println!("  errors: {errors}");

    // Publish-to-searchable, one post at a time while nothing else runs.
    state.idle().await?;
    let mut latencies = Vec::new();
    for n in 0..100 {
        let word = format!("needle{n}x{}", started.elapsed().as_nanos());
        let post =
            send(http.post(format!("{url}/posts")).json(
                &json!({ "title": format!("Find {word}"), "body": "", "author_id": users[0] }),
            ))
            .await?;
        let id = post["id"].as_i64().unwrap_or_default();
        send(http.post(format!("{url}/posts/{id}/publish"))).await?;
        let published = Instant::now();
        let found = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let answer = send(http.get(format!("{url}/search?q={word}"))).await?;
                if answer["hits"]
                    .as_array()
                    .is_some_and(|hits| !hits.is_empty())
                {
                    return Ok::<_, reqwest::Error>(published.elapsed());
                }
            }
        })
        .await;
        match found {
            Ok(Ok(latency)) => latencies.push(latency),
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => println!("  post {id} not searchable within 5s"),
        }
    }
    latencies.sort();
    println!(
        "publish-to-searchable ({} posts): p50 {:.2} ms, p99 {:.2} ms",
        latencies.len(),
        ms(quantile(&latencies, 0.50)),
        ms(quantile(&latencies, 0.99)),
    );
    server.stop().await?;
    let report = state.shutdown(Duration::from_secs(10)).await;
    for l in &report.listeners {
        println!(
            "  listener {}: handled {}, retried {}, dead-lettered {}",
            l.name, l.handled, l.retried, l.dead_lettered
        );
    }
    Ok(())
}

fn arg(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

async fn send(request: reqwest::RequestBuilder) -> Result<Value, reqwest::Error> {
    request.send().await?.error_for_status()?.json().await
}

/// xorshift64: enough to spread the clients over the posts.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(what: &str, samples: &mut [Duration], elapsed: f64) {
    samples.sort();
    println!(
        "  {what}: {} requests, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        samples.len(),
        samples.len() as f64 / elapsed,
        ms(quantile(samples, 0.50)),
        ms(quantile(samples, 0.99)),
    );
}
