//! The read cache (feature `cache`): reads go through it, and a listener
//! invalidates what each event changes. Without the feature every read is a
//! miss; the handlers are the same.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;

/// What can be cached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum CacheKey {
    User(i64),
    Post(i64),
    PostSlug(String),
    Comments(i64),
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
pub(crate) use enabled::{Cache, CacheInvalidator};

#[cfg(feature = "cache")]
mod enabled {
    use std::any::Any;
    use std::sync::{Arc, RwLock};

    use event_bus::{HandlerError, listener};

    use super::*;
    use crate::app::events::{AppEventHandler, CommentEventData, PostEventData, UserEventData};

    type Entry = Arc<dyn Any + Send + Sync>;

    pub(crate) struct Cache {
        entries: moka::sync::Cache<CacheKey, Entry>,
        /// Bumped by every invalidation. A value loaded while it changed may
        /// be stale and is not cached; inserts and invalidations exclude each
        /// other through the lock.
        generation: RwLock<u64>,
    }

    impl Cache {
        pub(crate) fn new(capacity: u64) -> Self {
            Self {
                entries: moka::sync::Cache::new(capacity),
                generation: RwLock::new(0),
            }
        }

        fn generation(&self) -> std::sync::RwLockReadGuard<'_, u64> {
            self.generation.read().unwrap_or_else(|e| e.into_inner())
        }

        pub(crate) async fn get_or_load<T: Clone + Send + Sync + 'static>(
            &self,
            key: CacheKey,
            load: impl Future<Output = Result<T, ApiError>>,
        ) -> Result<Cached<T>, ApiError> {
            let generation = *self.generation();
            if let Some(entry) = self.entries.get(&key) {
                if let Ok(value) = entry.downcast::<T>() {
                    return Ok(Cached {
                        value: T::clone(&value),
                        hit: true,
                    });
                }
            }
            let value = load.await?;
            let current = self.generation();
            if *current == generation {
                self.entries.insert(key, Arc::new(value.clone()));
            }
            drop(current);
            Ok(Cached { value, hit: false })
        }

        pub(crate) fn invalidate(&self, keys: &[CacheKey]) {
            let mut generation = self.generation.write().unwrap_or_else(|e| e.into_inner());
            *generation += 1;
            for key in keys {
                self.entries.invalidate(key);
            }
        }

        /// The cached value of `key`, for the consistency tests.
        #[allow(dead_code)]
        pub(crate) fn peek<T: Clone + Send + Sync + 'static>(&self, key: &CacheKey) -> Option<T> {
            let entry = self.entries.get(key)?;
            entry.downcast::<T>().ok().map(|value| T::clone(&value))
        }
    }

    /// Invalidates the entries each event changes. Creations change nothing
    /// cached (misses are not cached), so it does not listen to them.
    pub(crate) struct CacheInvalidator(pub Arc<Cache>);

    #[listener(name = "cache")]
    impl AppEventHandler for CacheInvalidator {
        async fn on_user_updated(&self, user: &UserEventData) -> Result<(), HandlerError> {
            self.0.invalidate(&[CacheKey::User(user.id)]);
            Ok(())
        }

        async fn on_user_deleted(&self, user: &UserEventData) -> Result<(), HandlerError> {
            self.0.invalidate(&[CacheKey::User(user.id)]);
            Ok(())
        }

        async fn on_post_updated(&self, post: &PostEventData) -> Result<(), HandlerError> {
            self.0.invalidate(&post_keys(post));
            Ok(())
        }

        async fn on_post_published(&self, post: &PostEventData) -> Result<(), HandlerError> {
            self.0.invalidate(&post_keys(post));
            Ok(())
        }

        async fn on_post_deleted(&self, post: &PostEventData) -> Result<(), HandlerError> {
            let [by_id, by_slug] = post_keys(post);
            self.0
                .invalidate(&[by_id, by_slug, CacheKey::Comments(post.id)]);
            Ok(())
        }

        async fn on_comment_created(&self, comment: &CommentEventData) -> Result<(), HandlerError> {
            self.0.invalidate(&[CacheKey::Comments(comment.post_id)]);
            Ok(())
        }

        async fn on_comment_deleted(&self, comment: &CommentEventData) -> Result<(), HandlerError> {
            self.0.invalidate(&[CacheKey::Comments(comment.post_id)]);
            Ok(())
        }
    }

    fn post_keys(post: &PostEventData) -> [CacheKey; 2] {
        [
            CacheKey::Post(post.id),
            CacheKey::PostSlug(post.slug.clone()),
        ]
    }
}
