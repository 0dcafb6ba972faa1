//! `capgate::adapters::tower`: the guard as a tower `Layer`, for existing axum/hyper services.
//! A mapper turns each request into (resource, verb, attributes); requests it cannot map are
//! denied. The layer screens a request exactly as the proxy does ([`super::screen`]): routing
//! instructions, method overrides and a misplaced token are refused first; the target is made
//! canonical before the mapper sees it (a dot segment or an encoded slash is refused, so the
//! mapper and the service agree on the path); the body of an operation that needs an approval
//! is bound into it by digest. On allow the token is stripped and the decision is put into
//! the request's extensions as [`GuardedRequest`] for handlers that want the agent's name.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::request::Parts;
use ::http::StatusCode;
use axum::extract::Request;
use axum::response::Response;
use tower::Layer;
use tower_service::Service;

use super::screen::{self, RoutingHeaders, TokenSpellings};
use super::{deny_response, extract_token, problem, strip_token_headers, Mode, TokenHeader};
use crate::http::routes::{RouteError, RouteTable};
use capgate_core::guard::{Guard, Ledger, Request as GuardRequest};

type Mapper = dyn Fn(&Parts) -> Option<GuardRequest> + Send + Sync;

/// Added to the request's extensions when the guard let it through.
#[derive(Debug, Clone)]
pub struct GuardedRequest {
    pub decision_id: String,
    /// In shadow mode, whether enforce mode would have denied it.
    pub shadow_denied: bool,
}

#[derive(Clone)]
pub struct GuardLayer {
    guard: Arc<Guard>,
    mapper: Arc<Mapper>,
    mode: Mode,
    /// Without a ledger, allows that carry obligations (approval, counting, audit) are denied.
    ledger: Option<Arc<dyn Ledger>>,
    routing: RoutingHeaders,
}

impl GuardLayer {
    pub fn new(
        guard: Arc<Guard>,
        mapper: impl Fn(&Parts) -> Option<GuardRequest> + Send + Sync + 'static,
    ) -> Self {
        GuardLayer {
            guard,
            mapper: Arc::new(mapper),
            mode: Mode::Enforce,
            ledger: None,
            routing: RoutingHeaders::Refuse,
        }
    }

    /// A layer whose mapper is a route table, the proxy's own: `METHOD /path/{param}` to
    /// resource and verb, asked about with the same attributes as at the proxy. Routes that
    /// set their own mode are refused (the layer has one mode; only the proxy applies those).
    pub fn with_routes(
        guard: Arc<Guard>,
        routes: RouteTable,
        environment: impl Into<String>,
    ) -> Result<Self, RouteError> {
        if let Some(route) = routes.mode_override() {
            return Err(RouteError {
                route: route.to_owned(),
                why: "a route's own mode applies at the proxy only; set the layer's mode".into(),
            });
        }
        let environment = environment.into();
        Ok(GuardLayer::new(guard, move |parts: &Parts| {
            // The layer has made sure the path is canonical before any mapper runs.
            let path = screen::canonicalize(parts.uri.path()).ok()?;
            let matched = routes.find(&parts.method, &path.segments)?;
            Some(matched.operation(&parts.method, &path, parts.uri.query(), &environment))
        }))
    }

    /// Strips routing headers (`X-Forwarded-Proto` from a TLS terminator…) instead of
    /// refusing the request.
    pub fn with_routing_headers(mut self, routing: RoutingHeaders) -> Self {
        self.routing = routing;
        self
    }

    /// Lets the layer fulfil approvals, velocity counts and audit records through `ledger`
    /// (e.g. a [`crate::ledger::BrokerLedger`]), so writes can be allowed.
    pub fn with_ledger(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = GuardService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GuardService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GuardService<S> {
    inner: S,
    layer: GuardLayer,
}

impl<S> Service<Request> for GuardService<S>
where
    S: Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The service that was polled ready handles this request; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let mode = layer.mode;
            let (mut parts, body) = request.into_parts();
            let token = match extract_token(&parts.headers) {
                TokenHeader::Present(token) => token,
                TokenHeader::Missing => String::new(),
                TokenHeader::Conflicting => {
                    return Ok(problem(
                        StatusCode::UNAUTHORIZED,
                        "token_conflict",
                        "two different tokens were presented",
                        None,
                        mode,
                    ));
                }
            };
            let spellings = TokenSpellings::new(&token);
            if let Err(refusal) = screen::screen_head(&mut parts, layer.routing, spellings.as_ref())
            {
                return Ok(refusal.response(mode));
            }
            // The mapper and the service behind the layer must read one path, the one the
            // guard judges: the layer may sit behind a router that has already routed on the
            // raw target, so a target not already canonical is refused, not rewritten.
            if let Err(refusal) = canonical_target(&parts) {
                return Ok(refusal.response(mode));
            }
            let Some(mut guard_request) = (layer.mapper)(&parts) else {
                return Ok(problem(
                    StatusCode::FORBIDDEN,
                    "no_route",
                    "no mapping allows this request",
                    None,
                    mode,
                ));
            };
            let needs_approval = layer.guard.containment().needs_approval(guard_request.verb);
            let body = match screen::bind_body(body, needs_approval).await {
                Ok((body, digest)) => {
                    guard_request.attributes.extend(digest);
                    body
                }
                Err(refusal) => return Ok(refusal.response(mode)),
            };
            let body = match screen::screen_body(
                &parts.method,
                &mut parts.headers,
                body,
                spellings.as_ref(),
            )
            .await
            {
                Ok(screened) => screened.body,
                Err(refusal) => return Ok(refusal.response(mode)),
            };
            strip_token_headers(&mut parts.headers);
            let request = Request::from_parts(parts, body);
            let ledger = layer.ledger.as_deref();
            let authorized = crate::authorize(
                &layer.guard,
                mode,
                ledger,
                &token,
                std::slice::from_ref(&guard_request),
                request,
            )
            .await;
            match authorized {
                Ok(authorized) => {
                    let guarded = GuardedRequest {
                        decision_id: authorized.decision_id().to_owned(),
                        shadow_denied: authorized.shadow_deny().is_some(),
                    };
                    let mut request = authorized.into_inner();
                    request.extensions_mut().insert(guarded);
                    inner.call(request).await
                }
                Err(decision) => Ok(deny_response(&decision, mode)),
            }
        })
    }
}

/// Accepts only an origin-form target whose path is already canonical.
fn canonical_target(parts: &Parts) -> Result<(), screen::Refusal> {
    let canonical = screen::request_target(&parts.uri)?;
    if canonical.encoded != parts.uri.path() {
        return Err(screen::Refusal::NotCanonical {
            given: parts.uri.path().to_owned(),
            canonical: canonical.encoded,
        });
    }
    Ok(())
}
