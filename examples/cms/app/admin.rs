//! Dead deliveries: `GET /admin/dead-letters` lists the events a listener
//! gave up on, as the store keeps them (in the database, so they outlive a
//! restart), and `POST /admin/dead-letters/redrive` hands them to their
//! listeners again, each as a first attempt. Listeners re-read rows, so a
//! redriven event writes the row as it is now.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::extract::State;
use axum::{Json, Router, routing};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::write::store_error;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/dead-letters", routing::get(list))
        .route("/admin/dead-letters/redrive", routing::post(redrive))
}

/// Every dead delivery of the database, oldest first: `listener` is the
/// listener's name where this process runs its group, else the group.
async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let dead = state.store.dead_letters(None).await.map_err(store_error)?;
    let letters: Vec<Value> = dead
        .iter()
        .map(|letter| {
            let name = state
                .listeners
                .by_group(&letter.listener)
                .map_or_else(|| letter.listener.clone(), |l| l.name().to_owned());
            json!({
                "id": letter.id.to_string(),
                "listener": name,
                "group": letter.listener,
                "position": letter.position,
                "event": letter.name,
                "error": letter.error,
                "attempts": letter.attempts,
                "failed_at_ms": letter.failed_at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            })
        })
        .collect();
    Ok(Json(json!({ "dead_letters": letters })))
}

/// Redrives every dead delivery, group by group; answers how many.
async fn redrive(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let dead = state.store.dead_letters(None).await.map_err(store_error)?;
    let mut groups: Vec<&str> = dead.iter().map(|d| d.listener.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    let mut count = 0;
    for group in groups {
        count += state
            .store
            .redrive(group, None)
            .await
            .map_err(store_error)?;
    }
    tracing::info!(count, "dead deliveries redriven");
    Ok(Json(json!({ "redriven": count })))
}
