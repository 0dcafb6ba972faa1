//! `capgate proxy http`: a reverse proxy in front of an HTTP API. Each request is normalised,
//! matched to a route (unmatched routes are denied), checked by the guard, stripped of the
//! agent's token, given the real upstream credential, and streamed through.

mod graphql;
pub mod routes;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ::http::{StatusCode, Uri};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// Kept under its old name: the canonicaliser is the screen's, shared with the tower layer.
pub use super::screen::path;
use super::screen::{self, headers, RoutingHeaders, TokenSpellings, Tripwire};
use super::{deny_response, extract_token, problem, strip_token_headers, Mode, TokenHeader};
use super::{DECISION_HEADER, MODE_HEADER};
use crate::graphql::{Endpoint, GraphqlConfig, Upstream as GraphqlUpstream};
use capgate_core::guard::{Authorized, ContainmentView, Guard, GuardConfig, KeyView, Ledger};
use capgate_core::policy::PolicySet;
use capgate_core::revocation::RevocationView;
use capgate_core::settings::{duration, RunLimits};
use routes::{RouteConfig, RouteTable};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Policy(#[from] capgate_core::policy::PolicyError),
    #[error(transparent)]
    Route(#[from] routes::RouteError),
    #[error("upstream credential: {0}")]
    Credential(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Sync(#[from] capgate_client::ClientError),
    #[error(transparent)]
    Runtime(#[from] super::runtime::RuntimeError),
    #[error("upstream: {0}")]
    Headers(String),
    #[error("{0}")]
    Graphql(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL (http only in this version), e.g. `http://127.0.0.1:7000`.
    pub url: String,
    /// Header that carries the upstream credential.
    #[serde(default = "UpstreamConfig::default_header")]
    pub credential_header: String,
    /// Prepended to the credential, e.g. "Bearer ".
    #[serde(default)]
    pub credential_prefix: String,
    /// Read the credential from this environment variable…
    #[serde(default)]
    pub credential_env: Option<String>,
    /// …or from this file (relative to the config file).
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// Request headers this upstream gets besides the default allowlist
    /// ([`screen::headers::DEFAULT_FORWARDED`]); every other request header is dropped.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// Headers of a routing family (`X-Original-URL`, `X-Forwarded-Host`, …): `refuse` (400,
    /// the default) or `strip`. Never forwarded either way.
    #[serde(default)]
    pub routing_headers: RoutingHeaders,
}

impl UpstreamConfig {
    fn default_header() -> String {
        "authorization".into()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// The broker to sync keys and revocations from.
    pub broker: String,
    /// The environment this upstream belongs to (prod, staging): given to the guard.
    pub environment: String,
    /// Adapter name in logs and in the `adapter($name)` fact.
    #[serde(default = "ProxyConfig::default_name")]
    pub name: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "capgate_core::settings::default_adapter_policies")]
    pub adapter_policies: PathBuf,
    #[serde(
        default = "capgate_core::settings::default_max_staleness",
        deserialize_with = "duration"
    )]
    pub max_staleness: Duration,
    #[serde(default = "ProxyConfig::default_max_token_bytes")]
    pub max_token_bytes: usize,
    #[serde(default)]
    pub datalog: RunLimits,
    /// Environment variable holding this adapter's audit key (`cga_…`, configured at the
    /// broker under `[[adapters]]`). Without it, writes and deletes are denied: they could not
    /// be recorded.
    #[serde(default)]
    pub adapter_key_env: Option<String>,
    /// Local spool for decisions recorded off the request path.
    #[serde(default = "ProxyConfig::default_spool")]
    pub audit_spool: PathBuf,
    /// Serve Prometheus `/metrics` on this address. Never on `listen`: agents reach that
    /// one, and any path reserved there could shadow an upstream route.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    pub upstream: UpstreamConfig,
    /// Timeouts and the connection cap (`[connections]`).
    #[serde(default)]
    pub connections: capgate_net::connections::ConnectionLimits,
    pub routes: Vec<RouteConfig>,
    /// GraphQL endpoints on this listener: each request's root fields are judged one by one.
    #[serde(default)]
    pub graphql: Vec<GraphqlConfig>,
}

impl ProxyConfig {
    fn default_name() -> String {
        "http-proxy".into()
    }
    fn default_max_token_bytes() -> usize {
        16 * 1024
    }
    fn default_spool() -> PathBuf {
        PathBuf::from("capgate-audit-spool.jsonl")
    }

    pub fn load(path: &Path) -> Result<Self, ProxyError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProxyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: ProxyConfig = toml::from_str(&text).map_err(|e| ProxyError::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.adapter_policies.is_relative() {
            config.adapter_policies = base.join(&config.adapter_policies);
        }
        if config.audit_spool.is_relative() {
            config.audit_spool = base.join(&config.audit_spool);
        }
        for endpoint in &mut config.graphql {
            if endpoint.schema.is_relative() {
                endpoint.schema = base.join(&endpoint.schema);
            }
        }
        if let Some(file) = &mut config.upstream.credential_file {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }
}

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    config: ProxyConfig,
    routes: RouteTable,
    guard: Arc<Guard>,
    upstream: Uri,
    credential: (HeaderName, HeaderValue),
    forwarded: headers::ForwardedHeaders,
    client: HyperClient<HttpConnector, Body>,
    ledger: Arc<dyn Ledger>,
    graphql: Vec<Endpoint>,
}

/// Hop-by-hop and forwarding headers never passed through (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
];

impl Proxy {
    /// Builds the proxy over views the caller keeps fresh (see [`super::sync`]).
    pub fn new(
        config: ProxyConfig,
        keys: KeyView,
        revocations: Arc<RevocationView>,
        containment: Arc<ContainmentView>,
        ledger: Arc<dyn Ledger>,
    ) -> Result<Self, ProxyError> {
        let routes = RouteTable::new(&config.routes)?;
        let policy = PolicySet::load_dir(&config.adapter_policies)?;
        let upstream: Uri = config
            .upstream
            .url
            .parse()
            .map_err(|e| ProxyError::Credential(format!("upstream url: {e}")))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            return Err(ProxyError::Credential(
                "upstream url must be http://host:port".into(),
            ));
        }
        let credential = load_credential(&config.upstream)?;
        let forwarded = headers::ForwardedHeaders::new(&config.upstream.forward_headers)
            .map_err(ProxyError::Headers)?;
        let guard = Guard::new(
            GuardConfig {
                adapter: config.name.clone(),
                max_token_bytes: config.max_token_bytes,
                max_staleness: config.max_staleness,
                limits: config.datalog.clone(),
                cache_capacity: 10_000,
            },
            keys,
            revocations,
            policy,
        )
        .with_containment(containment);
        let client = HyperClient::builder(TokioExecutor::new()).build_http();
        if config.mode == Mode::Shadow && !config.graphql.is_empty() {
            return Err(ProxyError::Graphql(
                "GraphQL endpoints run in enforce mode only".into(),
            ));
        }
        let graphql = config
            .graphql
            .iter()
            .map(|endpoint| {
                let upstream = GraphqlUpstream {
                    url: format!(
                        "{}{}",
                        config.upstream.url.trim_end_matches('/'),
                        endpoint.path
                    ),
                    credential: credential.clone(),
                    timeout: Duration::from_secs(5),
                };
                Endpoint::new(endpoint, Path::new("."), upstream)
                    .map_err(|e| ProxyError::Graphql(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Proxy {
            config,
            routes,
            guard: Arc::new(guard),
            upstream,
            credential,
            forwarded,
            client,
            ledger,
            graphql,
        })
    }

    pub fn guard(&self) -> &Arc<Guard> {
        &self.guard
    }

    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new().fallback(handle).with_state(self)
    }
}

fn load_credential(config: &UpstreamConfig) -> Result<(HeaderName, HeaderValue), ProxyError> {
    let secret = match (&config.credential_env, &config.credential_file) {
        (Some(var), None) => std::env::var(var).map_err(|_| {
            ProxyError::Credential(format!("environment variable {var} is not set"))
        })?,
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| ProxyError::Credential(format!("{}: {e}", file.display())))?
            .trim()
            .to_owned(),
        _ => {
            return Err(ProxyError::Credential(
                "set exactly one of upstream.credential_env and upstream.credential_file".into(),
            ))
        }
    };
    if secret.is_empty() {
        return Err(ProxyError::Credential(
            "the upstream credential is empty".into(),
        ));
    }
    let name = HeaderName::from_bytes(config.credential_header.as_bytes())
        .map_err(|_| ProxyError::Credential("bad credential_header".into()))?;
    let mut value = HeaderValue::from_str(&format!("{}{secret}", config.credential_prefix))
        .map_err(|_| ProxyError::Credential("credential is not a valid header value".into()))?;
    value.set_sensitive(true);
    Ok((name, value))
}

async fn handle(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let mode = proxy.config.mode;
    let reject = |status, code: &str, detail: &str| problem(status, code, detail, None, mode);
    let canonical = match screen::request_target(request.uri()) {
        Ok(canonical) => canonical,
        Err(refusal) => return refusal.response(mode),
    };
    let (mut parts, body) = request.into_parts();
    let token = match extract_token(&parts.headers) {
        TokenHeader::Present(token) => token,
        TokenHeader::Missing => String::new(),
        TokenHeader::Conflicting => {
            return problem(
                StatusCode::UNAUTHORIZED,
                "token_conflict",
                "two different tokens were presented",
                None,
                mode,
            )
        }
    };
    let spellings = TokenSpellings::new(&token);
    if let Err(refusal) = screen::screen_head(
        &mut parts,
        proxy.config.upstream.routing_headers,
        spellings.as_ref(),
    ) {
        return refusal.response(mode);
    }
    let query = parts.uri.query().map(str::to_owned);
    if let Some(endpoint) = proxy.graphql.iter().find(|e| e.path == canonical.encoded) {
        return graphql::handle(
            &proxy,
            endpoint,
            parts,
            body,
            &token,
            spellings.as_ref(),
            canonical.encoded,
        )
        .await;
    }
    let Some(route) = proxy.routes.find(&parts.method, &canonical.segments) else {
        tracing::warn!(adapter = %proxy.config.name, method = %parts.method, path = %canonical.encoded, mode = mode.as_str(), "no route: deny");
        return reject(
            StatusCode::FORBIDDEN,
            "no_route",
            "no route allows this method and path",
        );
    };
    let mode = route.mode.unwrap_or(mode);
    let environment = &proxy.config.environment;
    let mut guard_request =
        route.operation(&parts.method, &canonical, query.as_deref(), environment);
    // Every body is screened (method overrides, the token); what is not bound into an
    // approval streams.
    let needs_approval = proxy.guard.containment().needs_approval(route.verb);
    let body = match screen::bind_body(body, needs_approval).await {
        Ok((body, digest)) => {
            guard_request.attributes.extend(digest);
            body
        }
        Err(refusal) => return refusal.response(mode),
    };
    let screened = match screen::screen_body(
        &parts.method,
        &mut parts.headers,
        body,
        spellings.as_ref(),
    )
    .await
    {
        Ok(screened) => screened,
        Err(refusal) => return refusal.response(mode),
    };
    let request = Request::from_parts(parts, screened.body);
    let target = Target {
        canonical: canonical.encoded,
        query,
        tripwire: screened.tripwire,
    };
    let ledger = Some(proxy.ledger.as_ref());
    let payload = (request, target);
    let authorized = super::authorize(
        &proxy.guard,
        mode,
        ledger,
        &token,
        std::slice::from_ref(&guard_request),
        payload,
    )
    .await;
    match authorized {
        Ok(authorized) => forward(&proxy, authorized, mode).await,
        Err(decision) => deny_response(&decision, mode),
    }
}

pub(super) struct Target {
    canonical: String,
    query: Option<String>,
    /// Says why, when the streamed body was cut on its way.
    tripwire: Arc<Tripwire>,
}

/// Sends an authorised request upstream: canonical path, allowlisted headers only, credential
/// injected, token removed.
pub(super) async fn forward(
    proxy: &Proxy,
    authorized: Authorized<(Request, Target)>,
    mode: Mode,
) -> Response {
    let decision_id = authorized.decision_id().to_owned();
    let (request, target) = authorized.into_inner();
    let (mut parts, body) = request.into_parts();
    let path_and_query = match &target.query {
        Some(query) => format!("{}?{query}", target.canonical),
        None => target.canonical.clone(),
    };
    let uri = Uri::builder()
        .scheme("http")
        .authority(
            proxy
                .upstream
                .authority()
                .map(|a| a.as_str())
                .unwrap_or_default(),
        )
        .path_and_query(path_and_query)
        .build();
    let Ok(uri) = uri else {
        return problem(
            StatusCode::BAD_REQUEST,
            "path_rejected",
            "cannot build upstream target",
            Some(&decision_id),
            mode,
        );
    };
    strip_token_headers(&mut parts.headers);
    remove_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    proxy.forwarded.retain(&mut parts.headers);
    parts
        .headers
        .insert(proxy.credential.0.clone(), proxy.credential.1.clone());
    parts.uri = uri;
    let upstream_request = Request::from_parts(parts, body);
    match proxy.client.request(upstream_request).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            headers::strip_response_instructions(&mut parts.headers);
            if let Ok(id) = HeaderValue::from_str(&decision_id) {
                parts
                    .headers
                    .insert(HeaderName::from_static(DECISION_HEADER), id);
            }
            parts.headers.insert(
                HeaderName::from_static(MODE_HEADER),
                HeaderValue::from_static(mode.as_str()),
            );
            Response::from_parts(parts, Body::new(body))
        }
        // The screen cut the body on its way: answer with its reason.
        Err(_) if target.tripwire.tripped().is_some() => target
            .tripwire
            .tripped()
            .map(|refusal| refusal.response(mode))
            .unwrap_or_default(),
        Err(e) => {
            tracing::error!(error = %e, decision_id = %decision_id, "upstream request failed");
            problem(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the upstream did not answer",
                Some(&decision_id),
                mode,
            )
        }
    }
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Runs the proxy: syncs keys and revocations from the broker and serves until `shutdown`.
pub async fn serve(
    config: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    let runtime = super::runtime::AdapterRuntime::start(
        &config.broker,
        config.adapter_key_env.as_deref(),
        config.audit_spool.clone(),
    )?;
    let addr = config.listen;
    let metrics_listen = config.metrics_listen;
    let proxy = Arc::new(Proxy::new(
        config,
        runtime.keys.clone(),
        runtime.revocations.clone(),
        runtime.containment.clone(),
        runtime.ledger.clone(),
    )?);
    let mut tasks = Vec::new();
    if let Some(addr) = metrics_listen {
        let server = runtime
            .serve_metrics(addr, &proxy.guard)
            .await
            .map_err(|source| ProxyError::Listen { addr, source })?;
        tasks.push(server);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Listen { addr, source })?;
    tracing::info!(%addr, "capgate http proxy listening");
    let limits = proxy.config.connections.clone();
    // Two descriptors per client connection: its own and the upstream one it is relayed to.
    let result =
        capgate_net::connections::http::serve(listener, proxy.router(), limits, 2, shutdown)
            .await
            .map_err(ProxyError::Serve);
    for task in runtime.tasks.into_iter().chain(tasks) {
        task.abort();
    }
    result
}
