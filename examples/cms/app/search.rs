//! Full-text search (feature `search`): a tantivy index in the data
//! directory, kept in step with the database by a batch listener that
//! re-reads each row it is told about and writes a whole batch in one index
//! commit. Without the feature, `GET /search` answers 501; the handlers are
//! the same.

use serde::Serialize;

use super::AppState;
use super::error::ApiError;

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Hit {
    pub(crate) kind: &'static str,
    pub(crate) id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) username: Option<String>,
    pub(crate) score: f32,
}

/// What to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    All,
    Users,
    Posts,
}

impl AppState {
    /// Searches users and published posts.
    ///
    /// # Errors
    ///
    /// 400 for a query the parser rejects; 501 without the `search` feature.
    pub(crate) async fn search(&self, query: &str, scope: Scope) -> Result<Vec<Hit>, ApiError> {
        #[cfg(feature = "search")]
        return self.search.search(query, scope).await;
        #[cfg(not(feature = "search"))]
        {
            let _ = (query, scope);
            Err(ApiError::SearchDisabled)
        }
    }
}

#[cfg(feature = "search")]
pub(crate) use enabled::{SearchIndex, SearchIndexer};

#[cfg(feature = "search")]
mod enabled {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use event_bus::{Batch, BatchError, BatchListener, HandlerError, KindSet};
    use sqlx::AnyPool;
    use tantivy::collector::TopDocs;
    use tantivy::query::{BooleanQuery, Occur, Query, QueryParser, TermQuery};
    use tantivy::schema::{Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TEXT, Value};
    use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term, doc};

    use super::*;
    use crate::app::db::{self, Post, User};
    use crate::app::events::{AppEvent, AppEventKind};

    const LIMIT: usize = 20;

    struct Fields {
        key: Field,
        kind: Field,
        id: Field,
        title: Field,
        body: Field,
        username: Field,
    }

    fn user_key(id: i64) -> String {
        format!("user:{id}")
    }

    fn post_key(id: i64) -> String {
        format!("post:{id}")
    }

    impl Fields {
        fn user(&self, user: User) -> TantivyDocument {
            doc!(
                self.key => user_key(user.id),
                self.kind => "user",
                self.id => user.id,
                self.username => user.username,
            )
        }

        fn post(&self, post: Post) -> TantivyDocument {
            doc!(
                self.key => post_key(post.id),
                self.kind => "post",
                self.id => post.id,
                self.title => post.title,
                self.body => post.body,
            )
        }
    }

    /// The index: a writer behind a lock (tantivy allows one), and a reader
    /// reloaded after every commit so a search right after `quiesce` sees it.
    pub(crate) struct SearchIndex {
        index: Index,
        reader: IndexReader,
        writer: Mutex<IndexWriter>,
        fields: Fields,
    }

    fn internal(error: impl std::error::Error + Send + Sync + 'static) -> ApiError {
        ApiError::Internal(Box::new(error))
    }

    impl SearchIndex {
        pub(crate) fn open(dir: &Path) -> tantivy::Result<Self> {
            let mut schema = Schema::builder();
            let fields = Fields {
                key: schema.add_text_field("key", STRING),
                kind: schema.add_text_field("kind", STRING | STORED),
                id: schema.add_i64_field("id", INDEXED | STORED),
                title: schema.add_text_field("title", TEXT | STORED),
                body: schema.add_text_field("body", TEXT),
                username: schema.add_text_field("username", TEXT | STORED),
            };
            std::fs::create_dir_all(dir)?;
            let directory = tantivy::directory::MmapDirectory::open(dir)?;
            let index = Index::open_or_create(directory, schema.build())?;
            let reader = index
                .reader_builder()
                .reload_policy(ReloadPolicy::Manual)
                .try_into()?;
            let writer = index.writer_with_num_threads(1, 32_000_000)?;
            Ok(Self {
                index,
                reader,
                writer: Mutex::new(writer),
                fields,
            })
        }

        /// Runs `change` on the writer, commits, and reloads the reader, off
        /// the async threads.
        async fn write(
            self: &Arc<Self>,
            change: impl FnOnce(&IndexWriter, &Fields) -> tantivy::Result<()> + Send + 'static,
        ) -> tantivy::Result<()> {
            let this = self.clone();
            let task = tokio::task::spawn_blocking(move || {
                let mut writer = this.writer.lock().unwrap_or_else(|e| e.into_inner());
                change(&writer, &this.fields)?;
                writer.commit()?;
                this.reader.reload()
            });
            match task.await {
                Ok(result) => result,
                Err(join) => Err(tantivy::TantivyError::InternalError(join.to_string())),
            }
        }

        /// Replaces or removes the document of each row, in one commit.
        async fn apply(self: &Arc<Self>, changes: Vec<Change>) -> tantivy::Result<()> {
            self.write(move |writer, f| {
                for change in changes {
                    writer.delete_term(Term::from_field_text(f.key, &change.row.key()));
                    match change.current {
                        Some(Current::User(user)) => writer.add_document(f.user(user))?,
                        Some(Current::Post(post)) => writer.add_document(f.post(post))?,
                        None => continue,
                    };
                }
                Ok(())
            })
            .await
        }

        pub(crate) async fn search(&self, text: &str, scope: Scope) -> Result<Vec<Hit>, ApiError> {
            let f = &self.fields;
            let parser = QueryParser::for_index(&self.index, vec![f.title, f.body, f.username]);
            let query = parser
                .parse_query(text)
                .map_err(|e| ApiError::BadRequest(format!("cannot parse search query: {e}")))?;
            let kind = match scope {
                Scope::All => None,
                Scope::Users => Some("user"),
                Scope::Posts => Some("post"),
            };
            let query: Box<dyn Query> = match kind {
                None => query,
                Some(kind) => Box::new(BooleanQuery::new(vec![
                    (Occur::Must, query),
                    (
                        Occur::Must,
                        Box::new(TermQuery::new(
                            Term::from_field_text(f.kind, kind),
                            IndexRecordOption::Basic,
                        )),
                    ),
                ])),
            };
            let searcher = self.reader.searcher();
            let top = searcher
                .search(&query, &TopDocs::with_limit(LIMIT).order_by_score())
                .map_err(internal)?;
            let mut hits = Vec::with_capacity(top.len());
            for (score, address) in top {
                let doc: TantivyDocument = searcher.doc(address).map_err(internal)?;
                hits.push(self.hit(&doc, score));
            }
            Ok(hits)
        }

        /// Every document in the index, for the consistency tests.
        #[allow(dead_code)]
        pub(crate) fn all(&self) -> Result<Vec<Hit>, ApiError> {
            let searcher = self.reader.searcher();
            let everything = tantivy::query::AllQuery;
            let total = searcher.num_docs() as usize;
            let top = searcher
                .search(
                    &everything,
                    &TopDocs::with_limit(total.max(1)).order_by_score(),
                )
                .map_err(internal)?;
            top.into_iter()
                .map(|(score, address)| {
                    let doc: TantivyDocument = searcher.doc(address).map_err(internal)?;
                    Ok(self.hit(&doc, score))
                })
                .collect()
        }

        fn hit(&self, doc: &TantivyDocument, score: f32) -> Hit {
            let f = &self.fields;
            let text = |field| {
                doc.get_first(field)
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            };
            Hit {
                kind: match text(f.kind).as_deref() {
                    Some("user") => "user",
                    _ => "post",
                },
                id: doc
                    .get_first(f.id)
                    .and_then(|v| v.as_i64())
                    .unwrap_or_default(),
                title: text(f.title),
                username: text(f.username),
                score,
            }
        }

        /// Brings the index in line with every row: what the bus could not
        /// deliver before a crash is repaired at start.
        pub(crate) async fn rebuild(self: &Arc<Self>, db: &AnyPool) -> Result<(), HandlerError> {
            let users = db::users(db).await?;
            let posts: Vec<Post> = db::posts(db)
                .await?
                .into_iter()
                .filter(|p| p.published)
                .collect();
            self.write(move |writer, f| {
                writer.delete_all_documents()?;
                for user in users {
                    writer.add_document(f.user(user))?;
                }
                for post in posts {
                    writer.add_document(f.post(post))?;
                }
                Ok(())
            })
            .await?;
            Ok(())
        }
    }

    /// A row the index holds a document for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Row {
        User(i64),
        Post(i64),
    }

    impl Row {
        /// The row an event is about, if it is one the index shows.
        fn of(event: &AppEvent) -> Option<Self> {
            match event {
                AppEvent::UserCreated(user)
                | AppEvent::UserUpdated(user)
                | AppEvent::UserDeleted(user) => Some(Row::User(user.id)),
                AppEvent::PostUpdated(post)
                | AppEvent::PostPublished(post)
                | AppEvent::PostDeleted(post) => Some(Row::Post(post.id)),
                AppEvent::PostCreated(_)
                | AppEvent::CommentCreated(_)
                | AppEvent::CommentDeleted(_) => None,
            }
        }

        fn key(self) -> String {
            match self {
                Row::User(id) => user_key(id),
                Row::Post(id) => post_key(id),
            }
        }
    }

    /// What the index should show for a row: its current state, or nothing.
    enum Current {
        User(User),
        Post(Post),
    }

    struct Change {
        row: Row,
        current: Option<Current>,
    }

    /// Keeps the index in step, a batch of events at a time: each row the
    /// batch names is re-read once, so a stale or repeated event indexes the
    /// current state and a deleted or unpublished row leaves the index, and
    /// the whole batch is one index commit.
    ///
    /// A row that cannot be read fails the events that named it, which are
    /// retried; a failed commit fails the batch.
    pub(crate) struct SearchIndexer {
        pub(crate) db: AnyPool,
        pub(crate) index: Arc<SearchIndex>,
    }

    impl SearchIndexer {
        /// The row's state as the index should show it.
        async fn current(&self, row: Row) -> Result<Option<Current>, HandlerError> {
            Ok(match row {
                Row::User(id) => db::user(&self.db, id).await?.map(Current::User),
                Row::Post(id) => db::post(&self.db, id)
                    .await?
                    .filter(|post| post.published)
                    .map(Current::Post),
            })
        }
    }

    impl BatchListener<AppEvent> for SearchIndexer {
        fn name(&self) -> &str {
            "search"
        }

        /// The events [`Row::of`] maps to a row (a draft is not indexed).
        fn interests(&self) -> KindSet<AppEventKind> {
            KindSet::from([
                AppEventKind::UserCreated,
                AppEventKind::UserUpdated,
                AppEventKind::UserDeleted,
                AppEventKind::PostUpdated,
                AppEventKind::PostPublished,
                AppEventKind::PostDeleted,
            ])
        }

        async fn handle_batch(&self, batch: &Batch<AppEvent>) -> Result<(), BatchError> {
            // Each row once, in the order the batch first names it.
            let mut rows: Vec<(Row, Vec<usize>)> = Vec::new();
            let mut seen: HashMap<Row, usize> = HashMap::new();
            for (position, event) in batch.iter().enumerate() {
                let Some(row) = Row::of(event.event()) else {
                    continue;
                };
                let at = *seen.entry(row).or_insert_with(|| {
                    rows.push((row, Vec::new()));
                    rows.len() - 1
                });
                rows[at].1.push(position);
            }
            let mut changes = Vec::with_capacity(rows.len());
            let mut failed: Option<BatchError> = None;
            for (row, positions) in rows {
                match self.current(row).await {
                    Ok(current) => changes.push(Change { row, current }),
                    Err(error) => {
                        let error = BatchError::events(positions, error);
                        failed = Some(match failed {
                            Some(earlier) => earlier.and(error),
                            None => error,
                        });
                    }
                }
            }
            self.index.apply(changes).await?;
            failed.map_or(Ok(()), Err)
        }
    }
}
