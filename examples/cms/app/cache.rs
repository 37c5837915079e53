//! The read cache (feature `cache`): reads go through it, and a listener
//! invalidates what each event changes. Without the feature every read is a
//! miss; the handlers are the same.
//!
//! Read-your-writes: a write marks the keys its event will invalidate as in
//! flux when it emits, before it commits ([`Write`](super::write::Write)),
//! and the invalidator clears the mark when it handles the event (a write
//! that does not commit takes its marks back). A read of a key in flux goes
//! to the database and caches nothing, so a client that reads right after
//! its write sees it, even while the invalidator is behind.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::events::AppEvent;

/// What can be cached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum CacheKey {
    User(i64),
    Post(i64),
    PostSlug(String),
    Comments(i64),
}

impl CacheKey {
    /// The cached entries an event makes stale. Creations change nothing
    /// cached: misses are not cached.
    pub(crate) fn stale_after(event: &AppEvent) -> Vec<CacheKey> {
        match event {
            AppEvent::UserCreated(_) | AppEvent::PostCreated(_) => Vec::new(),
            AppEvent::UserUpdated(user) | AppEvent::UserDeleted(user) => {
                vec![CacheKey::User(user.id)]
            }
            AppEvent::PostUpdated(post) | AppEvent::PostPublished(post) => vec![
                CacheKey::Post(post.id),
                CacheKey::PostSlug(post.slug.clone()),
            ],
            AppEvent::PostDeleted(post) => vec![
                CacheKey::Post(post.id),
                CacheKey::PostSlug(post.slug.clone()),
                CacheKey::Comments(post.id),
            ],
            AppEvent::CommentCreated(comment) | AppEvent::CommentDeleted(comment) => {
                vec![CacheKey::Comments(comment.post_id)]
            }
        }
    }
}

/// A read answered from the cache or not: the JSON body plus an `x-cache`
/// header of `hit` or `miss`.
pub(crate) struct Cached<T> {
    pub(crate) value: T,
    pub(crate) hit: bool,
}

impl<T: Serialize> IntoResponse for Cached<T> {
    fn into_response(self) -> Response {
        let status = if self.hit { "hit" } else { "miss" };
        ([("x-cache", status)], Json(self.value)).into_response()
    }
}

impl AppState {
    /// The cached value of `key`, or `load`'s, which is then cached.
    pub(crate) async fn cached<T>(
        &self,
        key: CacheKey,
        load: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<Cached<T>, ApiError>
    where
        T: Clone + Send + Sync + 'static,
    {
        #[cfg(feature = "cache")]
        return self.cache.get_or_load(key, load).await;
        #[cfg(not(feature = "cache"))]
        {
            let _ = key;
            Ok(Cached {
                value: load.await?,
                hit: false,
            })
        }
    }
}

#[cfg(feature = "cache")]
pub(crate) use enabled::{Cache, CacheInvalidator, PeerInvalidator};

#[cfg(feature = "cache")]
mod enabled {
    use std::any::Any;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, MutexGuard};

    use event_bus::{Envelope, HandlerError, KindSet, Listener, Meta};

    use super::*;
    use crate::app::events::AppEventKind;

    type Entry = Arc<dyn Any + Send + Sync>;

    pub(crate) struct Cache {
        entries: moka::sync::Cache<CacheKey, Entry>,
        guard: Mutex<Guard>,
    }

    /// What decides whether a loaded value may be cached; inserts, marks and
    /// invalidations exclude each other through its lock.
    #[derive(Default)]
    struct Guard {
        /// Bumped by every invalidation: a value loaded while it changed may
        /// be stale and is not cached.
        generation: u64,
        /// Keys whose invalidation is on its way, with how many events.
        in_flux: HashMap<CacheKey, usize>,
    }

