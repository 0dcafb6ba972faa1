//! `POST /v1/tokens`: an agent proves who it is and receives a short-lived token carrying
//! exactly the scopes the grant policy allowed, or a 403 naming every refused scope.
//!
//! Two request forms: JSON with RFC 9396 `authorization_details` (credential in
//! `Authorization: Bearer`), and the RFC 8693 token-exchange form (JSON or
//! `application/x-www-form-urlencoded`) with the identity JWT as `subject_token`.

use capgate_core::wire::{AuthorizationDetail, TokenResponse};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::problem::{bearer, content_type, parse_json, ApiError, Body};
use super::BrokerState;
use crate::store::SessionRecord;
use capgate_core::policy::ScopeOutcome;
use capgate_core::scope::{ResourcePattern, Scope, Verb};
use capgate_core::token::{mint, random_id, unix_seconds, GrantedRight, TokenSpec};

pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const ISSUED_TOKEN_TYPE: &str = "urn:capgate:params:oauth:token-type:biscuit";
/// The `type` of Capgate's RFC 9396 authorization details.
pub const DETAIL_TYPE: &str = "capgate";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(default)]
    authorization_details: Vec<AuthorizationDetail>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    /// Ask for a token usable this many times in all (1 = one-shot); policy may cap it lower.
    #[serde(default)]
    max_uses: Option<u64>,
    #[serde(default)]
    grant_type: Option<String>,
    #[serde(default)]
    subject_token: Option<String>,
    #[serde(default)]
    subject_token_type: Option<String>,
    #[serde(default)]
    requested_token_type: Option<String>,
}

/// The form encoding carries `authorization_details` as a JSON string (RFC 9396 §6).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenExchangeForm {
    grant_type: String,
    subject_token: String,
    subject_token_type: String,
    #[serde(default)]
    requested_token_type: Option<String>,
    authorization_details: String,
    #[serde(default)]
    ttl_seconds: Option<String>,
}

pub async fn issue(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    let issued = issue_token(&state, headers, body).await;
    match &issued {
        Ok(_) => {
            state
                .metrics
                .tokens_issued
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => state.metrics.token_refused(e.code),
    }
    issued
}

async fn issue_token(
    state: &BrokerState,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    let request = match content_type(&headers).as_deref() {
        Some("application/json") => parse_json::<TokenRequest>(&body)?,
        Some("application/x-www-form-urlencoded") => from_form(&body)?,
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected application/json or application/x-www-form-urlencoded",
            ))
        }
    };
    let credential = credential(&request, &headers)?;
    let identity = state.authenticator.authenticate_agent(&credential)?;
    if state.store.agent_revoked(&identity.agent).await? {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "agent_revoked",
            format!(
                "agent {} is revoked and receives no new tokens",
                identity.agent
            ),
        ));
    }
    let scopes = scopes(&request.authorization_details)?;
    let now = SystemTime::now();
    let ttl = request.ttl_seconds.map(Duration::from_secs);
    if ttl.is_some_and(|t| t.is_zero()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_ttl",
            "ttl_seconds must be positive",
        ));
    }
    let decision = state
        .grants
        .evaluate(&identity, &scopes, ttl, now)
        .map_err(|e| {
            // A request the policy cannot take (nothing, or too many scopes) is the caller's
            // mistake, not the broker's: it is a refusal, not an error in the operator's log.
            let status = if matches!(
                e,
                capgate_core::policy::PolicyEvalError::NothingRequested
                    | capgate_core::policy::PolicyEvalError::TooManyScopes(_)
            ) {
                tracing::warn!(agent = %identity.agent, error = %e, "token request refused");
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                tracing::error!(agent = %identity.agent, error = %e, "grant policy evaluation failed");
                StatusCode::INTERNAL_SERVER_ERROR
            };
            ApiError::new(status, e.code(), e.to_string())
        })?;
    if !decision.all_granted() {
        let refused: Vec<_> = decision
            .refused()
            .map(|(scope, reason)| json!({"resource": scope.resource, "verb": scope.verb, "reason": reason}))
            .collect();
        tracing::warn!(agent = %identity.agent, refused = refused.len(), "token request refused");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "scope_refused",
            format!(
                "{} of the requested scopes are not granted; nothing was issued",
                refused.len()
            ),
        )
        .with_extra(json!({ "refused": refused })));
    }
    let rights: Vec<GrantedRight> = decision
        .outcomes
        .into_iter()
        .filter_map(|(scope, outcome)| match outcome {
            ScopeOutcome::Granted { environment } => Some(GrantedRight {
                resource: scope.resource,
                verb: scope.verb,
                environment,
            }),
            ScopeOutcome::Refused { .. } => None,
        })
        .collect();
    let expires_at = now.checked_add(decision.ttl).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_ttl",
            "ttl_seconds is out of range",
        )
    })?;
    let spec = TokenSpec {
        agent: identity.agent.clone(),
        session_id: random_id(),
        rights,
        issued_at: now,
        expires_at,
        row_budget: decision.row_budget,
        use_budget: match (request.max_uses, decision.use_budget) {
            (Some(asked), Some(cap)) => Some(asked.min(cap)),
            (asked, cap) => asked.or(cap),
        },
    };
    if spec.use_budget == Some(0) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_max_uses",
            "max_uses must be positive",
        ));
    }
    let keyring = state.keyring()?;
    let token = mint(&spec, keyring.active_key_id(), keyring.signing_key())
        .and_then(|t| Ok(capgate_core::token::encode(&t)?))
        .map_err(|e| {
            tracing::error!(error = %e, "minting failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "mint_failed",
                "token could not be minted",
            )
        })?;
    // The session is recorded before the token leaves, so it can always be revoked by session.
    state
        .store
        .record_session(SessionRecord {
            session_id: spec.session_id.clone(),
            agent: spec.agent.clone(),
            key_id: keyring.active_key_id(),
            issued_at: unix_seconds(now),
            expires_at: unix_seconds(expires_at),
            rights: serde_json::to_string(&spec.rights).unwrap_or_default(),
        })
        .await?;
    // No issuance goes unrecorded: if the audit trail cannot be written, nothing is issued.
    state
        .audit(
            capgate_core::containment::audit::AuditKind::Issuance,
            Some(&spec.agent),
            json!({"session": spec.session_id, "key_id": keyring.active_key_id(), "ttl_seconds": decision.ttl.as_secs(), "rights": spec.rights}),
        )
        .await?;
    tracing::info!(agent = %spec.agent, session = %spec.session_id, rights = spec.rights.len(), ttl_s = decision.ttl.as_secs(), "token issued");
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse {
            access_token: token,
            issued_token_type: ISSUED_TOKEN_TYPE.into(),
            token_type: "Bearer".into(),
            expires_in: decision.ttl.as_secs(),
            expires_at: capgate_core::token::rfc3339(expires_at),
            agent: spec.agent,
            session_id: spec.session_id,
            key_id: keyring.active_key_id(),
            granted: spec.rights,
        }),
    ))
}

