//! What a request may not carry toward an upstream, and what of it the guard judges,
//! whichever adapter forwards it (the reverse proxy or the tower layer): one canonical
//! request target (absolute-form, dot segments and encoded separators refused), no
//! instructions that make the upstream act on another path, method, host or scheme than the
//! guard judged (routing headers, method overrides in headers, the query or a form body), the
//! agent's token nowhere but its header, and the body of an operation that needs an approval
//! bound into it by digest. Each refusal is a [`Refusal`] with a stable code, answered as
//! problem+json before the guard is asked, so nothing of such a request reaches the upstream
//! or the audit trail as an allow.

pub mod body;
pub mod headers;
pub mod overrides;
pub mod path;
pub mod token;

use ::http::request::Parts;
use ::http::{StatusCode, Uri};
use axum::body::Body;
use axum::response::Response;
use sha2::Digest;

use super::{problem, Mode};
pub use body::{screen_body, Screened, Tripwire};
pub use headers::{Family, ForwardedHeaders, RoutingHeaders};
pub use path::{canonicalize, CanonicalPath, PathError};
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
    #[error("use an origin-form request target")]
    AbsoluteForm,
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("path {given:?} is not in canonical form; send {canonical:?}")]
    NotCanonical { given: String, canonical: String },
    #[error("bodies of operations that need approval are limited to {} MiB", MAX_APPROVAL_BODY >> 20)]
    ApprovalBodyTooLarge,
}

/// The largest body an approval can be bound to (it is buffered to be hashed).
pub const MAX_APPROVAL_BODY: usize = 1 << 20;

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::RoutingHeader { .. } | Refusal::AmbiguousContentType => "header_rejected",
            Refusal::MethodOverride(_) => "method_override_rejected",
            Refusal::TokenMisplaced(_) => "token_misplaced",
            Refusal::BodyTooLarge(_) | Refusal::ApprovalBodyTooLarge => "body_too_large",
            Refusal::BodyUnreadable => "body_unreadable",
            Refusal::AbsoluteForm => "absolute_form_rejected",
            Refusal::Path(_) | Refusal::NotCanonical { .. } => "path_rejected",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BodyTooLarge(_) | Refusal::ApprovalBodyTooLarge => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
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

/// The request target the guard judges and the upstream receives: origin-form only (an
/// absolute-form or authority-form target would let the client pick what "path" means), its
/// path canonical (see [`path`]).
pub fn request_target(uri: &Uri) -> Result<CanonicalPath, Refusal> {
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(Refusal::AbsoluteForm);
    }
    Ok(canonicalize(uri.path())?)
}

/// An approval is bound to the exact operation, body included: for an operation that needs
/// one, the body is buffered (at most [`MAX_APPROVAL_BODY`]) and its SHA-256 returned as the
/// `body_sha256` attribute the approval digest covers. Any other body streams untouched.
pub async fn bind_body(
    body: Body,
    needs_approval: bool,
) -> Result<(Body, Option<(String, String)>), Refusal> {
    if !needs_approval {
        return Ok((body, None));
    }
    let bytes = axum::body::to_bytes(body, MAX_APPROVAL_BODY)
        .await
        .map_err(|_| Refusal::ApprovalBodyTooLarge)?;
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    Ok((Body::from(bytes), Some(("body_sha256".into(), digest))))
}