    impl Guard {
        fn unmark(&mut self, key: &CacheKey) {
            if let Some(count) = self.in_flux.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    self.in_flux.remove(key);
                }
            }
        }
    }

    impl Cache {
        pub(crate) fn new(capacity: u64) -> Self {
            Self {
                entries: moka::sync::Cache::new(capacity),
                guard: Mutex::new(Guard::default()),
            }
        }

        fn guard(&self) -> MutexGuard<'_, Guard> {
            self.guard.lock().unwrap_or_else(|e| e.into_inner())
        }

        pub(crate) async fn get_or_load<T: Clone + Send + Sync + 'static>(
            &self,
            key: CacheKey,
            load: impl Future<Output = Result<T, ApiError>>,
        ) -> Result<Cached<T>, ApiError> {
            let generation = {
                let guard = self.guard();
                if !guard.in_flux.contains_key(&key) {
                    if let Some(entry) = self.entries.get(&key) {
                        if let Ok(value) = entry.downcast::<T>() {
                            return Ok(Cached {
                                value: T::clone(&value),
                                hit: true,
                            });
                        }
                    }
                }
                guard.generation
            };
            let value = load.await?;
            let guard = self.guard();
            if guard.generation == generation && !guard.in_flux.contains_key(&key) {
                self.entries.insert(key, Arc::new(value.clone()));
            }
            drop(guard);
            Ok(Cached { value, hit: false })
        }

        /// Marks the keys `event` will invalidate: until the invalidator
        /// handles it, reads of them bypass the cache.
        pub(crate) fn expect(&self, event: &AppEvent) {
            let keys = CacheKey::stale_after(event);
            if keys.is_empty() {
                return;
            }
            let mut guard = self.guard();
            for key in keys {
                *guard.in_flux.entry(key).or_default() += 1;
            }
        }

        /// Drops the entries `event` made stale and clears their marks.
        fn invalidate(&self, event: &AppEvent) {
            let keys = CacheKey::stale_after(event);
            let mut guard = self.guard();
            guard.generation += 1;
            for key in keys {
                self.entries.invalidate(&key);
                guard.unmark(&key);
            }
        }

        /// Drops the entries `event` made stale, leaving the marks alone:
        /// for an event another process committed (or this one, heard
        /// again), which no mark of this process waits for.
        fn drop_stale(&self, event: &AppEvent) {
            let keys = CacheKey::stale_after(event);
            let mut guard = self.guard();
            guard.generation += 1;
            for key in keys {
                self.entries.invalidate(&key);
            }
        }

        /// Takes back the marks of [`expect`](Self::expect): the write that
        /// emitted `event` did not commit, so no invalidation will come.
        pub(crate) fn unexpect(&self, event: &AppEvent) {
            let keys = CacheKey::stale_after(event);
            if keys.is_empty() {
                return;
            }
            let mut guard = self.guard();
            for key in keys {
                guard.unmark(&key);
            }
        }

        /// The cached value of `key`, for the consistency tests.
        #[allow(dead_code)]
        pub(crate) fn peek<T: Clone + Send + Sync + 'static>(&self, key: &CacheKey) -> Option<T> {
            let entry = self.entries.get(key)?;
            entry.downcast::<T>().ok().map(|value| T::clone(&value))
        }

        /// How many keys wait for their invalidation, for `/health`.
        pub(crate) fn in_flux(&self) -> usize {
            self.guard().in_flux.len()
        }
    }

    /// Invalidates the entries each event changes. It cannot fail, so it
    /// loses an event only if the bus drops it, which its backpressure
    /// policy (see `app::build`) prevents for what the handlers emit.
    ///
    /// It runs on this process's bus, not on the durable tier: the cache is
    /// this process's memory, so what matters is that the invalidation of
    /// this process's writes reaches it at once (a durable listener would
    /// come a claim and a finish later, and then again for every event
    /// redelivered), and a crash, the one thing that loses what the bus
    /// holds, empties the cache too. Writes of other processes on the same
    /// database reach it through [`PeerInvalidator`], with `NATS_URL`.
    pub(crate) struct CacheInvalidator(pub Arc<Cache>);

    /// Invalidates the entries each event of any process changes: an
    /// instance listener on JetStream (with `NATS_URL`), so every process
    /// hears every write, whichever process committed it. It cannot tell
    /// this process's own writes from the others', and invalidates those a
    /// second time, late, which costs a miss; it leaves the marks of this
    /// process's writes to [`CacheInvalidator`].
    pub(crate) struct PeerInvalidator(pub Arc<Cache>);

    impl Listener<AppEvent> for PeerInvalidator {
        fn name(&self) -> &str {
            "cache-peers"
        }

        fn interests(&self) -> KindSet<AppEventKind> {
            Listener::interests(&CacheInvalidator(self.0.clone()))
        }

        async fn handle(
            &self,
            envelope: Arc<Envelope<AppEvent>>,
            _: Meta,
        ) -> Result<(), HandlerError> {
            self.0.drop_stale(envelope.event());
            Ok(())
        }
    }

    impl Listener<AppEvent> for CacheInvalidator {
        fn name(&self) -> &str {
            "cache"
        }

        fn interests(&self) -> KindSet<AppEventKind> {
            KindSet::from([
                AppEventKind::UserUpdated,
                AppEventKind::UserDeleted,
                AppEventKind::PostUpdated,
                AppEventKind::PostPublished,
                AppEventKind::PostDeleted,
                AppEventKind::CommentCreated,
                AppEventKind::CommentDeleted,
            ])
        }

        async fn handle(
            &self,
            envelope: Arc<Envelope<AppEvent>>,
            _: Meta,
        ) -> Result<(), HandlerError> {
            self.0.invalidate(envelope.event());
            Ok(())
        }
    }
}
