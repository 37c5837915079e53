//! The welcome mailer: a group listener that "sends" each new user one
//! welcome, as a row of `notifications`, and `GET /notifications`, which
//! lists them.
//!
//! The same listener runs on the durable tier (one process's store, or
//! several on one database) and, with `NATS_URL` set, on the JetStream
//! tier: either way it is a group listener, so each event is handled by one
//! process of the group, at least once. The effect is once: the row and the
//! record that the event was handled ([`first_time`]) commit in one
//! transaction, so a redelivery writes nothing.

use std::sync::Arc;

use axum::extract::State;
use axum::{Json, Router, routing};
use event_bus::sql::first_time;
use event_bus::{HandlerError, Meta, listener};
use serde::Serialize;
use sqlx::{AnyPool, Row};

use super::AppState;
use super::error::ApiError;
use super::events::{AppEventHandler, UserEventData};

/// The group the mailer's events are shared in.
pub(crate) const MAILER: &str = "welcome-mailer";

/// Writes a welcome notification per new user; `instance` names the
/// process that handled it.
pub(crate) struct WelcomeMailer {
    pub(crate) db: AnyPool,
    pub(crate) instance: String,
}

#[listener(name = "welcome-mailer")]
impl AppEventHandler for WelcomeMailer {
    async fn on_user_created(&self, user: &UserEventData, meta: Meta) -> Result<(), HandlerError> {
        let mut tx = self.db.begin().await?;
        if first_time::<sqlx::Any>(&mut tx, MAILER, &meta).await? {
            sqlx::query(
                "INSERT INTO notifications (user_id, kind, handled_by, created_at) \
                 VALUES ($1, 'welcome', $2, $3)",
            )
            .bind(user.id)
            .bind(&self.instance)
            .bind(super::db::now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/notifications", routing::get(list))
}

/// One notification sent.
#[derive(Debug, Serialize)]
pub(crate) struct Notification {
    pub(crate) user_id: i64,
    pub(crate) kind: String,
    /// The instance whose welcome mailer handled the event.
    pub(crate) handled_by: String,
    pub(crate) created_at: i64,
}

/// Every notification, oldest first (at most the latest 1,000).
pub(crate) async fn notifications(db: &AnyPool) -> Result<Vec<Notification>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT user_id, kind, handled_by, created_at FROM notifications \
         ORDER BY id DESC LIMIT 1000",
    )
    .fetch_all(db)
    .await?;
    let mut all = rows
        .iter()
        .map(|row| {
            Ok(Notification {
                user_id: row.try_get("user_id")?,
                kind: row.try_get("kind")?,
                handled_by: row.try_get("handled_by")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    all.reverse();
    Ok(all)
}

async fn list(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let all = notifications(&state.db).await?;
    Ok(Json(serde_json::json!({ "notifications": all })))
}
