//! `GET /v1/health`: is the store reachable, still the store this broker knew (its
//! generation, not lost), and the revocation view fresh.

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
    let lost = state.integrity.lost();
    let healthy = store.is_ok() && fresh && lost.is_none();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if healthy { "ok" } else { "degraded" },
            "store": {
                "status": if lost.is_some() { "lost" } else if store.is_ok() { "ok" } else { "unavailable" },
                "generation": state.integrity.generation(),
                "lost": lost.is_some(),
                "lost_reason": lost,
            },
            "revocation_view_age_ms": age.map(|a| a.as_millis() as u64),
        })),
    )
}
