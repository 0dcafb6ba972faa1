//! Adapters translate a protocol into (resource, verb, attributes), ask the guard, and turn its
//! answer back into the protocol. What all HTTP-facing adapters share lives here: the token
//! headers, the enforce/shadow mode, and the one mapping of a deny to a problem response.

pub mod graphql;
pub mod http;
pub mod ledger;
pub mod mcp;
pub mod runtime;
pub mod screen;
pub mod sync;
pub mod tower;

use ::http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use ::http::StatusCode;
use axum::body::Body;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use capgate_core::guard::{
    Authorized, Decision, DenyCode, Enforcement, Guard, Ledger, Outcome, Request as GuardRequest,
};

/// The header an agent may use instead of `Authorization: Bearer`.
pub const TOKEN_HEADER: &str = "capgate-token";
pub const DECISION_HEADER: &str = "capgate-decision-id";
pub const MODE_HEADER: &str = "capgate-mode";

/// `enforce` denies; `shadow` computes and logs the decision it would make and lets the
/// request through, so a policy can be rolled out safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenHeader {
    Missing,
    /// Two different tokens: refuse rather than pick one.
    Conflicting,
    Present(String),
}

/// The agent's token from `Authorization: Bearer` or `Capgate-Token`.
pub fn extract_token(headers: &HeaderMap) -> TokenHeader {
    let bearer = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    let header = headers
        .get_all(TOKEN_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok().map(|t| t.trim().to_owned()));
    let mut tokens: Vec<String> = bearer.chain(header).filter(|t| !t.is_empty()).collect();
    tokens.dedup();
    match tokens.len() {
        0 => TokenHeader::Missing,
        1 => TokenHeader::Present(tokens.remove(0)),
        _ => TokenHeader::Conflicting,
    }
}

/// The one place an adapter's mode becomes the guard's [`Enforcement`]: in enforce mode a
/// deny is final (and without a ledger, an allow that still has obligations is a deny); in
/// shadow mode the request goes through with the deny it would have had.
pub async fn authorize<T>(
    guard: &Guard,
    mode: Mode,
    ledger: Option<&dyn Ledger>,
    token: &str,
    operations: &[GuardRequest],
    payload: T,
) -> Result<Authorized<T>, Box<Decision>> {
    let enforcement = match mode {
        Mode::Enforce => Enforcement::Enforce(ledger),
        Mode::Shadow => Enforcement::Shadow(ledger),
    };
    guard
        .authorize(token, operations, payload, enforcement)
        .await
}

/// Removes every header that could carry the agent's token toward the upstream.
pub fn strip_token_headers(headers: &mut HeaderMap) {
    headers.remove(AUTHORIZATION);
    headers.remove(TOKEN_HEADER);
}

/// A problem+json response for an adapter refusal.
pub fn problem(
    status: StatusCode,
    code: &str,
    detail: &str,
    decision_id: Option<&str>,
    mode: Mode,
) -> Response {
    let mut body = json!({
        "type": format!("urn:capgate:problem:{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    if let Some(id) = decision_id {
        body["decision_id"] = json!(id);
    }
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(
        HeaderName::from_static(MODE_HEADER),
        HeaderValue::from_static(mode.as_str()),
    );
    if let Some(id) = decision_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(HeaderName::from_static(DECISION_HEADER), id);
    }
    response
}

/// 401 when the token itself is unusable, 503 when the adapter cannot judge (stale view),
/// 403 for every other deny.
pub fn deny_response(decision: &Decision, mode: Mode) -> Response {
    let (code, reason) = match &decision.outcome {
        Outcome::Deny { code, reason } => (*code, reason.as_str()),
        Outcome::ApprovalRequired {
            approval_id,
            digest,
        } => return approval_response(decision, approval_id.as_deref(), digest, mode),
        Outcome::Allow => (
            DenyCode::PolicyError,
            "internal error: allow mapped to a deny",
        ),
    };
    let status = if code.is_authentication_failure() {
        StatusCode::UNAUTHORIZED
    } else if matches!(
        code,
        DenyCode::RevocationFeedStale
            | DenyCode::RevocationFeedReset
            | DenyCode::ContainmentUnavailable
            | DenyCode::AuditUnavailable
    ) {
        StatusCode::SERVICE_UNAVAILABLE
    } else if matches!(code, DenyCode::RateLimited | DenyCode::UseBudgetExhausted) {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::FORBIDDEN
    };
    problem(status, code.as_str(), reason, Some(&decision.id), mode)
}

/// 403 `approval_required`, naming the approval request an operator must approve.
fn approval_response(
    decision: &Decision,
    approval_id: Option<&str>,
    digest: &str,
    mode: Mode,
) -> Response {
    let detail = match approval_id {
        Some(id) => format!("this operation needs an operator's approval: request {id} (digest {digest}); retry with the token returned by POST /v1/approvals/{id}/grant once approved"),
        None => format!("this operation needs an operator's approval (digest {digest})"),
    };
    let mut response = problem(
        StatusCode::FORBIDDEN,
        "approval_required",
        &detail,
        Some(&decision.id),
        mode,
    );
    if let Some(id) = approval_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("capgate-approval-id"), id);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comes_from_either_header_but_not_two_different_ones() {
        let mut headers = HeaderMap::new();
        assert_eq!(extract_token(&headers), TokenHeader::Missing);
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(extract_token(&headers), TokenHeader::Present("abc".into()));
        headers.insert(TOKEN_HEADER, HeaderValue::from_static("abc"));
        assert_eq!(extract_token(&headers), TokenHeader::Present("abc".into()));
        headers.insert(TOKEN_HEADER, HeaderValue::from_static("xyz"));
        assert_eq!(extract_token(&headers), TokenHeader::Conflicting);
        strip_token_headers(&mut headers);
        assert!(headers.is_empty());
    }
}
