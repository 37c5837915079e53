//! `/posts` and their comments: handlers write a row and emit its event in
//! one transaction ([`Write`](super::write::Write)); the search index and
//! the cache follow through listeners.
//!
//! A row and its event commit together or not at all; and every write runs
//! to its end on a task of its own ([`AppState::detached`]), so a client
//! that hangs up mid-request cannot stop a transaction half way.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Json, Router, routing};
use serde::Deserialize;
use sqlx::any::AnyExecutor;

use super::cache::{CacheKey, Cached};
use super::db::{self, Comment, Post};
use super::error::{ApiError, Body, valid_text};
use super::events::EmitAppEvent;
use super::{AppState, Page, PageParams, parse_id};

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/posts", routing::post(create).get(list))
        .route("/posts/{id}", routing::get(read).put(update).delete(delete))
        .route("/posts/{id}/publish", routing::post(publish))
        .route(
            "/posts/{id}/comments",
            routing::get(read_comments).post(create_comment),
        )
        .route("/comments/{id}", routing::delete(delete_comment))
}

/// A new post's author: `author_id`, or `author` by username.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewPost {
    pub(crate) title: String,
    pub(crate) body: String,
    #[serde(default)]
    pub(crate) author_id: Option<i64>,
    #[serde(default)]
    pub(crate) author: Option<String>,
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

/// The most characters of a title, a body and a comment.
const TITLE_CHARS: usize = 200;
const BODY_CHARS: usize = 100_000;
const COMMENT_CHARS: usize = 10_000;

async fn create(
    State(state): State<Arc<AppState>>,
    Body(input): Body<NewPost>,
) -> Result<(StatusCode, Json<Post>), ApiError> {
    let post = state
        .clone()
        .detached(async move { create_post(&state, input).await })
        .await?;
    Ok((StatusCode::CREATED, Json(post)))
}

