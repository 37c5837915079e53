//! The example CMS: users, posts and comments over an HTTP API, with a
//! search index and a cache kept in sync by events.
//!
//! Request handlers write a row and emit its event in one transaction
//! (`tx.emit_post_published(&post)`, then `state.commit(tx)`: the durable
//! tier's outbox); durable listeners read the events from the database's
//! log, index into tantivy and invalidate the moka cache, re-reading rows
//! from the database.
//!
//! ```text
//! cargo run --example cms                          # SQLite in ./cms-data, port 3000
//! cargo run --example cms -- --seed                # with demo users and posts
//! CMS_ADDR=127.0.0.1:0 cargo run --example cms     # any free port
//! DATABASE_URL=postgres://localhost/cms cargo run --example cms
//! cargo run --example cms --no-default-features    # no search, no cache
//! ```

// Without the search and cache listeners, some payload fields and queries
// have no reader.
#[cfg_attr(not(all(feature = "search", feature = "cache")), allow(dead_code))]
mod app;

use std::net::SocketAddr;
use std::time::Duration;

use app::{AppState, Config};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,tantivy=warn,async_nats=warn".into()),
        )
        .with_target(false)
        .init();

    let config = Config::from_env();
    let state = app::build(&config).await?;
    if std::env::args().any(|arg| arg == "--seed") {
        app::welcome::seed(&state).await?;
        println!("seeded demo users and posts");
    }

    let addr = std::env::var("CMS_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let addr = listener.local_addr()?;
    print_welcome(&state, addr, &config).await?;

    app::server::serve(listener, app::router(state.clone()), async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: finishing requests, then draining the listeners");
    })
    .await;

    // Commits whose clients left may still be running: wait for them, then
    // let each listener handle what the log holds for it.
    let report = state.shutdown(Duration::from_secs(10)).await;
    println!("listeners: {report}");
    println!(
        "  {:<14} {:>9} {:>8} {:>14} {:>12}  status",
        "listener", "handled", "retried", "dead-lettered", "undelivered"
    );
    for l in &report.listeners {
        let undelivered = l.lag.map_or_else(|| "?".to_owned(), |lag| lag.to_string());
        println!(
            "  {:<14} {:>9} {:>8} {:>14} {:>12}  {}",
            l.name, l.handled, l.retried, l.dead_lettered, undelivered, l.status
        );
    }
    Ok(())
}

async fn print_welcome(
    state: &AppState,
    addr: SocketAddr,
    config: &Config,
) -> Result<(), app::error::ApiError> {
    let url = format!("http://{addr}");
    println!(
        "CMS listening on {url} (data in {})",
        config.data_dir.display()
    );
    println!("Try:");
    for step in app::welcome::steps(state).await? {
        println!("  {}", step.curl(&url));
    }
    println!("More: GET /posts, /users (paged: ?after=ID&limit=N), /health, /admin/dead-letters.");
    println!(
        "Metrics: {url}/metrics (Prometheus), {url}/metrics/json. Ctrl-C drains the listeners and exits."
    );
    Ok(())
}
