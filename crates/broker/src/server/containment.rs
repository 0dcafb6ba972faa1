//! Containment settings for adapters (`GET /v1/containment`), velocity counting
//! (`POST /v1/velocity`, with the agent's token) and the freeze switch (`/v1/freeze`,
//! operators only).

use capgate_core::wire::{CountResponse, FreezeState};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::approvals::{agent_token, operator};
use super::problem::{parse_json, require_json, ApiError, Body};
use super::BrokerState;
use capgate_core::containment::audit::AuditKind;
use capgate_core::containment::ContainmentDocument;
use capgate_core::guard::LedgerCode;
use capgate_core::scope::Verb;

pub async fn document(
    State(state): State<Arc<BrokerState>>,
) -> Result<Json<ContainmentDocument>, ApiError> {
    Ok(Json(ContainmentDocument::new(
        &state.config.containment,
        &state.keyring()?.approval_key().public(),
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountRequest {
    verb: Verb,
}

/// Counts one use of `verb` by the token's agent; 429 once the window's budget is spent.
pub async fn count(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<CountResponse>, ApiError> {
    let verified = agent_token(&state, &headers)?;
    require_json(&headers)?;
    let request: CountRequest = parse_json(&body)?;
    let Some(limit) = state
        .config
        .containment
        .velocity_for(verified.agent(), request.verb)
    else {
        return Ok(Json(CountResponse {
            count: 0,
            limit: None,
        }));
    };
    let over = |count: u64| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            LedgerCode::RateLimited.as_str(),
            format!(
                "{} may {} at most {} times per {}",
                verified.agent(),
                request.verb,
                limit.limit,
                humantime::format_duration(limit.per)
            ),
        )
        .with_extra(json!({"count": count, "limit": limit.limit}))
    };
    if limit.limit == 0 {
        return Err(over(0));
    }
    let key = format!("velocity:{}:{}", verified.agent(), request.verb);
    let count = state.store.increment(&key, limit.per).await?;
    if count > limit.limit {
        tracing::warn!(agent = %verified.agent(), verb = %request.verb, count, limit = limit.limit, "velocity limit reached");
        state
            .audit(AuditKind::Decision, Some(verified.agent()), json!({"event": "rate_limited", "verb": request.verb, "count": count, "limit": limit.limit}))
            .await?;
        return Err(over(count));
    }
    Ok(Json(CountResponse {
        count,
        limit: Some(limit.limit),
    }))
}

/// Counts one call against the token's own use budget (shared by its attenuated copies).
pub async fn count_use(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
) -> Result<Json<CountResponse>, ApiError> {
    let verified = agent_token(&state, &headers)?;
    let Some(budget) = verified.use_budget() else {
        return Ok(Json(CountResponse {
            count: 0,
            limit: None,
        }));
    };
    let authority = verified
        .revocation_ids()
        .first()
        .cloned()
        .unwrap_or_default();
    // No window: the count lives as long as the token (the store key outlives it).
    let count = state
        .store
        .increment(
            &format!("uses:{authority}"),
            std::time::Duration::from_secs(10 * 365 * 86_400),
        )
        .await?;
    if count > budget {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            LedgerCode::UseBudgetExhausted.as_str(),
            format!("this token may be used {budget} times and has been"),
        )
        .with_extra(json!({"count": count, "limit": budget})));
    }
    Ok(Json(CountResponse {
        count,
        limit: Some(budget),
    }))
}

pub async fn freeze_state(
    State(state): State<Arc<BrokerState>>,
) -> Result<Json<FreezeState>, ApiError> {
    Ok(Json(FreezeState {
        frozen: state.store.frozen().await?,
    }))
}

pub async fn set_freeze(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<FreezeState>, ApiError> {
    let operator = operator(&state, &headers)?;
    require_json(&headers)?;
    let request: FreezeState = parse_json(&body)?;
    freeze_as(&state, &operator.name, request.frozen).await?;
    Ok(Json(request))
}

/// Switches the freeze, by the API or the console, and records who did.
pub(super) async fn freeze_as(
    state: &BrokerState,
    operator: &str,
    frozen: bool,
) -> Result<(), ApiError> {
    state.store.set_frozen(frozen).await?;
    state
        .audit(AuditKind::Freeze, Some(operator), json!({"frozen": frozen}))
        .await?;
    // Feed readers learn the new state on their next page; wake them now.
    state.wake_feed();
    tracing::warn!(%operator, frozen, "freeze switched");
    Ok(())
}
