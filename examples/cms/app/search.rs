//! Full-text search (feature `search`): a tantivy index in the data
//! directory, kept in step with the database by a durable batch listener
//! that re-reads each row it is told about and writes a whole batch in one
//! index commit. Without the feature, `GET /search` answers 501; the
//! handlers are the same.
//!
//! The index is rebuilt by replaying the store's log: an index that is
//! empty or unreadable (deleted first) is filled again from the log's first
//! event; until the listener has caught up with the log as it was then,
//! searches answer from the database. Queries are bounded before they are
//! parsed, and run on the blocking pool, a few at a time, under a deadline.

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

/// What a search found, and where it looked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Found {
    pub(crate) hits: Vec<Hit>,
    /// `"index"`, or `"database"` while the index is being built.
    pub(crate) source: &'static str,
}

/// What to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    All,
    Users,
    Posts,
}

/// The most characters, terms and parenthesis depth of a query.
pub(crate) const MAX_QUERY_CHARS: usize = 256;
pub(crate) const MAX_QUERY_TERMS: usize = 16;
pub(crate) const MAX_QUERY_DEPTH: usize = 8;

/// Refuses a query too long, too deep or with too many terms for the
/// parser, before it sees it: a deep query would exhaust its stack, a wide
/// one hold a thread for seconds.
pub(crate) fn bounded(query: &str) -> Result<&str, ApiError> {
    let query = query.trim();
    if query.is_empty() {
        return Err(ApiError::BadRequest("missing search query `q`".into()));
    }
    if query.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::BadRequest(format!(
            "a search query may have {MAX_QUERY_CHARS} characters at most"
        )));
    }
    // Parentheses inside a quoted phrase are text, not nesting; with a quote
    // left open the parser may read them as nesting after all.
    let deepest = match nesting(query, true) {
        Some(deepest) => deepest,
        None => nesting(query, false).unwrap_or(0),
    };
    if deepest > MAX_QUERY_DEPTH {
        return Err(ApiError::BadRequest(format!(
            "a search query may nest parentheses {MAX_QUERY_DEPTH} deep at most"
        )));
    }
    let terms = terms(query);
    if terms > MAX_QUERY_TERMS {
        return Err(ApiError::BadRequest(format!(
            "a search query may have {MAX_QUERY_TERMS} terms at most"
        )));
    }
    Ok(query)
}

/// How deep `query`'s parentheses nest, those in quotes left out if
/// `skip_quoted`; `None` if a quote is left open then.
fn nesting(query: &str, skip_quoted: bool) -> Option<usize> {
    let (mut depth, mut deepest, mut quoted, mut escaped) = (0_usize, 0_usize, false, false);
    for c in query.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' if skip_quoted => quoted = !quoted,
            '(' if !quoted => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' if !quoted => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    (!quoted).then_some(deepest)
}

/// The words a query searches for, as the tokenizer will split them: runs of
/// letters and digits (`a,b,c` is three, quoted or not), but not the
/// operators `AND`, `OR`, `NOT` nor a field name before `:`.
fn terms(query: &str) -> usize {
    let mut terms = 0;
    let mut rest = query;
    while let Some(start) = rest.find(char::is_alphanumeric) {
        rest = &rest[start..];
        let end = rest
            .find(|c: char| !c.is_alphanumeric())
            .unwrap_or(rest.len());
        let (word, after) = rest.split_at(end);
        if !after.starts_with(':') && !matches!(word, "AND" | "OR" | "NOT") {
            terms += 1;
        }
        rest = after;
    }
    terms
}

impl AppState {
    /// Searches users and published posts.
    ///
    /// # Errors
    ///
    /// 400 for a query too big or that the parser rejects; 503 when the
    /// server is too busy to search in time; 501 without the `search`
    /// feature.
    pub(crate) async fn search(&self, query: &str, scope: Scope) -> Result<Found, ApiError> {
        let query = bounded(query)?;
        #[cfg(feature = "search")]
        return self.search.search(&self.db, query, scope).await;
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
    use std::time::Duration;

    use event_bus::sql::{AnyStore, DurableListener};
    use event_bus::{Batch, BatchError, BatchListener, HandlerError, KindSet};
    use sqlx::AnyPool;
    use tantivy::collector::TopDocs;
    use tantivy::query::{BooleanQuery, Occur, Query, QueryParser, TermQuery};
    use tantivy::schema::{Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TEXT, Value};
    use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term, doc};
    use tokio::sync::{Semaphore, watch};

    use super::*;
    use crate::app::db::{self, Post, User};
    use crate::app::events::{AppEvent, AppEventKind};
    use crate::app::hooks::Hooks;

