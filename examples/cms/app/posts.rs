//! `/posts` and their comments: handlers write the database and emit one
//! event; the search index and the cache follow through listeners.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Json, Router, routing};
use serde::Deserialize;

use super::cache::{CacheKey, Cached};
use super::db::{self, Comment, Post};
use super::error::{ApiError, Body};
use super::events::EmitAppEvent;
use super::users::taken;
use super::{AppState, parse_id};

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/posts", routing::post(create))
        .route("/posts/{id}", routing::get(read).put(update).delete(delete))
        .route("/posts/{id}/publish", routing::post(publish))
        .route(
            "/posts/{id}/comments",
            routing::get(read_comments).post(create_comment),
        )
        .route("/comments/{id}", routing::delete(delete_comment))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewPost {
    pub(crate) title: String,
    pub(crate) body: String,
    pub(crate) author_id: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PostChanges {
    pub(crate) title: Option<String>,
    pub(crate) body: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewComment {
    pub(crate) author_id: i64,
    pub(crate) body: String,
}

async fn create(
    State(state): State<Arc<AppState>>,
    Body(input): Body<NewPost>,
) -> Result<(StatusCode, Json<Post>), ApiError> {
    let post = create_post(&state, input).await?;
    Ok((StatusCode::CREATED, Json(post)))
}

/// Creates an unpublished post; also used by `--seed`.
pub(crate) async fn create_post(state: &AppState, input: NewPost) -> Result<Post, ApiError> {
    let title = valid_title(&input.title)?;
    let body = valid_body(&input.body)?;
    known_author(state, input.author_id).await?;
    let slug = slugify(title);
    let post = db::insert_post(&state.db, input.author_id, title, &slug, body)
        .await
        .map_err(|e| taken(e, format!("a post with slug `{slug}` exists")))?;
    state.emit_post_created(&post);
    Ok(post)
}

/// `GET /posts/{id or slug}`
async fn read(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<Cached<Post>, ApiError> {
    match key.parse::<i64>() {
        Ok(id) => {
            state
                .cached(CacheKey::Post(id), async {
                    db::post(&state.db, id).await?.ok_or_else(|| no_post(&key))
                })
                .await
        }
        Err(_) => {
            state
                .cached(CacheKey::PostSlug(key.clone()), async {
                    db::post_by_slug(&state.db, &key)
                        .await?
                        .ok_or_else(|| no_post(&key))
                })
                .await
        }
    }
}

async fn update(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Body(changes): Body<PostChanges>,
) -> Result<Json<Post>, ApiError> {
    let id = parse_id(&id, "post")?;
    let current = db::post(&state.db, id)
        .await?
        .ok_or_else(|| no_post(&id.to_string()))?;
    let title = match &changes.title {
        Some(title) => valid_title(title)?,
        None => &current.title,
    };
    let body = match &changes.body {
        Some(body) => valid_body(body)?,
        None => &current.body,
    };
    let post = db::update_post(&state.db, id, title, body)
        .await?
        .ok_or_else(|| no_post(&id.to_string()))?;
    state.emit_post_updated(&post);
    Ok(Json(post))
}

async fn publish(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Post>, ApiError> {
    let id = parse_id(&id, "post")?;
    let post = publish_post(&state, id).await?;
    Ok(Json(post))
}

/// Publishes a post; also used by `--seed`.
pub(crate) async fn publish_post(state: &AppState, id: i64) -> Result<Post, ApiError> {
    let post = db::publish_post(&state.db, id)
        .await?
        .ok_or_else(|| no_post(&id.to_string()))?;
    state.emit_post_published(&post);
    Ok(post)
}

async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id, "post")?;
    let post = db::delete_post(&state.db, id)
        .await?
        .ok_or_else(|| no_post(&id.to_string()))?;
    state.emit_post_deleted(&post);
    Ok(StatusCode::NO_CONTENT)
}

async fn create_comment(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Body(input): Body<NewComment>,
) -> Result<(StatusCode, Json<Comment>), ApiError> {
    let post_id = parse_id(&id, "post")?;
    let body = input.body.trim();
    if body.is_empty() || body.len() > 10_000 {
        return Err(ApiError::invalid(
            "body",
            "a comment must have 1 to 10000 characters",
        ));
    }
    if db::post(&state.db, post_id).await?.is_none() {
        return Err(no_post(&id));
    }
    known_author(&state, input.author_id).await?;
    let comment = db::insert_comment(&state.db, post_id, input.author_id, body).await?;
    state.emit_comment_created(&comment);
    Ok((StatusCode::CREATED, Json(comment)))
}

async fn read_comments(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Cached<Vec<Comment>>, ApiError> {
    let post_id = parse_id(&id, "post")?;
    state
        .cached(CacheKey::Comments(post_id), async {
            if db::post(&state.db, post_id).await?.is_none() {
                return Err(no_post(&id));
            }
            Ok(db::comments(&state.db, post_id).await?)
        })
        .await
}

async fn delete_comment(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id, "comment")?;
    let comment = db::delete_comment(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no comment {id}")))?;
    state.emit_comment_deleted(&comment);
    Ok(StatusCode::NO_CONTENT)
}

fn no_post(key: &str) -> ApiError {
    ApiError::NotFound(format!("no post {key}"))
}

async fn known_author(state: &AppState, author_id: i64) -> Result<(), ApiError> {
    match db::user(&state.db, author_id).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::invalid(
            "author_id",
            format!("no user {author_id}"),
        )),
    }
}

fn valid_title(title: &str) -> Result<&str, ApiError> {
    let title = title.trim();
    if title.is_empty() || title.chars().count() > 200 {
        return Err(ApiError::invalid(
            "title",
            "a title must have 1 to 200 characters",
        ));
    }
    Ok(title)
}

fn valid_body(body: &str) -> Result<&str, ApiError> {
    if body.len() > 100_000 {
        return Err(ApiError::invalid(
            "body",
            "a body may have 100000 bytes at most",
        ));
    }
    Ok(body)
}

/// `"Hello, Events!"` → `"hello-events"`; never empty, never all digits (so a
/// slug never reads as an id).
pub(crate) fn slugify(title: &str) -> String {
    let mut slug = String::with_capacity(title.len());
    for c in title.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    if slug.chars().all(|c| c.is_ascii_digit()) {
        format!("post-{slug}").trim_end_matches('-').to_owned()
    } else {
        slug.to_owned()
    }
}
