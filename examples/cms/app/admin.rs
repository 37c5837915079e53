//! Dead letters: `GET /admin/dead-letters` lists the events a listener gave
//! up on, `POST /admin/dead-letters/redrive` emits them again; and the
//! reconciler, which repairs the row of every search dead letter at once.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::extract::State;
use axum::{Json, Router, routing};
use event_bus::Publish;
use serde_json::{Value, json};

use super::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/dead-letters", routing::get(list))
        .route("/admin/dead-letters/redrive", routing::post(redrive))
}

async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let letters: Vec<Value> = state
        .bus
        .dead_letters()
        .snapshot()
        .iter()
        .map(|letter| {
            json!({
                "id": letter.envelope.id().to_string(),
                "listener": &*letter.listener,
                "event": letter.envelope.name(),
                "error": letter.error,
                "attempts": letter.attempts,
                "failed_at_ms": letter.failed_at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            })
        })
        .collect();
    Json(json!({
        "dead_letters": letters,
        "evicted": state.bus.metrics().dead_letters_evicted,
    }))
}

/// Takes every dead letter out of the store and emits its event again, to
/// every listener that wants it: they re-read rows, so a repeat is harmless.
async fn redrive(State(state): State<Arc<AppState>>) -> Json<Value> {
    let letters = state.bus.dead_letters().take();
    let count = letters.len();
    for letter in letters {
        state
            .events
            .publish_wait(letter.envelope.event().clone())
            .await;
    }
    tracing::info!(count, "dead letters redriven");
    Json(json!({ "redriven": count }))
}

/// Attempts of the reconciler per dead letter, 200ms apart and doubling.
const RECONCILE_ATTEMPTS: u32 = 6;

/// Repairs the search index for each event its listener gave up on: re-reads
/// that row and writes it, retrying with backoff. One that still fails is
/// logged and counted (`/health`); the next rebuild or a redrive repairs it.
#[cfg(feature = "search")]
pub(crate) fn reconcile(state: &AppState) {
    let mut letters = state.bus.dead_letters().subscribe();
    let index = state.search.clone();
    let db = state.db.clone();
    tokio::spawn(async move {
        while let Some(letter) = letters.recv().await {
            if &*letter.listener != "search" {
                continue;
            }
            let mut pause = std::time::Duration::from_millis(200);
            for attempt in 1..=RECONCILE_ATTEMPTS {
                match index.reconcile(&db, letter.envelope.event()).await {
                    Ok(()) => {
                        index
                            .reconciled
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(event = %letter.envelope.id(), "search row reconciled after a dead letter");
                        break;
                    }
                    Err(error) if attempt == RECONCILE_ATTEMPTS => {
                        index
                            .unreconciled
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(event = %letter.envelope.id(), %error, "search row not reconciled");
                    }
                    Err(error) => {
                        tracing::warn!(event = %letter.envelope.id(), %error, attempt, "reconcile failed; retrying");
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                    }
                }
            }
        }
    });
}
