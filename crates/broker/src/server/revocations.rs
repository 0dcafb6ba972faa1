//! `POST /v1/revocations` (operators only) and `GET /v1/revocations?since=` (the feed adapters
//! follow, with optional long polling so revocations reach them within milliseconds).

use capgate_core::wire::FeedPage;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;

use super::problem::{bearer, parse_json, require_json, ApiError, Body};
use super::BrokerState;
use crate::identity::{validate_agent_name, AuthError};
use crate::store::{NewRevocation, Revocation, RevocationKind};
use capgate_core::token::unix_seconds_now;

/// Longest a feed request may wait for news.
const MAX_WAIT: Duration = Duration::from_secs(30);
const FEED_PAGE: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    kind: RevocationKind,
    value: String,
    #[serde(default)]
    reason: Option<String>,
}

pub async fn create(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<(StatusCode, Json<Revocation>), ApiError> {
    let credential = bearer(&headers).ok_or(AuthError::MissingCredential)?;
    let operator = state.authenticator.authenticate_operator(credential)?;
    require_json(&headers)?;
    let request: RevokeRequest = parse_json(&body)?;
    let invalid = |detail: &str| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_revocation",
            detail.to_owned(),
        )
    };
    let max_ttl = state.config.tokens.max_ttl.as_secs();
    let expires_at = match request.kind {
        RevocationKind::Token => {
            // biscuit revocation ids are 64-byte signatures.
            if request.value.len() != 128 || !request.value.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid("a token revocation id is 128 hex characters"));
            }
            Some(unix_seconds_now() + max_ttl)
        }
        RevocationKind::Session => {
            // Characters, as openapi.yaml's maxLength counts them.
            let length = request.value.chars().count();
            if length == 0 || length > 64 {
                return Err(invalid("a session id is 1 to 64 characters"));
            }
            // Unknown sessions are revoked all the same: the entry costs nothing and fails closed.
            let known = state.store.session(&request.value).await?;
            Some(
                known
                    .map(|s| s.expires_at)
                    .unwrap_or(unix_seconds_now() + max_ttl),
            )
        }
        RevocationKind::Agent => {
            validate_agent_name(&request.value).map_err(|_| invalid("not a valid agent name"))?;
            None
        }
    };
    let reason = request.reason.unwrap_or_default();
    if reason.chars().count() > 1024 {
        return Err(invalid("reason is longer than 1024 characters"));
    }
    let entry = state
        .store
        .revoke(NewRevocation {
            kind: request.kind,
            // Revocation ids are hex; one spelling so the set lookup matches.
            value: if request.kind == RevocationKind::Token {
                request.value.to_ascii_lowercase()
            } else {
                request.value
            },
            reason,
            revoked_by: operator.name.clone(),
            expires_at,
        })
        .await?;
    state
        .audit(
            capgate_core::containment::audit::AuditKind::Revocation,
            Some(&operator.name),
            serde_json::json!({ "revocation": entry }),
        )
        .await?;
    state
        .guard
        .revocations()
        .apply(std::slice::from_ref(&entry), std::time::Instant::now());
    state.notify_revocation(entry.cursor);
    tracing::warn!(operator = %operator.name, kind = entry.kind.as_str(), value = %entry.value, cursor = entry.cursor, "revoked");
    Ok((StatusCode::CREATED, Json(entry)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedQuery {
    #[serde(default)]
    since: u64,
    /// Seconds to wait for news when there is none (long poll); 0 answers at once.
    #[serde(default)]
    wait: u64,
}

pub async fn feed(
    State(state): State<Arc<BrokerState>>,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<FeedPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    // The bound openapi.yaml states: a longer wait is refused, not quietly shortened.
    if query.wait > MAX_WAIT.as_secs() {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("wait is at most {} seconds", MAX_WAIT.as_secs()),
        ));
    }
    let wait = Duration::from_secs(query.wait);
    let mut news = state.revocation_cursor.subscribe();
    let mut epoch = state.feed_epoch.subscribe();
    epoch.borrow_and_update();
    let mut revocations = state
        .store
        .revocations_since(query.since, FEED_PAGE)
        .await?;
    if revocations.is_empty() && !wait.is_zero() {
        let deadline = tokio::time::Instant::now() + wait;
        while *news.borrow_and_update() <= query.since {
            // A new revocation, or a freeze switched: answer now.
            let woke = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = news.changed() => false,
                    _ = epoch.changed() => true,
                }
            })
            .await;
            if !matches!(woke, Ok(false)) {
                break;
            }
        }
        revocations = state
            .store
            .revocations_since(query.since, FEED_PAGE)
            .await?;
    }
    // Read last, so the page is at least as fresh as the moment the request was sent.
    let frozen = state.store.frozen().await?;
    let head = state.store.revocation_head().await?;
    // A page from a store that is no longer the one this broker knows must not be served:
    // the check runs after the reads, so a loss during them is caught too.
    state.integrity.check_generation(state.store.as_ref()).await;
    if let Some(why) = state.integrity.lost() {
        return Err(crate::store::StoreError::Lost(why).into());
    }
    let next_cursor = revocations.last().map(|r| r.cursor).unwrap_or(query.since);
    Ok(Json(FeedPage {
        revocations,
        next_cursor,
        frozen,
        generation: state.integrity.generation(),
        head,
    }))
}
