//! Review of issue #11: programs that try to break the CMS's promises,
//! against the real HTTP server on 127.0.0.1. Each test names the promise
//! it checks. Every wait polls a condition under a deadline.

#![cfg_attr(not(all(feature = "search", feature = "cache")), allow(dead_code))]

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/cms/app/mod.rs"]
mod app;

mod cms_support;

use std::time::Duration;

use cms_support::{Answer, Cms, Postgres};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

impl Cms {
    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    /// Sends `request` as raw bytes on a fresh connection and reads the
    /// answer until the server closes or `deadline` passes.
    async fn raw(&self, request: &[u8], deadline: Duration) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.addr()).await.unwrap();
        // The server may answer and close before it read everything.
        let _ = stream.write_all(request).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(deadline, stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }
}

/// The status and body of a raw HTTP/1.1 answer.
fn split_raw(answer: &str) -> (u16, String) {
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

/// Every byte but ASCII letters and digits as `%XX`.
fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn assert_json_4xx(what: &str, answer: &Answer) {
    assert!(
        answer.status.is_client_error(),
        "{what}: {} {}",
        answer.status,
        answer.text
    );
    assert!(
        answer.body["error"].is_string(),
        "{what}: {} answered with content-type {:?} and body {:?}, not a JSON error",
        answer.status,
        answer.content_type,
        answer.text
    );
}

// ---------------------------------------------------------------------------
// Promise 3: every client mistake is a 4xx with a JSON body.
// ---------------------------------------------------------------------------

/// A path segment that is not UTF-8 once percent-decoded is a client
/// mistake; axum's `Path<String>` rejection answers 400 in text/plain, which
/// `server::json_errors` leaves alone because it has a content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_path_that_is_not_utf8_is_a_json_4xx() {
    let cms = Cms::start().await;
    for path in [
        "/posts/%FF",
        "/users/%FF",
        "/posts/%C3%28/comments",
        "/comments/%FF",
    ] {
        let answer = cms.get(path).await;
        assert_json_4xx(path, &answer);
    }
    let answer = cms
        .send(
            cms.http
                .put(format!("{}/posts/%FF", cms.url))
                .json(&json!({ "title": "x" })),
        )
        .await;
    assert_json_4xx("PUT /posts/%FF", &answer);
}

/// More than 100 request headers (hyper's default `max_headers`), a few KiB
/// in all: hyper answers 431 itself, with no body, before the router and
/// its JSON limits see the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_many_small_headers_are_a_431_with_a_json_body() {
    let cms = Cms::start().await;
    let mut request = cms.http.get(format!("{}/health", cms.url));
    for n in 0..120 {
        request = request.header(format!("x-h{n}"), "1");
    }
    let answer = cms.send(request).await;
    assert_eq!(answer.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_json_4xx("120 headers of 6 bytes", &answer);
}

/// A request hyper cannot parse (a bad or a repeated Content-Length) never
/// reaches the router: hyper answers a bare 400 itself and closes the
/// connection (the README says so). The reviewer's first version asked for
/// a JSON body, which no code of the CMS can give; this checks what is
/// true: a 400, the connection closed, and the server still answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_malformed_request_is_a_400_and_the_connection_closes() {
    let cms = Cms::start().await;
    for request in [
        &b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"[..],
        &b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
    ] {
        let started = std::time::Instant::now();
        let answer = cms.raw(request, Duration::from_secs(5)).await;
        // `raw` reads until the server closes, or 5 s.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "still open: {answer:?}"
        );
        let (status, _) = split_raw(&answer);
        assert_eq!(status, 400, "{answer:?}");
        assert_eq!(cms.get("/health").await.status, StatusCode::OK);
    }
}

// ---------------------------------------------------------------------------
// Promise 4: a slug collision gets a suffix, never a refusal.
// ---------------------------------------------------------------------------

/// Twenty clients create a post with the same title at once: each gets a
/// slug of its own, `same-title`, `same-title-2`, … (or a random suffix for
/// one that lost the race for the next number three times); none is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_concurrent_creates_of_one_title_all_get_a_slug() {
    one_title_race_scenario(&Cms::start().await).await;
}

