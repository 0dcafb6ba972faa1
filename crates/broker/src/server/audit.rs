//! The audit trail over HTTP: adapters append decisions (`POST /v1/audit`, adapter key),
//! operators read it (`GET /v1/audit?since=`) for `capgate audit verify|tail|export`.

use capgate_core::wire::AuditPage;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::approvals::operator;
use super::problem::{bearer, parse_json, require_json, ApiError, Body};
use super::BrokerState;
use crate::identity::AuthError;
use capgate_core::containment::audit::{AuditEvent, AuditKind};

/// Most records one page of `GET /v1/audit` returns.
const MAX_AUDIT_PAGE: usize = 10_000;

const MAX_BATCH: usize = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendRequest {
    events: Vec<AuditEvent>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AppendResponse {
    pub appended: usize,
    pub head: u64,
}

pub async fn append(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<(StatusCode, Json<AppendResponse>), ApiError> {
    let credential = bearer(&headers).ok_or(AuthError::MissingCredential)?;
    let adapter = state.authenticator.authenticate_adapter(credential)?;
    require_json(&headers)?;
    let request: AppendRequest = parse_json(&body)?;
    if request.events.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "batch_too_large",
            format!("at most {MAX_BATCH} events per batch"),
        ));
    }
    let mut events = request.events;
    let count = events.len();
    for event in &mut events {
        // Adapters may only report decisions, and each is stamped with who reported it.
        if event.kind != AuditKind::Decision {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_event",
                "adapters report decisions only",
            ));
        }
        // The trail's records promise an object here (openapi.yaml's AuditEvent).
        let Some(detail) = event.detail.as_object_mut() else {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_event",
                "an event's detail must be a JSON object",
            ));
        };
        detail.insert("reported_by".into(), adapter.clone().into());
    }
    let head = state.store.append_audit_batch(events).await?;
    Ok((
        StatusCode::CREATED,
        Json(AppendResponse {
            appended: count,
            head,
        }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    #[serde(default)]
    since: u64,
    #[serde(default = "ReadQuery::default_limit")]
    limit: usize,
}

impl ReadQuery {
    fn default_limit() -> usize {
        1000
    }
}

pub async fn read(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    operator(&state, &headers)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    // The bounds openapi.yaml states: a value outside them is refused, not quietly clamped.
    if !(1..=MAX_AUDIT_PAGE).contains(&query.limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_AUDIT_PAGE}"),
        ));
    }
    let head = state.store.audit_head().await?;
    let records = state.store.audit_since(query.since, query.limit).await?;
    Ok(Json(AuditPage { records, head }))
}
