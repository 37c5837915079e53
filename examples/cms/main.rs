//! The example CMS: users, posts and comments over an HTTP API, with a
//! search index and a cache kept in sync by events.
//!
//! Request handlers only write to the database and emit one event
//! (`state.emit_post_published(&post)`); background listeners index into
//! tantivy and invalidate the moka cache, re-reading rows from the database.
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

use app::posts::{NewPost, create_post, publish_post};
use app::users::{NewUser, create_user};
use app::{AppState, Config};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,tantivy=warn".into()),
        )
        .with_target(false)
        .init();

    let config = Config::from_env();
    let state = app::build(&config).await?;
    if std::env::args().any(|arg| arg == "--seed") {
        seed(&state).await?;
    }

    let addr = std::env::var("CMS_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let addr = listener.local_addr()?;
    print_welcome(addr, &config);

    axum::serve(listener, app::router(state.clone()))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down: draining the event bus");
        })
        .await?;

    let report = state.bus.shutdown(Duration::from_secs(10)).await;
    println!("event bus: {report}");
    Ok(())
}

/// A few users and posts, created through the same code as the API, so their
/// events index and cache them like any other.
async fn seed(state: &AppState) -> Result<(), app::error::ApiError> {
    let posts = [
        (
            "ada",
            "Notes on the Analytical Engine",
            "It weaves algebraic patterns.",
            true,
        ),
        (
            "grace",
            "Debugging the Mark II",
            "We found a moth in relay 70.",
            true,
        ),
        (
            "linus",
            "Just a hobby",
            "It won't be big and professional.",
            false,
        ),
    ];
    for (username, title, body, published) in posts {
        let user = match create_user(
            state,
            NewUser {
                username: username.into(),
                email: format!("{username}@example.com"),
            },
        )
        .await
        {
            Ok(user) => user,
            // Seeded on an earlier run.
            Err(app::error::ApiError::Conflict(_)) => continue,
            Err(error) => return Err(error),
        };
        let post = create_post(
            state,
            NewPost {
                title: title.into(),
                body: body.into(),
                author_id: user.id,
            },
        )
        .await?;
        if published {
            publish_post(state, post.id).await?;
        }
    }
    state.bus.quiesce().await;
    println!("seeded demo users and posts");
    Ok(())
}

fn print_welcome(addr: SocketAddr, config: &Config) {
    let url = format!("http://{addr}");
    println!(
        "CMS listening on {url} (data in {})",
        config.data_dir.display()
    );
    println!("Try:");
    println!(
        "  curl -s -X POST {url}/users -H 'content-type: application/json' -d '{{\"username\":\"alice\",\"email\":\"alice@example.com\"}}'"
    );
    println!(
        "  curl -s -X POST {url}/posts -H 'content-type: application/json' -d '{{\"title\":\"Hello, events\",\"body\":\"First post\",\"author_id\":1}}'"
    );
    println!("  curl -s -X POST {url}/posts/1/publish");
    println!("  curl -s '{url}/search?q=hello'");
    println!("  curl -si {url}/posts/hello-events   # twice: x-cache miss, then hit");
    println!("Metrics: {url}/metrics. Ctrl-C drains the event bus and exits.");
}