    const LIMIT: usize = 20;
    /// Searches run at once; more wait, up to [`SEARCH_DEADLINE`].
    const SEARCHES: usize = 4;
    const SEARCH_DEADLINE: Duration = Duration::from_secs(2);

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
    /// reloaded after every commit so a search right after the store is
    /// idle sees it.
    pub(crate) struct SearchIndex {
        index: Index,
        reader: IndexReader,
        writer: Mutex<IndexWriter>,
        fields: Fields,
        /// Whether it must be filled again from the log: it was empty or
        /// unreadable when opened.
        needs_replay: bool,
        ready: watch::Sender<bool>,
        searches: Arc<Semaphore>,
        /// Where the replay and the searches wait, if a test says so.
        hooks: Hooks,
        /// In the tests: how many row reads fail next, as a database blip
        /// would.
        #[cfg(test)]
        pub(crate) failing_reads: std::sync::atomic::AtomicU32,
    }

    fn internal(error: impl std::error::Error + Send + Sync + 'static) -> ApiError {
        ApiError::Internal(Box::new(error))
    }

    /// A search that fails on what the query asks for is the client's
    /// mistake: tantivy parses `title:*` as an `ExistsQuery`, which fails
    /// only when it runs, as no field of the index is a fast field.
    fn refused_or_internal(error: tantivy::TantivyError) -> ApiError {
        use tantivy::TantivyError::{FieldNotFound, InvalidArgument, SchemaError};
        match error {
            SchemaError(_) | InvalidArgument(_) | FieldNotFound(_) => {
                ApiError::BadRequest(format!("cannot run search query: {error}"))
            }
            other => internal(other),
        }
    }

    impl SearchIndex {
        /// Opens the index in `dir`, or, if it cannot be read, deletes it and
        /// starts an empty one. An index opened empty (new, deleted, or
        /// unreadable) [needs a replay](Self::needs_replay) and is not ready
        /// until it is done; any other is ready at once.
        pub(crate) fn open(dir: &Path, hooks: Hooks) -> tantivy::Result<Self> {
            match Self::open_in(dir, hooks.clone()) {
                Ok(index) => Ok(index),
                Err(error) => {
                    tracing::warn!(%error, dir = %dir.display(), "search index unreadable; rebuilding it from the event log");
                    std::fs::remove_dir_all(dir)?;
                    Self::open_in(dir, hooks)
                }
            }
        }

        fn open_in(dir: &Path, hooks: Hooks) -> tantivy::Result<Self> {
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
            // An empty index may be a new one or one whose files were
            // deleted: either way only a replay can tell what it should
            // hold, and replaying into an index that is rightly empty costs
            // little.
            let needs_replay = reader.searcher().num_docs() == 0;
            Ok(Self {
                index,
                reader,
                writer: Mutex::new(writer),
                fields,
                needs_replay,
                ready: watch::Sender::new(!needs_replay),
                searches: Arc::new(Semaphore::new(SEARCHES)),
                hooks,
                #[cfg(test)]
                failing_reads: std::sync::atomic::AtomicU32::new(0),
            })
        }

        /// Whether the index holds every row (searches use it).
        pub(crate) fn is_ready(&self) -> bool {
            *self.ready.borrow()
        }

        /// Whether the index was opened empty, to be filled from the log's
        /// first event.
        pub(crate) fn needs_replay(&self) -> bool {
            self.needs_replay
        }

