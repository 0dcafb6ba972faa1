//! What a request may not carry toward an upstream, whichever adapter forwards it (the
//! reverse proxy or the tower layer): instructions that make the upstream act on another
//! path, method, host or scheme than the guard judged (routing headers, method overrides in
//! headers, the query or a form body), and the agent's token anywhere but its header. Each
//! is a [`Refusal`] with a stable code, answered as problem+json before the guard is asked,
//! so nothing of such a request reaches the upstream or the audit trail as an allow.

pub mod body;
pub mod headers;
pub mod overrides;
pub mod token;

use ::http::request::Parts;
use ::http::StatusCode;
use axum::response::Response;

use super::{problem, Mode};
pub use body::{screen_body, Screened, Tripwire};
pub use headers::{Family, ForwardedHeaders, RoutingHeaders};
pub use token::{contains_token, TokenSpellings};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("header {name} tells upstream servers the request's {} and is not accepted", .family.as_str())]
    RoutingHeader { name: String, family: Family },
    #[error("{0} overrides the request method and is not accepted")]
    MethodOverride(String),
    #[error("the Capgate token appears in the {0}; send it only in the Authorization or Capgate-Token header, never where the upstream could read it")]
    TokenMisplaced(String),
    #[error("request has more than one Content-Type header")]
    AmbiguousContentType,
    #[error(
        "bodies the adapter reads before forwarding (form or JSON POSTs) are limited to {0} bytes"
    )]
    BodyTooLarge(usize),
    #[error("the request body could not be read")]
    BodyUnreadable,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::RoutingHeader { .. } | Refusal::AmbiguousContentType => "header_rejected",
            Refusal::MethodOverride(_) => "method_override_rejected",
            Refusal::TokenMisplaced(_) => "token_misplaced",
            Refusal::BodyTooLarge(_) => "body_too_large",
            Refusal::BodyUnreadable => "body_unreadable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn response(&self, mode: Mode) -> Response {
        tracing::warn!(code = self.code(), reason = %self, "request refused before the guard");
        problem(self.status(), self.code(), &self.to_string(), None, mode)
    }
}

/// Screens the request head: routing headers (refused or stripped, as configured), method
/// overrides in the query, and the token outside the token headers.
pub fn screen_head(
    parts: &mut Parts,
    routing: RoutingHeaders,
    token: Option<&TokenSpellings>,
) -> Result<(), Refusal> {
    match routing {
        RoutingHeaders::Refuse => {
            if let Some((name, family)) = headers::first_routing_header(&parts.headers) {
                return Err(match family {
                    Family::Method => Refusal::MethodOverride(format!("header {name}")),
                    family => Refusal::RoutingHeader {
                        name: name.to_string(),
                        family,
                    },
                });
            }
        }
        RoutingHeaders::Strip => headers::strip_routing_headers(&mut parts.headers),
    }
    if let Some(found) = parts.uri.query().and_then(overrides::in_urlencoded) {
        return Err(Refusal::MethodOverride(format!("query {found}")));
    }
    if let Some(place) = token.and_then(|t| token::in_head(parts, t)) {
        return Err(Refusal::TokenMisplaced(place));
    }
    Ok(())
}