/// The same race on PostgreSQL, whose unique-violation errors and
/// isolation differ from SQLite's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL on 127.0.0.1:5432 (run by .ci/run)"]
async fn review_concurrent_creates_of_one_title_all_get_a_slug_on_postgresql() {
    let database = Postgres::create("cms_review_slugs").await;
    let cms = Cms::start_on(Some(database.url.clone())).await;
    one_title_race_scenario(&cms).await;
    database.drop(&cms).await;
}

async fn one_title_race_scenario(cms: &Cms) {
    let ada = cms.user("ada").await;
    let answers = futures::future::join_all((0..20).map(|_| {
        cms.post(
            "/posts",
            json!({ "title": "Same title", "body": "", "author_id": ada }),
        )
    }))
    .await;
    let refused: Vec<String> = answers
        .iter()
        .filter(|a| a.status != StatusCode::CREATED)
        .map(|a| format!("{} {}", a.status, a.text))
        .collect();
    assert!(
        refused.is_empty(),
        "{} of 20 refused: {refused:?}",
        refused.len()
    );
    let mut slugs: Vec<&str> = answers
        .iter()
        .map(|a| a.body["slug"].as_str().unwrap())
        .collect();
    slugs.sort_unstable();
    slugs.dedup();
    assert_eq!(slugs.len(), 20, "{slugs:?}");
    assert!(slugs.contains(&"same-title"), "{slugs:?}");
    for slug in &slugs {
        let suffix = slug.strip_prefix("same-title").unwrap_or("?");
        assert!(
            suffix.is_empty()
                || suffix
                    .strip_prefix('-')
                    .is_some_and(|s| { !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit()) }),
            "{slug} in {slugs:?}"
        );
    }
    // Each slug reads back the post that was given it.
    for answer in &answers {
        let read = cms
            .get(&format!("/posts/{}", answer.body["slug"].as_str().unwrap()))
            .await;
        assert_eq!(read.body["id"], answer.body["id"], "{}", read.text);
    }
}

// ---------------------------------------------------------------------------
// Promise 2: no stall: the header-read timeout.
// ---------------------------------------------------------------------------

/// A client that sends half a request head, then nothing: the server
/// should close the connection after 10 s (`HEADER_READ_TIMEOUT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_half_sent_head_is_cut_off_after_the_header_timeout() {
    let cms = Cms::start().await;
    let started = std::time::Instant::now();
    let answer = cms
        .raw(
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            Duration::from_secs(15),
        )
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(14),
        "still open after {took:?}: {answer:?}"
    );
}

/// A client that connects and sends nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_silent_connection_is_cut_off_after_the_header_timeout() {
    let cms = Cms::start().await;
    let started = std::time::Instant::now();
    let answer = cms.raw(b"", Duration::from_secs(15)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(14),
        "still open after {took:?}: {answer:?}"
    );
}

// ---------------------------------------------------------------------------
// Promise 2 and 3: odd search queries are a 200 or a JSON 400, never a 500,
// and the server stays up.
// ---------------------------------------------------------------------------

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_odd_search_queries_are_never_a_500() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Odd queries here").await["id"]
        .as_i64()
        .unwrap();
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;
    let nots = format!("{}odd", "NOT ".repeat(60));
    let minus = format!("{}odd", "-".repeat(250));
    let plus = format!("{}odd", "+-".repeat(120));
    let commas = vec!["a"; 120].join(",");
    let queries = [
        "*",
        "**",
        "title:*",
        "key:*",
        "id:*",
        "id:5",
        "id:abc",
        "id:>5",
        "id:[1 TO 9]",
        "id:[* TO *]",
        "id:99999999999999999999",
        "title:[a TO z]",
        "title:{a TO z}",
        "nosuch:odd",
        "kind:user",
        "kind:post",
        "key:post:1",
        "\"odd queries\"~5",
        "\"odd qu\"*",
        "title:\"odd\"*",
        "odd*",
        "odd~",
        "odd~2",
        "odd^",
        "odd^abc",
        "odd^1e40",
        "title:/o.*d/",
        "title:/(/",
        "/[/",
        "title:/a{1000}{1000}/",
        "title: IN [odd queries]",
        "IN [a b]",
        "\"",
        "\"odd",
        "odd\\",
        "\\",
        ":",
        "::",
        "title:",
        ":odd",
        "(",
        ")",
        "(odd",
        "odd)",
        ")(",
        "[",
        "]",
        "{",
        "}",
        "^",
        "~",
        "-",
        "+",
        "!",
        "&&",
        "||",
        "AND",
        "OR",
        "NOT",
        "NOT odd",
        "odd AND",
        "AND odd",
        "odd OR OR odd",
        "\u{0}",
        "odd\u{0}",
        "東京",
        "🦀",
        "ǅ",
        "\u{202e}odd",
        "title:(odd queries)",
        "title:(title:(odd))",
        "title:odd^0",
        "id:-1",
        "id:9223372036854775807",
        "id:-9223372036854775808",
        "created_at:1",
        "body:odd",
        "username:ada",
        "title:odd title:here",
        &nots,
        &minus,
        &plus,
        &commas,
    ];
    let mut fives = Vec::new();
    for q in queries {
        let answer = cms
            .send(cms.http.get(format!("{}/search?q={}", cms.url, percent(q))))
            .await;
        if answer.status.is_server_error() || !answer.body.is_object() {
            fives.push(format!("q={q:?}: {} {}", answer.status, answer.text));
        }
    }
    assert_eq!(cms.get("/health").await.status, StatusCode::OK);
    assert!(fives.is_empty(), "{fives:#?}");
}

