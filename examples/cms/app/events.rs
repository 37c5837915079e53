//! The CMS's domain events. Payloads are light: the ids and the few fields a
//! listener routes on. Listeners re-read rows from the database, so a late or
//! repeated event can never write stale data anywhere; and that is what makes
//! the durable tier's at-least-once delivery, and a replay, harmless.
//!
//! They are written to the store's log in JSON (serde), in the transaction
//! of the row they are about.

use event_bus::DomainEvent;
use serde::{Deserialize, Serialize};

use super::db::{Comment, Post, User};

/// Deletions are high priority on a bus, where a deleted user or post would
/// leave the search index and the cache before any routine update still
/// queued; the durable tier, which the CMS runs its listeners on, hands each
/// listener its events in commit order instead.
#[derive(Debug, Clone, DomainEvent, Serialize, Deserialize)]
pub(crate) enum AppEvent {
    UserCreated(UserEventData),
    UserUpdated(UserEventData),
    #[event(priority = "high")]
    UserDeleted(UserEventData),
    PostCreated(PostEventData),
    PostUpdated(PostEventData),
    PostPublished(PostEventData),
    #[event(priority = "high")]
    PostDeleted(PostEventData),
    CommentCreated(CommentEventData),
    CommentDeleted(CommentEventData),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct UserEventData {
    pub(crate) id: i64,
}

impl From<&User> for UserEventData {
    fn from(user: &User) -> Self {
        Self { id: user.id }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PostEventData {
    pub(crate) id: i64,
    /// Posts are cached under their slug as well as their id.
    pub(crate) slug: String,
}

impl From<&Post> for PostEventData {
    fn from(post: &Post) -> Self {
        Self {
            id: post.id,
            slug: post.slug.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CommentEventData {
    /// Comments are cached per post.
    pub(crate) post_id: i64,
}

impl From<&Comment> for CommentEventData {
    fn from(comment: &Comment) -> Self {
        Self {
            post_id: comment.post_id,
        }
    }
}
