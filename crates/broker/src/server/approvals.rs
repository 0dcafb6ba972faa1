//! Approvals: adapters create requests (with the agent's token), operators approve, deny or
//! cancel them, the agent collects an approval block signed by the broker's approval key
//! (a biscuit third-party block any adapter verifies offline), and the adapter consumes it
//! once. The agent's credential can never approve: these routes demand an operator key.

use capgate_core::wire::GrantResponse;
use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use biscuit_auth::builder::{date, string, BlockBuilder, Term};
use serde::Deserialize;
use serde_json::json;

use super::problem::{bearer, parse_json, require_json, ApiError, Body};
use super::BrokerState;
use crate::identity::{AuthError, Operator};
use crate::store::{update_approval, UpdateError};
use capgate_core::containment::approval::{
    Approval, ApprovalAction, ApprovalError, ApprovalStatus, Preview, Requester,
};
use capgate_core::containment::audit::AuditKind;
use capgate_core::containment::{destroys_recovery_point, Operation};
use capgate_core::guard::LedgerCode;
use capgate_core::scope::Verb;
use capgate_core::token::{from_unix_seconds, random_id, unix_seconds_now, VerifiedToken};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    operation: Operation,
}

/// Longest preview text an adapter may attach.
const MAX_PREVIEW_CHARS: usize = 2000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewRequest {
    preview: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumeRequest {
    digest: String,
}

pub(super) fn agent_token(
    state: &BrokerState,
    headers: &HeaderMap,
) -> Result<Arc<VerifiedToken>, ApiError> {
    let token = bearer(headers).ok_or(AuthError::MissingCredential)?;
    state.guard.verify_token(token).map_err(|denial| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            denial.code.as_str(),
            denial.reason,
        )
    })
}

pub(super) fn operator(state: &BrokerState, headers: &HeaderMap) -> Result<Operator, ApiError> {
    let credential = bearer(headers).ok_or(AuthError::MissingCredential)?;
    Ok(state.authenticator.authenticate_operator(credential)?)
}

fn update_error(e: UpdateError) -> ApiError {
    match e {
        UpdateError::Store(e) => e.into(),
        UpdateError::NotFound(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "approval_not_found",
            format!("no approval {id}"),
        ),
        UpdateError::Rejected(e) => approval_error(&e),
    }
}

fn approval_error(e: &ApprovalError) -> ApiError {
    let status = if e.is_forbidden() {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::CONFLICT
    };
    ApiError::new(status, e.code(), e.to_string())
}

/// The session and token lineage (authority block) of a verified agent token.
fn requester(verified: &VerifiedToken) -> Result<Requester, ApiError> {
    let lineage = verified.revocation_ids().first().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_malformed",
            "token has no authority block",
        )
    })?;
    Ok(Requester {
        session: verified.session().to_owned(),
        lineage,
    })
}

async fn record(
    state: &BrokerState,
    actor: &str,
    approval: &Approval,
    what: &str,
) -> Result<(), ApiError> {
    state
        .audit(
            AuditKind::Approval,
            Some(actor),
            json!({"event": what, "approval": approval}),
        )
        .await
}

