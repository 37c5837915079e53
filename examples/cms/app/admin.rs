//! Dead deliveries: `GET /admin/dead-letters` lists the events a listener
//! gave up on, as the store keeps them (in the database, so they outlive a
//! restart) and, with `NATS_URL`, as JetStream's dead-letter stream keeps
//! those of the listeners that run there (`tier` says which), and
//! `POST /admin/dead-letters/redrive` hands them to their listeners again,
//! each as a first attempt. Listeners re-read rows, so a redriven event
//! writes the row as it is now.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// Every dead delivery of the database, oldest first, then every dead
/// letter of JetStream: `listener` is the listener's name where this
/// process runs its group, else the group.
async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let dead = state.store.dead_letters(None).await.map_err(store_error)?;
    let mut letters: Vec<Value> = dead
        .iter()
        .map(|letter| {
            let name = state
                .listeners
                .by_group(&letter.listener)
                .map_or_else(|| letter.listener.clone(), |l| l.name().to_owned());
            json!({
                "tier": "durable",
                "id": letter.id.to_string(),
                "listener": name,
                "group": letter.listener,
                "position": letter.position,
                "event": letter.name,
                "error": letter.error,
                "attempts": letter.attempts,
                "failed_at_ms": millis(letter.failed_at),
            })
        })
        .collect();
    if let Some(stream) = &state.nats {
        let dead = stream.dead_letters(None).await.map_err(nats_error)?;
        letters.extend(dead.iter().map(|letter| {
            json!({
                "tier": "jetstream",
                "id": letter.id.map(|id| id.to_string()),
                "listener": letter.listener,
                "group": letter.listener,
                "position": letter.stream_sequence,
                "event": letter.name,
                "error": letter.error,
                "attempts": letter.attempts,
                "failed_at_ms": millis(letter.failed_at),
            })
        }));
    }
    Ok(Json(json!({ "dead_letters": letters })))
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// JetStream did not answer: the client may try again.
fn nats_error(error: event_bus::nats::Error) -> ApiError {
    tracing::warn!(error = %error, "the dead-letter stream could not be read or written");
    ApiError::Unavailable(format!("JetStream: {error}"))
}

/// Redrives every dead delivery, group by group, those of the database then
/// those of JetStream; answers how many.
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
    if let Some(stream) = &state.nats {
        let dead = stream.dead_letters(None).await.map_err(nats_error)?;
        let mut listeners: Vec<&str> = dead.iter().map(|d| d.listener.as_str()).collect();
        listeners.sort_unstable();
        listeners.dedup();
        for listener in listeners {
            count += stream.redrive(listener, None).await.map_err(nats_error)?;
        }
    }
    tracing::info!(count, "dead deliveries redriven");
    Ok(Json(json!({ "redriven": count })))
}
