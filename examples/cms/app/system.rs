//! `/search`, `/metrics` and `/health`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::{Json, Router, routing};
use event_bus::{BusMetrics, ListenerStatus};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::search::Scope;
use super::{AppState, db};

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/search", routing::get(search))
        .route("/metrics", routing::get(prometheus))
        .route("/metrics/json", routing::get(metrics))
        .route("/health", routing::get(health))
}

#[derive(Debug, Deserialize)]
struct SearchParams {
    q: Option<String>,
    kind: Option<String>,
}

async fn search(
    State(state): State<Arc<AppState>>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = params
        .q
        .ok_or_else(|| ApiError::BadRequest("missing search query `q`".into()))?;
    let scope = match params.kind.as_deref() {
        None => Scope::All,
        Some("user") => Scope::Users,
        Some("post") => Scope::Posts,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unknown kind `{other}`; expected `user` or `post`"
            )));
        }
    };
    let found = state.search(&query, scope).await?;
    Ok(Json(
        json!({ "query": query.trim(), "hits": found.hits, "source": found.source }),
    ))
}

/// The Prometheus text format: the bus's counters and the CMS's.
async fn prometheus(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
}

/// The bus's metrics snapshot, as JSON.
async fn metrics(State(state): State<Arc<AppState>>) -> Json<BusMetrics> {
    Json(state.bus.metrics())
}

/// A listener is lagging past this many queued events.
const LAGGING: usize = 1000;

/// 200 when the database answers and every listener runs (`"status"` says
/// `"degraded"` if one lags or has dead letters), 503 otherwise.
async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let database = match tokio::time::timeout(Duration::from_secs(2), db::ping(&state.db)).await {
        Ok(Ok(())) => json!({ "ok": true }),
        Ok(Err(error)) => json!({ "ok": false, "error": error.to_string() }),
        Err(_) => json!({ "ok": false, "error": "no answer within 2s" }),
    };
    let letters = state.bus.dead_letters().snapshot();
    let metrics = state.bus.metrics();
    let mut down = database["ok"] != true;
    let mut degraded = false;
    let listeners: Vec<Value> = metrics
        .listeners
        .iter()
        .map(|l| {
            let dead_letters = letters.iter().filter(|d| *d.listener == l.name).count();
            let lagging = l.queue_depth > LAGGING;
            let failing = dead_letters > 0;
            down |= l.status != ListenerStatus::Running;
            degraded |= lagging || failing;
            json!({
                "name": l.name,
                "status": l.status,
                "queue_depth": l.queue_depth,
                "lagging": lagging,
                "failing": failing,
                "handled": l.handled,
                "retried": l.retried,
                "dead_lettered": l.dead_lettered,
                "dead_letters": dead_letters,
                "dropped": l.dropped,
            })
        })
        .collect();
    #[cfg_attr(not(any(feature = "search", feature = "cache")), allow(unused_mut))]
    let mut body = json!({
        "status": if down { "down" } else if degraded { "degraded" } else { "ok" },
        "database": database,
        "listeners": listeners,
    });
    #[cfg(feature = "search")]
    {
        use std::sync::atomic::Ordering;
        let index = &state.search;
        body["search_index"] = json!({
            "ready": index.is_ready(),
            "documents": index.documents(),
            "reconciled": index.reconciled.load(Ordering::Relaxed),
            "unreconciled": index.unreconciled.load(Ordering::Relaxed),
        });
    }
    #[cfg(feature = "cache")]
    {
        body["cache"] = json!({ "invalidations_pending": state.cache.in_flux() });
    }
    let status = if down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body))
}
