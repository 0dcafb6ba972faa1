//! The proxy's side of a `[[graphql]]` endpoint: read the body (bounded), let the GraphQL
//! adapter judge it, make sure the token is genuine before asking the provider anything,
//! resolve environments, ask the guard about every operation as one batch, and forward the
//! adapter's own encoding of the request (never the agent's bytes) through the same
//! forwarding path as every route: allowlisted headers, credential injected, token stripped.

use ::http::header::{self, HeaderValue};
use ::http::request::Parts;
use ::http::{Method, StatusCode};
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;

use super::{forward, Proxy, Target};
use crate::graphql::{request, Endpoint, Refusal};
use crate::screen::TokenSpellings;
use crate::{deny_response, problem, Mode};
use capgate_core::guard::DenyCode;

pub(super) async fn handle(
    proxy: &Proxy,
    endpoint: &Endpoint,
    mut parts: Parts,
    body: Body,
    token: &str,
    spellings: Option<&TokenSpellings>,
    canonical: String,
) -> Response {
    let mode = Mode::Enforce;
    let limit = endpoint.limits().max_body;
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return Refusal::BodyTooLarge(limit).response(mode);
    };
    let mut content_types = parts.headers.get_all(header::CONTENT_TYPE).iter();
    let content_type = content_types.next().and_then(|v| v.to_str().ok());
    if content_types.next().is_some() {
        return Refusal::UnsupportedContentType("(several)".into()).response(mode);
    }
    let judged = match endpoint.judge(&parts.method, content_type, parts.uri.query(), &bytes) {
        Ok(judged) => judged,
        Err(refusal) => return refusal.response(mode),
    };
    // What is forwarded, and what the lookups bind, is read from these bytes: the token
    // must not be in them.
    let (body, query) = if judged.decoded.get {
        let query = judged.decoded.requests.first().map(request::encode_url);
        (Vec::new(), query)
    } else {
        (request::encode(&judged.decoded), None)
    };
    let leaked = spellings.is_some_and(|s| {
        s.found_in(&body) || query.as_deref().is_some_and(|q| s.found_in(q.as_bytes()))
    });
    if leaked {
        return Refusal::TokenMisplaced.response(mode);
    }
    // Only a genuine, unrevoked token makes the adapter spend its credential on lookups.
    if let Err(denial) = proxy.guard.verify_token(token) {
        let code = denial.code;
        return problem(status_of(code), code.as_str(), &denial.reason, None, mode);
    }
    let operations = match endpoint
        .operations(&judged.pending, &proxy.config.environment)
        .await
    {
        Ok(operations) => operations,
        Err(refusal) => return refusal.response(mode),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    if parts.method == Method::POST {
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let target = Target {
        canonical,
        query,
        tripwire: Default::default(),
    };
    let outgoing = Request::from_parts(parts, Body::from(body));
    // A proxy with GraphQL endpoints runs in enforce mode only (refused at start otherwise).
    let ledger = Some(proxy.ledger.as_ref());
    let payload = (outgoing, target);
    match crate::authorize(&proxy.guard, mode, ledger, token, &operations, payload).await {
        Ok(authorized) => forward(proxy, authorized, mode).await,
        Err(decision) => deny_response(&decision, mode),
    }
}

fn status_of(code: DenyCode) -> StatusCode {
    if code.is_authentication_failure() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
