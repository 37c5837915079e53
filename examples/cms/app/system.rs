//! `/search`, `/metrics` and `/health`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::{Json, Router, routing};
use event_bus::BusMetrics;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::search::{Hit, Scope};

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/search", routing::get(search))
        .route("/metrics", routing::get(metrics))
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
        .filter(|q| !q.trim().is_empty())
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
    let hits: Vec<Hit> = state.search(&query, scope).await?;
    Ok(Json(json!({ "query": query, "hits": hits })))
}

/// The bus's metrics snapshot.
async fn metrics(State(state): State<Arc<AppState>>) -> Json<BusMetrics> {
    Json(state.bus.metrics())
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}