// ---------------------------------------------------------------------------
// Promise 5: pagination, and odd paging parameters as JSON 400s.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_odd_paging_is_a_json_400_and_pages_cover_every_row() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    for n in 0..3 {
        cms.new_post(ada, &format!("Paged {n}")).await;
    }
    for query in [
        "limit=-1",
        "limit=1e3",
        "limit=",
        "after=",
        "after=1.5",
        "after=-",
        "after=9223372036854775808",
        "limit=99999999999999999999",
        "limit=1&limit=2",
        "foo=1",
        "after=%FF",
    ] {
        for path in ["/posts", "/users"] {
            let answer = cms.get(&format!("{path}?{query}")).await;
            assert_json_4xx(&format!("{path}?{query}"), &answer);
        }
    }
    for (query, count) in [
        ("after=-5", 3),
        ("after=9223372036854775807", 0),
        ("limit=100", 3),
    ] {
        let answer = cms.get(&format!("/posts?{query}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{query}: {}", answer.text);
        assert_eq!(
            answer.body["items"].as_array().unwrap().len(),
            count,
            "{query}"
        );
    }
}

// ---------------------------------------------------------------------------
// Promise 1: after a burst of racing writes on the same rows, once idle,
// search and cache equal the database; races answer 4xx, never 500.
// ---------------------------------------------------------------------------

#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_racing_updates_publishes_and_deletes_of_one_post_stay_consistent() {
    use futures::StreamExt;

    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let mut ids = Vec::new();
    for n in 0..8 {
        let post = cms.new_post(ada, &format!("Contended {n}")).await;
        let id = post["id"].as_i64().unwrap();
        if n % 2 == 0 {
            cms.post(&format!("/posts/{id}/publish"), json!({})).await;
        }
        cms.get(&format!("/posts/{id}")).await;
        cms.get(&format!("/posts/{}", post["slug"].as_str().unwrap()))
            .await;
        ids.push(id);
    }
    cms.quiesce().await;

    // 8 posts x 24 operations, 20 at a time: updates, publishes, reads and,
    // for half the posts, a delete in the middle.
    let ops: Vec<(i64, usize)> = (0..24)
        .flat_map(|k| ids.iter().map(move |&id| (id, k)))
        .collect();
    let bad: Vec<String> = futures::stream::iter(ops)
        .map(|(id, k)| {
            let cms = &cms;
            async move {
                let path = format!("/posts/{id}");
                let answer = match k % 6 {
                    0..=2 => {
                        cms.put(&path, json!({ "title": format!("Title {id} {k}") }))
                            .await
                    }
                    3 => cms.post(&format!("{path}/publish"), json!({})).await,
                    4 if k == 10 && id % 2 == 0 => {
                        cms.send(cms.http.delete(format!("{}{path}", cms.url)))
                            .await
                    }
                    _ => cms.get(&path).await,
                };
                let ok = answer.status.is_success()
                    || (answer.status == StatusCode::NOT_FOUND && answer.body["error"].is_string());
                (!ok).then(|| format!("{path} op {k}: {} {}", answer.status, answer.text))
            }
        })
        .buffer_unordered(20)
        .filter_map(std::future::ready)
        .collect()
        .await;
    assert!(bad.is_empty(), "{bad:#?}");
    cms.quiesce().await;
    cms_support::assert_search_and_cache_equal_the_database(&cms).await;
    // Read-your-writes after the burst: every read answers the row.
    for id in ids {
        let row = app::db::post(&cms.state.db, id).await.unwrap();
        let read = cms.get(&format!("/posts/{id}")).await;
        match row {
            Some(row) => assert_eq!(read.body["title"], row.title.as_str()),
            None => assert_eq!(read.status, StatusCode::NOT_FOUND),
        }
    }
}