        /// Makes the index ready once `listener`, replaying, has read the
        /// log up to where it ends now: every row an event named by then is
        /// in the index as it was read then or later, and what comes after
        /// is the listener's ordinary lag. Until then searches answer from
        /// the database.
        pub(crate) fn ready_once_replayed(
            self: &Arc<Self>,
            store: AnyStore<AppEvent>,
            listener: DurableListener,
        ) {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = caught_up(&store, listener.group()) => {
                        tracing::info!(documents = this.documents(), "search index ready");
                        this.ready.send_replace(true);
                    }
                    // Stopped first (shutdown): the next start replays.
                    () = listener.finished() => {}
                }
            });
        }

        /// Waits until the index is ready, for the tests.
        #[allow(dead_code)]
        pub(crate) async fn ready(&self) {
            let mut ready = self.ready.subscribe();
            // The sender lives as long as `self`.
            let _ = ready.wait_for(|ready| *ready).await;
        }

        /// Runs `change` on the writer, commits, and reloads the reader, off
        /// the async threads.
        async fn write(
            self: &Arc<Self>,
            change: impl FnOnce(&mut IndexWriter, &Fields) -> tantivy::Result<()> + Send + 'static,
        ) -> tantivy::Result<()> {
            let this = self.clone();
            let task = tokio::task::spawn_blocking(move || {
                let mut writer = this.writer.lock().unwrap_or_else(|e| e.into_inner());
                change(&mut writer, &this.fields)?;
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
            if changes.is_empty() {
                return Ok(());
            }
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

        /// The row's state as the index should show it.
        async fn current(&self, db: &AnyPool, row: Row) -> Result<Option<Current>, HandlerError> {
            #[cfg(test)]
            if self
                .failing_reads
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                )
                .is_ok()
            {
                return Err("injected database failure".into());
            }
            Ok(match row {
                Row::User(id) => db::user(db, id).await?.map(Current::User),
                Row::Post(id) => db::post(db, id)
                    .await?
                    .filter(|post| post.published)
                    .map(Current::Post),
            })
        }

        pub(crate) async fn search(
            self: &Arc<Self>,
            db: &AnyPool,
            text: &str,
            scope: Scope,
        ) -> Result<Found, ApiError> {
            if !self.is_ready() {
                return search_database(db, text, scope).await;
            }
            let busy = || ApiError::Unavailable("search is busy; try again".into());
            let work = async {
                let permit = self
                    .searches
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(internal)?;
                let this = self.clone();
                let text = text.to_owned();
                // The permit goes with the blocking work: a search past its
                // deadline answers 503 but runs on to its end (tantivy has no
                // way to stop it), and holds its slot until then, so that no
                // more than SEARCHES run at once.
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    if let Some(gate) = &this.hooks.search {
                        gate.pass_blocking();
                    }
                    this.search_now(&text, scope)
                })
                .await
                .map_err(internal)?
            };
            let hits = tokio::time::timeout(SEARCH_DEADLINE, work)
                .await
                .map_err(|_| busy())??;
            Ok(Found {
                hits,
                source: "index",
            })
        }

        fn search_now(&self, text: &str, scope: Scope) -> Result<Vec<Hit>, ApiError> {
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
                .map_err(refused_or_internal)?;
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

        /// Documents in the index, for `/health`.
        pub(crate) fn documents(&self) -> u64 {
            self.reader.searcher().num_docs()
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
    }

    /// How often the replay's progress is read.
    const REPLAY_POLL: Duration = Duration::from_millis(20);

    /// Returns once `group`'s checkpoint has reached the log's end as it was
    /// at the first look.
    async fn caught_up(store: &AnyStore<AppEvent>, group: &str) {
        let mut end = None;
        loop {
            match store.progress().await {
                Ok(progress) => {
                    if let Some(p) = progress.iter().find(|p| p.listener == group) {
                        let end = *end.get_or_insert(p.checkpoint + p.lag);
                        if p.checkpoint >= end {
                            return;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "could not read the search replay's progress; trying again");
                }
            }
            // The store tells no one when a checkpoint moves; its own
            // `idle` looks again the same way.
            tokio::time::sleep(REPLAY_POLL).await;
        }
    }

    /// The search while the index is not ready: a plain `LIKE` over the
    /// query's words, newest first, score 0.
    async fn search_database(db: &AnyPool, text: &str, scope: Scope) -> Result<Found, ApiError> {
        let terms: Vec<String> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|t| !t.is_empty() && !matches!(*t, "AND" | "OR" | "NOT"))
            .map(str::to_lowercase)
            .collect();
        let mut hits = Vec::new();
        if terms.is_empty() {
            return Ok(Found {
                hits,
                source: "database",
            });
        }
        let limit = LIMIT as i64;
        if scope != Scope::Posts {
            hits.extend(
                db::find_users(db, &terms, limit)
                    .await?
                    .into_iter()
                    .map(|u| Hit {
                        kind: "user",
                        id: u.id,
                        title: None,
                        username: Some(u.username),
                        score: 0.0,
                    }),
            );
        }
        if scope != Scope::Users {
            hits.extend(
                db::find_posts(db, &terms, limit)
                    .await?
                    .into_iter()
                    .map(|p| Hit {
                        kind: "post",
                        id: p.id,
                        title: Some(p.title),
                        username: None,
                        score: 0.0,
                    }),
            );
        }
        hits.truncate(LIMIT);
        Ok(Found {
            hits,
            source: "database",
        })
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
    /// retried with backoff; a failed commit fails the batch. An event still
    /// failing after the last attempt is a dead delivery, kept by the store
    /// until it is redriven (`/admin/dead-letters`).
    ///
    /// A durable listener with a group of its own per data directory (see
    /// `app::build`): the index is a local directory, so each instance must
    /// see every event, and the log is what rebuilds it.
    pub(crate) struct SearchIndexer {
        pub(crate) db: AnyPool,
        pub(crate) index: Arc<SearchIndex>,
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
            // While the index is filled again, a test may hold the replay
            // here, before it writes anything.
            if !self.index.is_ready() {
                if let Some(gate) = &self.index.hooks.rebuild {
                    gate.pass().await;
                }
            }
            let mut changes = Vec::with_capacity(rows.len());
            let mut failed: Option<BatchError> = None;
            for (row, positions) in rows {
                match self.index.current(&self.db, row).await {
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