/// Creates an unpublished post; also used by `--seed`.
pub(crate) async fn create_post(state: &AppState, input: NewPost) -> Result<Post, ApiError> {
    let title = valid_title(&input.title)?;
    let body = valid_body(&input.body)?;
    let author_id = author_of(state, &input).await?;
    // A slug taken between the look-up and the insert is looked up again; a
    // writer that keeps losing that race to others creating the same title
    // (they all compute the same next suffix) takes a random suffix instead,
    // which no racer shares.
    // A failed insert leaves its transaction to roll back (PostgreSQL takes
    // no statement after an error in one): each try has a transaction of
    // its own.
    for attempt in 0..SLUG_ATTEMPTS {
        let mut tx = state.write().await?;
        let slug = if attempt < NUMBERED_SLUG_ATTEMPTS {
            free_slug(&mut *tx, title).await?
        } else {
            random_slug(title, attempt)
        };
        match db::insert_post(&mut *tx, author_id, title, &slug, body).await {
            Ok(post) => {
                tx.emit_post_created(&post);
                state.commit(tx).await?;
                return Ok(post);
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => continue,
            Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => {
                return Err(no_author(author_id));
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Only if random suffixes collide SLUG_ATTEMPTS - 3 times in a row.
    Err(ApiError::Conflict(
        "other posts took every slug tried for this title; try again".into(),
    ))
}

/// Slugs tried for one new post: the first few the next free `-N`, the
/// rest a random suffix.
const SLUG_ATTEMPTS: u32 = 8;
const NUMBERED_SLUG_ATTEMPTS: u32 = 3;

/// [`slugify`]'s slug with a random suffix of 8 hex digits.
fn random_slug(title: &str, attempt: u32) -> String {
    use std::hash::{BuildHasher, Hasher};
    // `RandomState` is seeded per process and per instance: random enough to
    // keep racers apart, and the unique index settles any collision.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    format!("{}-{:08x}", slugify(title), hasher.finish() as u32)
}

/// The author named by `author_id` or `author`: exactly one of them.
async fn author_of(state: &AppState, input: &NewPost) -> Result<i64, ApiError> {
    match (input.author_id, &input.author) {
        (Some(id), None) => match db::user(&state.db, id).await? {
            Some(_) => Ok(id),
            None => Err(no_author(id)),
        },
        (None, Some(name)) => match db::user_by_name(&state.db, name).await? {
            Some(user) => Ok(user.id),
            None => Err(ApiError::invalid("author", format!("no user `{name}`"))),
        },
        _ => Err(ApiError::invalid(
            "author_id",
            "give the author as `author_id` or `author` (a username), not both",
        )),
    }
}

/// `GET /posts?after=ID&limit=N`
async fn list(
    State(state): State<Arc<AppState>>,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<Post>>, ApiError> {
    let page = PageParams::from_query(params)?;
    let posts = db::posts_page(&state.db, page.after, page.limit).await?;
    Ok(Json(Page::of(posts, page, "/posts", |p| p.id)))
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

/// A post by id or by slug, from the database.
async fn find(db: impl AnyExecutor<'_>, key: &str) -> Result<Post, ApiError> {
    let post = match key.parse::<i64>() {
        Ok(id) => db::post(db, id).await?,
        Err(_) => db::post_by_slug(db, key).await?,
    };
    post.ok_or_else(|| no_post(key))
}

async fn update(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
    Body(changes): Body<PostChanges>,
) -> Result<Json<Post>, ApiError> {
    state
        .clone()
        .detached(async move {
            let mut tx = state.write().await?;
            let current = find(&mut *tx, &key).await?;
            let title = match &changes.title {
                Some(title) => valid_title(title)?,
                None => &current.title,
            };
            let body = match &changes.body {
                Some(body) => valid_body(body)?,
                None => &current.body,
            };
            let post = db::update_post(&mut *tx, current.id, title, body)
                .await?
                .ok_or_else(|| no_post(&key))?;
            tx.emit_post_updated(&post);
            state.commit(tx).await?;
            Ok(Json(post))
        })
        .await
}

/// `POST /posts/{id or slug}/publish`
async fn publish(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<Json<Post>, ApiError> {
    state
        .clone()
        .detached(async move {
            let id = find(&state.db, &key).await?.id;
            publish_post(&state, id).await.map(Json)
        })
        .await
}

/// Publishes a post; also used by `--seed`.
pub(crate) async fn publish_post(state: &AppState, id: i64) -> Result<Post, ApiError> {
    let mut tx = state.write().await?;
    let post = db::publish_post(&mut *tx, id)
        .await?
        .ok_or_else(|| no_post(&id.to_string()))?;
    tx.emit_post_published(&post);
    state.commit(tx).await?;
    Ok(post)
}

/// The id of the post a path names by id or by slug; an id is taken as it
/// is (the caller finds out whether the row exists), a slug looked up.
async fn post_id_of(state: &AppState, key: &str) -> Result<i64, ApiError> {
    match key.parse::<i64>() {
        Ok(id) => Ok(id),
        Err(_) => Ok(find(&state.db, key).await?.id),
    }
}

/// `DELETE /posts/{id or slug}`
async fn delete(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = post_id_of(&state, &key).await?;
    state
        .clone()
        .detached(async move {
            let mut tx = state.write().await?;
            let post = db::delete_post(&mut *tx, id)
                .await?
                .ok_or_else(|| no_post(&id.to_string()))?;
            tx.emit_post_deleted(&post);
            state.commit(tx).await?;
            Ok(StatusCode::NO_CONTENT)
        })
        .await
}

/// `POST /posts/{id or slug}/comments`
async fn create_comment(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Body(input): Body<NewComment>,
) -> Result<(StatusCode, Json<Comment>), ApiError> {
    let post_id = post_id_of(&state, &id).await?;
    let body = valid_text("body", input.body.trim())?;
    // Characters, not bytes: a comment in Japanese gets the same room.
    if body.is_empty() || body.chars().count() > COMMENT_CHARS {
        return Err(ApiError::invalid(
            "body",
            format!("a comment must have 1 to {COMMENT_CHARS} characters"),
        ));
    }
    let body = body.to_owned();
    state
        .clone()
        .detached(async move {
            let mut tx = state.write().await?;
            if db::post(&mut *tx, post_id).await?.is_none() {
                return Err(no_post(&id));
            }
            if db::user(&mut *tx, input.author_id).await?.is_none() {
                return Err(no_author(input.author_id));
            }
            let comment = match db::insert_comment(&mut *tx, post_id, input.author_id, &body).await
            {
                Ok(comment) => comment,
                // The post or the author was deleted since the checks above
                // (by a transaction that committed first, on PostgreSQL).
                Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => {
                    drop(tx);
                    return Err(if db::post(&state.db, post_id).await?.is_none() {
                        no_post(&id)
                    } else {
                        no_author(input.author_id)
                    });
                }
                Err(e) => return Err(e.into()),
            };
            tx.emit_comment_created(&comment);
            state.commit(tx).await?;
            Ok((StatusCode::CREATED, Json(comment)))
        })
        .await
}

/// `GET /posts/{id or slug}/comments`
async fn read_comments(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Cached<Vec<Comment>>, ApiError> {
    let post_id = post_id_of(&state, &id).await?;
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
    state
        .clone()
        .detached(async move {
            let mut tx = state.write().await?;
            let comment = db::delete_comment(&mut *tx, id)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no comment {id}")))?;
            tx.emit_comment_deleted(&comment);
            state.commit(tx).await?;
            Ok(StatusCode::NO_CONTENT)
        })
        .await
}

fn no_post(key: &str) -> ApiError {
    ApiError::NotFound(format!("no post {key}"))
}

fn no_author(id: i64) -> ApiError {
    ApiError::invalid("author_id", format!("no user {id}"))
}

fn valid_title(title: &str) -> Result<&str, ApiError> {
    let title = valid_text("title", title.trim())?;
    if title.is_empty() || title.chars().count() > TITLE_CHARS {
        return Err(ApiError::invalid(
            "title",
            format!("a title must have 1 to {TITLE_CHARS} characters"),
        ));
    }
    Ok(title)
}

fn valid_body(body: &str) -> Result<&str, ApiError> {
    let body = valid_text("body", body)?;
    if body.chars().count() > BODY_CHARS {
        return Err(ApiError::invalid(
            "body",
            format!("a body may have {BODY_CHARS} characters at most"),
        ));
    }
    Ok(body)
}

/// The slug a post titled `title` gets now: [`slugify`]'s, or the first of
/// `-2`, `-3`, … after it that no post has.
pub(crate) async fn free_slug(db: impl AnyExecutor<'_>, title: &str) -> Result<String, ApiError> {
    let base = slugify(title);
    let taken = db::slugs_like(db, &base).await?;
    Ok(next_free(&base, &taken))
}

/// `base` if it is not in `taken`, else `base-N` for the smallest free N ≥ 2.
fn next_free(base: &str, taken: &[String]) -> String {
    if !taken.iter().any(|s| s == base) {
        return base.to_owned();
    }
    let used: std::collections::HashSet<u64> = taken
        .iter()
        .filter_map(|s| s.strip_prefix(base)?.strip_prefix('-')?.parse().ok())
        .collect();
    let n = (2..).find(|n| !used.contains(n)).unwrap_or(2);
    format!("{base}-{n}")
}

/// `"Hello, Events!"` → `"hello-events"`, `"Grüße aus Köln"` →
/// `"grusse-aus-koln"`, `"東京"` → `"dong-jing"`: Unicode transliterated to
/// ASCII, so a slug is easy to type and never needs escaping in a URL.
/// Never empty (`"post"`), never all digits (so a slug never reads as an id).
pub(crate) fn slugify(title: &str) -> String {
    let ascii = deunicode::deunicode(title);
    let mut slug = String::with_capacity(ascii.len());
    for c in ascii.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    // Long titles make long slugs: cut at a word.
    if slug.len() > 80 {
        let cut = slug[..80].rfind('-').unwrap_or(80);
        slug.truncate(cut);
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        "post".to_owned()
    } else if slug.chars().all(|c| c.is_ascii_digit()) {
        format!("post-{slug}")
    } else {
        slug.to_owned()
    }
}
