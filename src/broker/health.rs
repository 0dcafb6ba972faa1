//! `GET /v1/health`: is the store reachable and the revocation view fresh.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::{BrokerState, DEFAULT_MAX_STALENESS};

pub async fn health(State(state): State<Arc<BrokerState>>) -> (StatusCode, Json<Value>) {
    let store = state.store.ping().await;
    let age = state.guard.revocations().age(Instant::now());
    let fresh = age.is_some_and(|a| a <= DEFAULT_MAX_STALENESS);
    let healthy = store.is_ok() && fresh;
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if healthy { "ok" } else { "degraded" },
            "store": if store.is_ok() { "ok" } else { "unavailable" },
            "revocation_view_age_ms": age.map(|a| a.as_millis() as u64),
        })),
    )
}
