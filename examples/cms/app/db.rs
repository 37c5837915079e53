//! The database: SQLite by default, PostgreSQL when `DATABASE_URL` says so,
//! through sqlx's `Any` driver. Every statement is parameterised; the SQL
//! below is the same on both (`$n` placeholders in order, `RETURNING`).
//!
//! Each function runs on any executor: the pool for a read, a write's
//! transaction (`&mut *tx`, see [`Write`](super::write::Write)) for what
//! must commit with its event.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::any::{AnyExecutor, AnyPoolOptions, AnyRow, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, Row};

static SQLITE: Migrator = sqlx::migrate!("examples/cms/migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("examples/cms/migrations/postgres");

/// Connects and brings the schema up to date.
pub(crate) async fn connect(url: &str) -> Result<AnyPool, sqlx::Error> {
    install_default_drivers();
    let sqlite = url.starts_with("sqlite:");
    let pool = AnyPoolOptions::new()
        .max_connections(if sqlite { 4 } else { 10 })
        .after_connect(move |connection, _| {
            Box::pin(async move {
                if sqlite {
                    // Writers wait for each other instead of failing with
                    // "database is locked".
                    connection
                        .execute("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;")
                        .await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    if sqlite {
        pool.execute("PRAGMA journal_mode = WAL;").await?;
    }
    let migrator = if sqlite { &SQLITE } else { &POSTGRES };
    migrator.run(&pool).await?;
    Ok(pool)
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub(crate) struct User {
    pub(crate) id: i64,
    pub(crate) username: String,
    pub(crate) email: String,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Post {
    pub(crate) id: i64,
    pub(crate) author_id: i64,
    pub(crate) title: String,
    pub(crate) slug: String,
    pub(crate) body: String,
    pub(crate) published: bool,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

/// `published` is stored as 0 or 1: the `Any` driver reads no SQLite
/// booleans.
impl sqlx::FromRow<'_, AnyRow> for Post {
    fn from_row(row: &AnyRow) -> sqlx::Result<Self> {
        Ok(Self {
            id: row.try_get("id")?,
            author_id: row.try_get("author_id")?,
            title: row.try_get("title")?,
            slug: row.try_get("slug")?,
            body: row.try_get("body")?,
            published: row.try_get::<i64, _>("published")? != 0,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub(crate) struct Comment {
    pub(crate) id: i64,
    pub(crate) post_id: i64,
    pub(crate) author_id: i64,
    pub(crate) body: String,
    pub(crate) created_at: i64,
}

const USER: &str = "id, username, email, created_at, updated_at";
const POST: &str = "id, author_id, title, slug, body, published, created_at, updated_at";
const COMMENT: &str = "id, post_id, author_id, body, created_at";

pub(crate) async fn insert_user(
    db: impl AnyExecutor<'_>,
    username: &str,
    email: &str,
) -> sqlx::Result<User> {
    let now = now();
    sqlx::query_as(&format!(
        "INSERT INTO users (username, email, created_at, updated_at) VALUES ($1, $2, $3, $4) RETURNING {USER}"
    ))
    .bind(username)
    .bind(email)
    .bind(now)
    .bind(now)
    .fetch_one(db)
    .await
}

pub(crate) async fn user(db: impl AnyExecutor<'_>, id: i64) -> sqlx::Result<Option<User>> {
    sqlx::query_as(&format!("SELECT {USER} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

#[allow(dead_code)] // for the tests
pub(crate) async fn users(db: impl AnyExecutor<'_>) -> sqlx::Result<Vec<User>> {
    sqlx::query_as(&format!("SELECT {USER} FROM users ORDER BY id"))
        .fetch_all(db)
        .await
}

/// Up to `limit` users with an id above `after`, by id.
pub(crate) async fn users_page(
    db: impl AnyExecutor<'_>,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<User>> {
    sqlx::query_as(&format!(
        "SELECT {USER} FROM users WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

pub(crate) async fn user_by_name(
    db: impl AnyExecutor<'_>,
    username: &str,
) -> sqlx::Result<Option<User>> {
    sqlx::query_as(&format!("SELECT {USER} FROM users WHERE username = $1"))
        .bind(username)
        .fetch_optional(db)
        .await
}

/// Answers when the database does.
pub(crate) async fn ping(db: &AnyPool) -> sqlx::Result<()> {
    let (_,): (i64,) = sqlx::query_as("SELECT 1").fetch_one(db).await?;
    Ok(())
}

pub(crate) async fn update_user(
    db: impl AnyExecutor<'_>,
    id: i64,
    username: &str,
    email: &str,
) -> sqlx::Result<Option<User>> {
    sqlx::query_as(&format!(
        "UPDATE users SET username = $1, email = $2, updated_at = $3 WHERE id = $4 RETURNING {USER}"
    ))
    .bind(username)
    .bind(email)
    .bind(now())
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Whether the user wrote any post or comment (and so cannot be deleted).
pub(crate) async fn user_has_content(db: impl AnyExecutor<'_>, id: i64) -> sqlx::Result<bool> {
    let (count,): (i64,) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM posts WHERE author_id = $1) + (SELECT COUNT(*) FROM comments WHERE author_id = $2)",
    )
    .bind(id)
    .bind(id)
    .fetch_one(db)
    .await?;
    Ok(count > 0)
}

pub(crate) async fn delete_user(db: impl AnyExecutor<'_>, id: i64) -> sqlx::Result<Option<User>> {
    sqlx::query_as(&format!("DELETE FROM users WHERE id = $1 RETURNING {USER}"))
        .bind(id)
        .fetch_optional(db)
        .await
}

pub(crate) async fn insert_post(
    db: impl AnyExecutor<'_>,
    author_id: i64,
    title: &str,
    slug: &str,
    body: &str,
) -> sqlx::Result<Post> {
    let now = now();
    sqlx::query_as(&format!(
        "INSERT INTO posts (author_id, title, slug, body, published, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {POST}"
    ))
    .bind(author_id)
    .bind(title)
    .bind(slug)
    .bind(body)
    .bind(0_i64)
    .bind(now)
    .bind(now)
    .fetch_one(db)
    .await
}

pub(crate) async fn post(db: impl AnyExecutor<'_>, id: i64) -> sqlx::Result<Option<Post>> {
    sqlx::query_as(&format!("SELECT {POST} FROM posts WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

pub(crate) async fn post_by_slug(
    db: impl AnyExecutor<'_>,
    slug: &str,
) -> sqlx::Result<Option<Post>> {
    sqlx::query_as(&format!("SELECT {POST} FROM posts WHERE slug = $1"))
        .bind(slug)
        .fetch_optional(db)
        .await
}

#[allow(dead_code)] // for the tests
pub(crate) async fn posts(db: impl AnyExecutor<'_>) -> sqlx::Result<Vec<Post>> {
    sqlx::query_as(&format!("SELECT {POST} FROM posts ORDER BY id"))
        .fetch_all(db)
        .await
}

/// Up to `limit` posts with an id above `after`, by id.
pub(crate) async fn posts_page(
    db: impl AnyExecutor<'_>,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<Post>> {
    sqlx::query_as(&format!(
        "SELECT {POST} FROM posts WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The slugs that are `base` or `base-…`. A slug is made of `a-z`, `0-9` and
/// `-`, none of which `LIKE` treats specially.
pub(crate) async fn slugs_like(db: impl AnyExecutor<'_>, base: &str) -> sqlx::Result<Vec<String>> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT slug FROM posts WHERE slug = $1 OR slug LIKE $2")
            .bind(base)
            .bind(format!("{base}-%"))
            .fetch_all(db)
            .await?;
    Ok(rows.into_iter().map(|(slug,)| slug).collect())
}

/// Published posts whose title or body holds every one of `terms`
/// (lowercase), best first by recency: what search answers from while the
/// index is being built.
pub(crate) async fn find_posts(
    db: impl AnyExecutor<'_>,
    terms: &[String],
    limit: i64,
) -> sqlx::Result<Vec<Post>> {
    let mut sql = format!("SELECT {POST} FROM posts WHERE published = 1");
    for n in 1..=terms.len() {
        sql.push_str(&format!(
            " AND (LOWER(title) LIKE ${n} OR LOWER(body) LIKE ${n})"
        ));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", terms.len() + 1));
    let mut query = sqlx::query_as(&sql);
    for term in terms {
        query = query.bind(format!("%{}%", like_escaped(term)));
    }
    query.bind(limit).fetch_all(db).await
}

/// Users whose name holds every one of `terms`, as [`find_posts`].
pub(crate) async fn find_users(
    db: impl AnyExecutor<'_>,
    terms: &[String],
    limit: i64,
) -> sqlx::Result<Vec<User>> {
    let mut sql = format!("SELECT {USER} FROM users WHERE 1 = 1");
    for n in 1..=terms.len() {
        sql.push_str(&format!(" AND LOWER(username) LIKE ${n}"));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", terms.len() + 1));
    let mut query = sqlx::query_as(&sql);
    for term in terms {
        query = query.bind(format!("%{}%", like_escaped(term)));
    }
    query.bind(limit).fetch_all(db).await
}

/// `term` with `LIKE`'s wildcards taken out: the fallback matches words, not
/// patterns.
fn like_escaped(term: &str) -> String {
    term.chars()
        .filter(|c| !matches!(c, '%' | '_' | '\\'))
        .collect()
}

pub(crate) async fn update_post(
    db: impl AnyExecutor<'_>,
    id: i64,
    title: &str,
    body: &str,
) -> sqlx::Result<Option<Post>> {
    sqlx::query_as(&format!(
        "UPDATE posts SET title = $1, body = $2, updated_at = $3 WHERE id = $4 RETURNING {POST}"
    ))
    .bind(title)
    .bind(body)
    .bind(now())
    .bind(id)
    .fetch_optional(db)
    .await
}

pub(crate) async fn publish_post(db: impl AnyExecutor<'_>, id: i64) -> sqlx::Result<Option<Post>> {
    sqlx::query_as(&format!(
        "UPDATE posts SET published = $1, updated_at = $2 WHERE id = $3 RETURNING {POST}"
    ))
    .bind(1_i64)
    .bind(now())
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Deletes the post; its comments go with it (`ON DELETE CASCADE`).
pub(crate) async fn delete_post(db: impl AnyExecutor<'_>, id: i64) -> sqlx::Result<Option<Post>> {
    sqlx::query_as(&format!("DELETE FROM posts WHERE id = $1 RETURNING {POST}"))
        .bind(id)
        .fetch_optional(db)
        .await
}

pub(crate) async fn insert_comment(
    db: impl AnyExecutor<'_>,
    post_id: i64,
    author_id: i64,
    body: &str,
) -> sqlx::Result<Comment> {
    sqlx::query_as(&format!(
        "INSERT INTO comments (post_id, author_id, body, created_at) VALUES ($1, $2, $3, $4) RETURNING {COMMENT}"
    ))
    .bind(post_id)
    .bind(author_id)
    .bind(body)
    .bind(now())
    .fetch_one(db)
    .await
}

pub(crate) async fn comments(db: impl AnyExecutor<'_>, post_id: i64) -> sqlx::Result<Vec<Comment>> {
    sqlx::query_as(&format!(
        "SELECT {COMMENT} FROM comments WHERE post_id = $1 ORDER BY id"
    ))
    .bind(post_id)
    .fetch_all(db)
    .await
}

pub(crate) async fn delete_comment(
    db: impl AnyExecutor<'_>,
    id: i64,
) -> sqlx::Result<Option<Comment>> {
    sqlx::query_as(&format!(
        "DELETE FROM comments WHERE id = $1 RETURNING {COMMENT}"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}
