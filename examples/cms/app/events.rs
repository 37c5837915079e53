//! The CMS's domain events. Payloads are light: the ids and the few fields a
//! listener routes on. Listeners re-read rows from the database, so a late or
//! repeated event can never write stale data anywhere.

use event_bus::DomainEvent;

use super::db::{Comment, Post, User};

/// Deletions are high priority: a deleted user or post leaves the search
/// index and the cache before any routine update still queued.
#[derive(Debug, Clone, DomainEvent)]
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

#[derive(Debug, Clone)]
pub(crate) struct UserEventData {
    pub(crate) id: i64,
}

impl From<&User> for UserEventData {
    fn from(user: &User) -> Self {
        Self { id: user.id }
    }
}

#[derive(Debug, Clone)]
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

#[derive(Debug, Clone)]
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
