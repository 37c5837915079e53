//! `/users`: handlers write a row and emit its event in one transaction;
//! nothing else.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Json, Router, routing};
use serde::Deserialize;

use super::cache::{CacheKey, Cached};
use super::db::{self, User};
use super::error::{ApiError, Body, valid_text};
use super::events::EmitAppEvent;
use super::{AppState, Page, PageParams, parse_id};

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/users", routing::post(create).get(list))
        .route("/users/{id}", routing::get(read).put(update).delete(delete))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewUser {
    pub(crate) username: String,
    pub(crate) email: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserChanges {
    pub(crate) username: Option<String>,
    pub(crate) email: Option<String>,
}

async fn create(
    State(state): State<Arc<AppState>>,
    Body(input): Body<NewUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let user = state
        .clone()
        .detached(async move { create_user(&state, input).await })
        .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// `GET /users?after=ID&limit=N`
async fn list(
    State(state): State<Arc<AppState>>,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<User>>, ApiError> {
    let page = PageParams::from_query(params)?;
    let users = db::users_page(&state.db, page.after, page.limit).await?;
    Ok(Json(Page::of(users, page, "/users", |u| u.id)))
}

/// Creates a user; also used by `--seed`.
pub(crate) async fn create_user(state: &AppState, input: NewUser) -> Result<User, ApiError> {
    let username = valid_username(&input.username)?;
    let email = valid_email(&input.email)?;
    let mut tx = state.write().await?;
    let user = db::insert_user(&mut *tx, username, email)
        .await
        .map_err(|e| taken(e, format!("username `{username}` is taken")))?;
    tx.emit_user_created(&user);
    state.commit(tx).await?;
    Ok(user)
}

async fn read(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Cached<User>, ApiError> {
    let id = parse_id(&id, "user")?;
    state
        .cached(CacheKey::User(id), async {
            db::user(&state.db, id).await?.ok_or_else(|| no_user(id))
        })
        .await
}

async fn update(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Body(changes): Body<UserChanges>,
) -> Result<Json<User>, ApiError> {
    let id = parse_id(&id, "user")?;
    state
        .clone()
        .detached(async move {
            let mut tx = state.write().await?;
            let current = db::user(&mut *tx, id).await?.ok_or_else(|| no_user(id))?;
            let username = match &changes.username {
                Some(username) => valid_username(username)?,
                None => &current.username,
            };
            let email = match &changes.email {
                Some(email) => valid_email(email)?,
                None => &current.email,
            };
            let user = db::update_user(&mut *tx, id, username, email)
                .await
                .map_err(|e| taken(e, format!("username `{username}` is taken")))?
                .ok_or_else(|| no_user(id))?;
            tx.emit_user_updated(&user);
            state.commit(tx).await?;
            Ok(Json(user))
        })
        .await
}

async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id, "user")?;
    let in_use = move || {
        ApiError::Conflict(format!(
            "user {id} still has posts or comments; delete them first"
        ))
    };
    state
        .clone()
        .detached(async move {
            let mut tx = state.write().await?;
            if db::user_has_content(&mut *tx, id).await? {
                return Err(in_use());
            }
            let user = match db::delete_user(&mut *tx, id).await {
                Ok(user) => user.ok_or_else(|| no_user(id))?,
                // A post or comment by the user came since the check.
                Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => {
                    return Err(in_use());
                }
                Err(e) => return Err(e.into()),
            };
            tx.emit_user_deleted(&user);
            state.commit(tx).await?;
            Ok(StatusCode::NO_CONTENT)
        })
        .await
}

fn no_user(id: i64) -> ApiError {
    ApiError::NotFound(format!("no user {id}"))
}

/// A unique violation as a 409 that says which value; other errors as they are.
pub(crate) fn taken(error: sqlx::Error, message: String) -> ApiError {
    match ApiError::from(error) {
        ApiError::Conflict(_) => ApiError::Conflict(message),
        other => other,
    }
}

fn valid_username(username: &str) -> Result<&str, ApiError> {
    let ok = (1..=32).contains(&username.len())
        && username
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(username)
    } else {
        Err(ApiError::invalid(
            "username",
            "username must be 1 to 32 characters of a-z, 0-9, `_` and `-`",
        ))
    }
}

fn valid_email(email: &str) -> Result<&str, ApiError> {
    let email = valid_text("email", email)?;
    let ok = email.len() <= 254
        && !email.chars().any(char::is_whitespace)
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.split('.').count() >= 2
                && domain.split('.').all(|part| !part.is_empty())
        });
    if ok {
        Ok(email)
    } else {
        Err(ApiError::invalid(
            "email",
            format!("`{email}` is not an email address"),
        ))
    }
}