pub async fn create(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<(StatusCode, Json<Approval>), ApiError> {
    let verified = agent_token(&state, &headers)?;
    require_json(&headers)?;
    let request: CreateRequest = parse_json(&body)?;
    let operation = request.operation;
    let containment = &state.config.containment;
    if !containment.needs_approval(operation.verb) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "approval_not_needed",
            format!("{} does not need approval", operation.verb),
        ));
    }
    if operation.verb == Verb::Delete {
        if let Some(point) =
            destroys_recovery_point(&containment.recovery_points, &operation.resource)
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                LedgerCode::RecoveryPoint.as_str(),
                format!(
                    "deleting {} would destroy recovery point {point}; no approval can allow it",
                    operation.resource
                ),
            ));
        }
    }
    let asked_by = requester(&verified)?;
    let now = unix_seconds_now();
    let approval = Approval {
        id: random_id(),
        status: ApprovalStatus::Pending,
        agent: verified.agent().to_owned(),
        session: asked_by.session,
        lineage: Some(asked_by.lineage),
        digest: operation.digest(),
        operation,
        created_at: now,
        expires_at: now + containment.approval_ttl.as_secs(),
        required: containment.approvers_required,
        approvers: Vec::new(),
        decided_by: None,
        not_before: None,
        delay_seconds: containment.approval_delay.as_secs(),
        used_at: None,
        version: 0,
        preview: None,
    };
    state.store.create_approval(&approval).await?;
    record(&state, verified.agent(), &approval, "requested").await?;
    state.announce("requested", &approval);
    tracing::warn!(approval_id = %approval.id, agent = %approval.agent, resource = %approval.operation.resource, verb = %approval.operation.verb, "approval requested");
    Ok((StatusCode::CREATED, Json(approval)))
}

pub async fn list(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<Approval>>, ApiError> {
    operator(&state, &headers)?;
    Ok(Json(state.store.approvals().await?))
}

/// Operators see any approval; an agent sees only its own, from the session that asked.
pub async fn show(
    State(state): State<Arc<BrokerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Approval>, ApiError> {
    let approval = state.store.approval(&id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "approval_not_found",
            format!("no approval {id}"),
        )
    })?;
    if operator(&state, &headers).is_err() {
        let verified = agent_token(&state, &headers)?;
        if verified.agent() != approval.agent {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "approval_not_found",
                format!("no approval {id}"),
            ));
        }
        approval
            .check_requester(&requester(&verified)?)
            .map_err(|e| approval_error(&e))?;
    }
    Ok(Json(approval))
}

async fn decide(
    state: &BrokerState,
    headers: &HeaderMap,
    id: &str,
    action: impl FnOnce(String) -> ApprovalAction,
    what: &str,
) -> Result<Json<Approval>, ApiError> {
    let operator = operator(state, headers)?;
    decide_as(state, &operator, id, action(operator.name.clone()), what)
        .await
        .map(Json)
}

/// An operator's decision, by the API or the console: the same transition, the same rules
/// (no self-approval, distinct approvers), the same audit record.
pub(super) async fn decide_as(
    state: &BrokerState,
    operator: &Operator,
    id: &str,
    action: ApprovalAction,
    what: &str,
) -> Result<Approval, ApiError> {
    let approval = update_approval(state.store.as_ref(), id, &action, unix_seconds_now())
        .await
        .map_err(update_error)?;
    record(state, &operator.name, &approval, what).await?;
    tracing::warn!(approval_id = %id, operator = %operator.name, status = ?approval.status, "{what}");
    state.announce(what, &approval);
    Ok(approval)
}