fn from_form(body: &[u8]) -> Result<TokenRequest, ApiError> {
    let form: TokenExchangeForm = serde_urlencoded::from_bytes(body).map_err(|e| {
        ApiError::bad_request("malformed_form", format!("token exchange form: {e}"))
    })?;
    let authorization_details: Vec<AuthorizationDetail> =
        parse_json(form.authorization_details.as_bytes())?;
    let ttl_seconds = form
        .ttl_seconds
        .map(|t| t.parse::<u64>())
        .transpose()
        .map_err(|_| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_ttl",
                "ttl_seconds must be an integer",
            )
        })?;
    Ok(TokenRequest {
        authorization_details,
        ttl_seconds,
        max_uses: None,
        grant_type: Some(form.grant_type),
        subject_token: Some(form.subject_token),
        subject_token_type: Some(form.subject_token_type),
        requested_token_type: form.requested_token_type,
    })
}

/// The token-exchange `subject_token`, or the bearer credential; never both.
fn credential(request: &TokenRequest, headers: &HeaderMap) -> Result<String, ApiError> {
    let header = bearer(headers);
    let exchange = request.grant_type.is_some() || request.subject_token.is_some();
    if !exchange {
        return header
            .map(str::to_owned)
            .ok_or_else(|| crate::identity::AuthError::MissingCredential.into());
    }
    if header.is_some() {
        return Err(ApiError::bad_request(
            "ambiguous_credential",
            "send either Authorization or a token-exchange subject_token, not both",
        ));
    }
    if request.grant_type.as_deref() != Some(TOKEN_EXCHANGE_GRANT) {
        return Err(ApiError::bad_request(
            "unsupported_grant_type",
            format!("grant_type must be {TOKEN_EXCHANGE_GRANT}"),
        ));
    }
    if request.subject_token_type.as_deref() != Some(JWT_TOKEN_TYPE) {
        return Err(ApiError::bad_request(
            "unsupported_token_type",
            format!("subject_token_type must be {JWT_TOKEN_TYPE}"),
        ));
    }
    if let Some(requested) = &request.requested_token_type {
        if requested != ISSUED_TOKEN_TYPE {
            return Err(ApiError::bad_request(
                "unsupported_token_type",
                format!("requested_token_type must be {ISSUED_TOKEN_TYPE}"),
            ));
        }
    }
    request
        .subject_token
        .clone()
        .ok_or_else(|| crate::identity::AuthError::MissingCredential.into())
}

fn scopes(details: &[AuthorizationDetail]) -> Result<Vec<Scope>, ApiError> {
    let invalid =
        |detail: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_scope", detail);
    if details.is_empty() {
        return Err(invalid(
            "authorization_details is empty: ask for at least one scope".into(),
        ));
    }
    let mut scopes = Vec::new();
    for detail in details {
        if detail.kind != DETAIL_TYPE {
            return Err(invalid(format!(
                "authorization_details type must be {DETAIL_TYPE:?}"
            )));
        }
        if detail.locations.is_empty() || detail.actions.is_empty() {
            return Err(invalid(
                "each authorization detail needs locations and actions".into(),
            ));
        }
        for location in &detail.locations {
            let resource = ResourcePattern::parse(location).map_err(|e| invalid(e.to_string()))?;
            for action in &detail.actions {
                let verb: Verb = action
                    .parse()
                    .map_err(|e: capgate_core::scope::ScopeError| invalid(e.to_string()))?;
                scopes.push(Scope::new(resource.clone(), verb));
            }
        }
    }
    Ok(scopes)
}