// ---------------------------------------------------------------------------
// Promise 5: dead letters, redriven twice.
// ---------------------------------------------------------------------------

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_redrive_twice_redrives_nothing_the_second_time() {
    use std::sync::atomic::Ordering;

    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let id = cms.new_post(ada, "Twice").await["id"].as_i64().unwrap();
    cms.quiesce().await;
    cms.state.search.failing_reads.store(6, Ordering::Relaxed);
    cms.post(&format!("/posts/{id}/publish"), json!({})).await;
    cms.quiesce().await;
    let first = cms.post("/admin/dead-letters/redrive", json!({})).await;
    let second = cms.post("/admin/dead-letters/redrive", json!({})).await;
    assert_eq!(first.body["redriven"], 1, "{}", first.text);
    assert_eq!(second.body["redriven"], 0, "{}", second.text);
    cms.quiesce().await;
    let health = cms.get("/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["status"], "ok", "{}", health.text);
    let hits = cms.get("/search?q=twice").await;
    assert_eq!(hits.body["hits"][0]["id"], id, "{}", hits.text);
}

// ---------------------------------------------------------------------------
// Promise 2 and 3: the body limit without a Content-Length; odd JSON.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_chunked_body_over_the_limit_and_odd_json_are_json_4xx() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let mut request =
        b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        request.extend_from_slice(b"10000\r\n");
        request.extend_from_slice(&[b' '; 0x10000]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = cms.raw(&request, Duration::from_secs(10)).await;
    let (status, text) = split_raw(&answer);
    // The body of a chunked answer: take the JSON out of its chunk.
    let text = text.find('{').map_or(String::new(), |at| {
        let end = text.rfind('}').map_or(text.len(), |e| e + 1);
        text[at..end].to_owned()
    });
    let big = Answer {
        status: StatusCode::from_u16(status.max(100)).unwrap(),
        content_type: None,
        cache: None,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text: answer.lines().next().unwrap_or("").to_owned(),
    };
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", big.text);
    assert_json_4xx("chunked 1.25 MiB", &big);

    let raw = |body: &'static [u8], ct: &'static str| {
        cms.send(
            cms.http
                .post(format!("{}/posts", cms.url))
                .header("content-type", ct)
                .body(body),
        )
    };
    for (what, answer) in [
        (
            "non-UTF-8",
            raw(
                b"{\"title\":\"\xff\",\"body\":\"\",\"author_id\":1}",
                "application/json",
            )
            .await,
        ),
        (
            "lone surrogate",
            raw(
                b"{\"title\":\"\\ud800\",\"body\":\"\",\"author_id\":1}",
                "application/json",
            )
            .await,
        ),
        (
            "wrong type",
            raw(
                b"{\"title\":5,\"body\":\"\",\"author_id\":1}",
                "application/json",
            )
            .await,
        ),
        (
            "extra field",
            raw(
                b"{\"title\":\"a\",\"body\":\"\",\"author_id\":1,\"x\":1}",
                "application/json",
            )
            .await,
        ),
        (
            "missing field",
            raw(b"{\"body\":\"\",\"author_id\":1}", "application/json").await,
        ),
        ("null", raw(b"null", "application/json").await),
        ("array", raw(b"[]", "application/json").await),
        ("empty", raw(b"", "application/json").await),
        (
            "huge id",
            raw(
                b"{\"title\":\"a\",\"body\":\"\",\"author_id\":99999999999999999999}",
                "application/json",
            )
            .await,
        ),
        ("text/json", raw(b"{}", "text/json").await),
        (
            "charset",
            raw(
                b"{\"title\":\"a\",\"body\":\"\",\"author_id\":-1}",
                "application/json; charset=latin1",
            )
            .await,
        ),
    ] {
        assert_json_4xx(what, &answer);
    }
    let _ = ada;
}

// ---------------------------------------------------------------------------
// Promise 4: long and odd titles.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_long_and_odd_titles_get_distinct_readable_slugs() {
    let cms = Cms::start().await;
    let ada = cms.user("ada").await;
    let one_word = "a".repeat(200);
    let emoji = "🦀".repeat(200);
    let spaced = "word ".repeat(40);
    let kanji = "語".repeat(200);
    let mut seen = std::collections::HashSet::new();
    for title in [
        &one_word, &one_word, &emoji, &emoji, &spaced, &spaced, &kanji, &kanji,
    ] {
        let post = cms.new_post(ada, title).await;
        let slug = post["slug"].as_str().unwrap().to_owned();
        assert!(slug.len() <= 90, "{slug}");
        assert!(seen.insert(slug.clone()), "slug {slug} given twice");
        let read = cms.get(&format!("/posts/{slug}")).await;
        assert_eq!(read.status, StatusCode::OK, "{slug}: {}", read.text);
        assert_eq!(read.body["id"], post["id"]);
    }
    for title in ["\u{200b}", "\u{fe0f}", "\u{301}", "—", "-", "ǅ", "ß", "İ"] {
        let answer = cms
            .post(
                "/posts",
                json!({ "title": title, "body": "", "author_id": ada }),
            )
            .await;
        assert!(
            answer.status == StatusCode::CREATED
                || answer.status == StatusCode::UNPROCESSABLE_ENTITY,
            "{title:?}: {} {}",
            answer.status,
            answer.text
        );
    }
}