pub async fn approve(
    State(state): State<Arc<BrokerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Approval>, ApiError> {
    let ttl_seconds = state.config.containment.approval_ttl.as_secs();
    decide(
        &state,
        &headers,
        &id,
        |operator| ApprovalAction::Approve {
            operator,
            ttl_seconds,
        },
        "approved",
    )
    .await
}

pub async fn deny(
    State(state): State<Arc<BrokerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Approval>, ApiError> {
    decide(
        &state,
        &headers,
        &id,
        |operator| ApprovalAction::Deny { operator },
        "denied",
    )
    .await
}

pub async fn cancel(
    State(state): State<Arc<BrokerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Approval>, ApiError> {
    decide(
        &state,
        &headers,
        &id,
        |operator| ApprovalAction::Cancel { operator },
        "cancelled",
    )
    .await
}

/// The agent collects its approval: its own token plus a third-party block, signed by the
/// broker's approval key, stating the digest and a short expiry. Only the session and token
/// lineage that requested the approval may collect it; another session of the same agent
/// gets 403 `approval_other_session`.
pub async fn grant(
    State(state): State<Arc<BrokerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<GrantResponse>, ApiError> {
    let verified = agent_token(&state, &headers)?;
    let approval = state
        .store
        .approval(&id)
        .await?
        .filter(|a| a.agent == verified.agent())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "approval_not_found",
                format!("no approval {id}"),
            )
        })?;
    approval
        .check_requester(&requester(&verified)?)
        .map_err(|e| approval_error(&e))?;
    if approval.status != ApprovalStatus::Approved {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "approval_not_approved",
            format!("approval {id} is {:?}", approval.status),
        ));
    }
    let keyring = state.keyring()?;
    let mut params: HashMap<String, Term> = HashMap::new();
    params.insert("digest".into(), string(&approval.digest));
    params.insert("id".into(), string(&approval.id));
    params.insert(
        "expiry".into(),
        date(&from_unix_seconds(approval.expires_at)),
    );
    let internal = |e: biscuit_auth::error::Token| {
        tracing::error!(error = %e, "cannot build approval block");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "approval_block_failed",
            "approval block could not be built",
        )
    };
    let block = BlockBuilder::new()
        .code_with_params(
            "approved({digest}, {id}); check if time($time), $time <= {expiry};",
            params,
            HashMap::new(),
        )
        .map_err(internal)?;
    let request = verified.biscuit().third_party_request().map_err(internal)?;
    let signed = request
        .create_block(&keyring.approval_key().private(), block)
        .map_err(internal)?;
    let token = verified
        .biscuit()
        .append_third_party(keyring.approval_key().public(), signed)
        .and_then(|t| capgate_core::token::encode(&t))
        .map_err(internal)?;
    Ok(Json(GrantResponse { token, approval }))
}

/// Marks the approval used. Only a token of the session and lineage that asked can, and
/// only once (both checked in the same atomic transition).
pub async fn consume(
    State(state): State<Arc<BrokerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<Approval>, ApiError> {
    let verified = agent_token(&state, &headers)?;
    require_json(&headers)?;
    let request: ConsumeRequest = parse_json(&body)?;
    let approval = state.store.approval(&id).await?;
    if approval
        .as_ref()
        .is_none_or(|a| a.agent != verified.agent())
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "approval_not_found",
            format!("no approval {id}"),
        ));
    }
    let used = update_approval(
        state.store.as_ref(),
        &id,
        &ApprovalAction::Consume {
            digest: request.digest,
            requester: requester(&verified)?,
        },
        unix_seconds_now(),
    )
    .await
    .map_err(update_error)?;
    record(&state, verified.agent(), &used, "used").await?;
    state.announce("used", &used);
    Ok(Json(used))
}

/// An adapter attaches what the pending request's operation would touch (`POST
/// /v1/approvals/{id}/preview`, adapter key). Outside the digest: it informs the approver
/// and cannot change what is approved; the agent cannot write it.
pub async fn attach_preview(
    State(state): State<Arc<BrokerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<Approval>, ApiError> {
    let credential = bearer(&headers).ok_or(AuthError::MissingCredential)?;
    let adapter = state.authenticator.authenticate_adapter(credential)?;
    require_json(&headers)?;
    let request: PreviewRequest = parse_json(&body)?;
    if request.preview.chars().count() > MAX_PREVIEW_CHARS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "preview_too_long",
            format!("a preview has at most {MAX_PREVIEW_CHARS} characters"),
        ));
    }
    let preview = Preview {
        text: request.preview,
        by: adapter.clone(),
        at: unix_seconds_now(),
    };
    let approval = update_approval(
        state.store.as_ref(),
        &id,
        &ApprovalAction::AttachPreview { preview },
        unix_seconds_now(),
    )
    .await
    .map_err(update_error)?;
    record(&state, &adapter, &approval, "previewed").await?;
    Ok(Json(approval))
}
