//! The CMS search listener indexing post events: in batches, as the CMS
//! runs it, against one event (and one index commit) at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use event_bus::{EventBus, ListenerOptions};

use crate::app::db;
use crate::app::events::{AppEvent, PostEventData};
use crate::app::hooks::Hooks;
use crate::app::search::{SearchIndex, SearchIndexer};

/// A database of `posts` published posts, shared by the runs.
pub(crate) struct Fixture {
    _data: tempfile::TempDir,
    db: sqlx::AnyPool,
    posts: Vec<PostEventData>,
}

impl Fixture {
    pub(crate) async fn new(posts: usize) -> Self {
        let data = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}?mode=rwc", data.path().join("cms.db").display());
        let db = db::connect(&url).await.expect("database");
        let author = db::insert_user(&db, "author", "author@example.com")
            .await
            .expect("author");
        // One transaction: the setup is not what is measured.
        let mut tx = db.begin().await.expect("transaction");
        let mut events = Vec::with_capacity(posts);
        for n in 0..posts {
            let slug = format!("post-{n}");
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO posts (author_id, title, slug, body, published, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, 1, 0, 0) RETURNING id",
            )
            .bind(author.id)
            .bind(format!("Post number {n} about event buses"))
            .bind(&slug)
            .bind("A body long enough to give the tokenizer some work: typed events, listeners, batches and priorities.")
            .fetch_one(&mut *tx)
            .await
            .expect("insert post");
            events.push(PostEventData { id, slug });
        }
        tx.commit().await.expect("commit");
        Self {
            _data: data,
            db,
            posts: events,
        }
    }

    /// Emits a `post.published` per post to a fresh index's listener with
    /// `max_batch`, and times until the last is indexed.
    pub(crate) async fn index(&self, max_batch: usize) -> Duration {
        let dir = tempfile::tempdir().expect("index directory");
        let index = Arc::new(SearchIndex::open(dir.path(), Hooks::default()).expect("index"));
        let bus = EventBus::new();
        let indexer = SearchIndexer {
            db: self.db.clone(),
            index: index.clone(),
        };
        // Room for the whole burst: what is measured is indexing, not lag.
        let options = ListenerOptions::new()
            .max_batch(max_batch)
            .capacity(self.posts.len());
        let handle = bus.spawn_with(indexer, options);
        let started = Instant::now();
        for post in &self.posts {
            bus.emit(AppEvent::PostPublished(post.clone()));
        }
        bus.quiesce().await;
        let took = started.elapsed();
        let metrics = handle.metrics();
        assert_eq!(metrics.handled, self.posts.len() as u64, "{metrics:?}");
        assert_eq!(index.all().expect("documents").len(), self.posts.len());
        took
    }
}