// ---------------------------------------------------------------------------
// Promise 3 on PostgreSQL: NUL anywhere a client can put text is a JSON 4xx.
// ---------------------------------------------------------------------------

#[cfg(all(feature = "search", feature = "cache"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL on 127.0.0.1:5432 (run by .ci/run)"]
async fn review_nul_and_races_on_postgresql_are_json_4xx() {
    let database = Postgres::create("cms_review").await;
    let cms = Cms::start_on(Some(database.url.clone())).await;

    let ada = cms.user("ada").await;
    let post = cms.new_post(ada, "Target").await;
    let id = post["id"].as_i64().unwrap();
    let cases = [
        (
            "author NUL",
            cms.post(
                "/posts",
                json!({ "title": "t", "body": "", "author": "a\u{0}" }),
            )
            .await,
        ),
        ("slug NUL GET", cms.get("/posts/a%00b").await),
        (
            "slug NUL PUT",
            cms.put("/posts/a%00b", json!({ "title": "x" })).await,
        ),
        (
            "slug NUL publish",
            cms.post("/posts/a%00b/publish", json!({})).await,
        ),
        (
            "title NUL",
            cms.put(&format!("/posts/{id}"), json!({ "title": "a\u{0}" }))
                .await,
        ),
        (
            "email NUL",
            cms.put(&format!("/users/{ada}"), json!({ "email": "a\u{0}@b.c" }))
                .await,
        ),
        (
            "username NUL",
            cms.put(&format!("/users/{ada}"), json!({ "username": "a\u{0}" }))
                .await,
        ),
        (
            "comment NUL",
            cms.post(
                &format!("/posts/{id}/comments"),
                json!({ "author_id": ada, "body": "\u{0}" }),
            )
            .await,
        ),
    ];
    let mut broken = Vec::new();
    for (what, answer) in &cases {
        if !(answer.status.is_client_error() && answer.body["error"].is_string()) {
            broken.push(format!("{what}: {} {}", answer.status, answer.text));
        }
    }
    database.drop(&cms).await;
    assert!(broken.is_empty(), "{broken:#?}");
}

/// A body that never finishes: 408 with a JSON body after 30 s
/// (`REQUEST_TIMEOUT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_body_that_never_ends_is_a_json_408() {
    let cms = Cms::start().await;
    let answer = cms
        .raw(
            b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user",
            Duration::from_secs(40),
        )
        .await;
    let (status, body) = split_raw(&answer);
    assert_eq!(status, 408, "{answer:?}");
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert!(json["error"].is_string(), "{answer:?}");
}
