//! `/search`, `/metrics` and `/health`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::{Json, Router, routing};
use event_bus::ListenerStatus;
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

/// The Prometheus text format: the listeners' counters, the log's lag per
/// group (`event_bus_log_lag`), the events emitted on the bus after their
/// commit, and the CMS's own.
async fn prometheus(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
}

/// The events this process committed (each emitted on its bus after its
/// commit), and each of its listeners: its counts in this process and, for
/// a durable one, its group's progress through the log.
async fn metrics(State(state): State<Arc<AppState>>) -> Json<Value> {
    let (listeners, error) = state.listener_states().await;
    Json(json!({
        "emitted": state.bus.metrics().emitted,
        "listeners": listeners,
        "progress_error": error,
    }))
}

/// A listener is lagging past this many events of the log or its queue.
const LAGGING: u64 = 1000;

/// 200 when the database answers and every listener runs (`"status"` says
/// `"degraded"` if one lags or has dead deliveries), 503 otherwise.
async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let database = match tokio::time::timeout(Duration::from_secs(2), db::ping(&state.db)).await {
        Ok(Ok(())) => json!({ "ok": true }),
        Ok(Err(error)) => json!({ "ok": false, "error": error.to_string() }),
        Err(_) => json!({ "ok": false, "error": "no answer within 2s" }),
    };
    let (states, progress_error) = state.listener_states().await;
    let mut down = database["ok"] != true || progress_error.is_some();
    let mut degraded = false;
    let listeners: Vec<Value> = states
        .iter()
        .map(|l| {
            let lagging = l.lag.is_some_and(|lag| lag > LAGGING);
            let failing = l.dead_letters.is_some_and(|dead| dead > 0);
            down |= l.status != ListenerStatus::Running;
            degraded |= lagging || failing;
            json!({
                "name": l.name,
                "tier": l.tier,
                "group": l.group,
                "status": l.status,
                "lag": l.lag,
                "unfinished": l.unfinished,
                "lagging": lagging,
                "failing": failing,
                "handled": l.handled,
                "retried": l.retried,
                "dead_lettered": l.dead_lettered,
                "dead_letters": l.dead_letters,
            })
        })
        .collect();
    let mut body = json!({
        "status": if down { "down" } else if degraded { "degraded" } else { "ok" },
        "instance": state.instance,
        "database": database,
        "listeners": listeners,
    });
    if let Some(error) = progress_error {
        body["progress_error"] = json!(error);
    }
    #[cfg(feature = "search")]
    {
        let index = &state.search;
        body["search_index"] = json!({
            "ready": index.is_ready(),
            "documents": index.documents(),
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
