//! How agents reach the gateway. Streamable HTTP: one endpoint per upstream server,
//! `/mcp/{server}`, served by the SDK's server transport (sessions for 2025 clients,
//! stateless requests with header/body checks for 2026-07-28 ones), behind a check that
//! refuses any request without a valid Capgate token with 401 before the protocol starts.
//! stdio: the gateway is the process the agent launches; its token comes from
//! `CAPGATE_TOKEN` and the real server runs as the gateway's child.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::StatusCode;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

use super::config::{McpConfig, McpConfigError};
use super::intake::{self, Intake};
use super::mediate::{SessionHandler, TokenSource};
use super::upstream::{UpstreamError, TOKEN_ENV};
use super::Gateway;
use crate::{deny_response, extract_token, problem, Mode, TokenHeader};
use capgate_core::guard::{Decision, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error(transparent)]
    Config(#[from] McpConfigError),
    #[error(transparent)]
    Policy(#[from] capgate_core::policy::PolicyError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Pins(#[from] super::pin::PinFileError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error(transparent)]
    Client(#[from] capgate_client::ClientError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("no `listen` address in the configuration")]
    NoListen,
    #[error("no server named {0} in the configuration")]
    UnknownServer(String),
    #[error("{TOKEN_ENV} is not set: the stdio gateway needs the agent's Capgate token")]
    NoToken,
    #[error("stdio session failed: {0}")]
    Stdio(String),
}

/// The HTTP router: `/mcp/{server}` for every configured server, each behind the token check
/// and the body's intake.
pub fn router(gateway: Arc<Gateway>, shutdown: CancellationToken) -> axum::Router {
    let mut router = axum::Router::new();
    for upstream in gateway.upstreams.values() {
        let config = StreamableHttpServerConfig::default()
            .with_allowed_hosts(gateway.config.allowed_hosts.clone())
            .with_max_request_body_bytes(gateway.config.max_message_bytes)
            .with_cancellation_token(shutdown.child_token());
        let path = format!("/mcp/{}", upstream.name());
        let sessions = Arc::new(LocalSessionManager::default());
        let (shared, upstream) = (gateway.clone(), upstream.clone());
        let service: StreamableHttpService<SessionHandler, LocalSessionManager> =
            StreamableHttpService::new(
                move || {
                    Ok(SessionHandler::new(
                        shared.clone(),
                        upstream.clone(),
                        TokenSource::Headers,
                    ))
                },
                sessions.clone(),
                config,
            );
        let screening = Intake {
            max_bytes: gateway.config.max_message_bytes,
            sessions,
        };
        router = router.merge(axum::Router::new().nest_service(&path, service).layer(
            axum::middleware::from_fn_with_state(screening, intake::screen),
        ));
    }
    router.layer(axum::middleware::from_fn_with_state(gateway, require_token))
}

/// Every request (POST, the GET stream, DELETE) carries a token the guard accepts, or gets
/// 401 problem+json before the MCP layer sees it. Each call is still decided on its own.
async fn require_token(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    let mode = Mode::Enforce;
    let token = match extract_token(request.headers()) {
        TokenHeader::Present(token) => token,
        TokenHeader::Missing => {
            return problem(
                StatusCode::UNAUTHORIZED,
                "token_missing",
                "send your Capgate token as Authorization: Bearer",
                None,
                mode,
            )
        }
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
    if let Err(denial) = gateway.guard.verify_token(&token) {
        let decision = Decision {
            id: String::new(),
            outcome: Outcome::Deny {
                code: denial.code,
                reason: denial.reason,
            },
            agent: None,
            session: None,
            explanation: Vec::new(),
            obligations: Vec::new(),
        };
        return deny_response(&decision, mode);
    }
    next.run(request).await
}

/// Runs the HTTP gateway: syncs keys, revocations and containment from the broker and
/// serves until `shutdown`.
pub async fn serve(
    config: McpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), McpError> {
    let addr = config.listen.ok_or(McpError::NoListen)?;
    let runtime = crate::runtime::AdapterRuntime::start(
        &config.broker,
        config.adapter_key_env.as_deref(),
        config.audit_spool.clone(),
    )?;
    let gateway = Arc::new(Gateway::new(
        config,
        runtime.keys,
        runtime.revocations,
        runtime.containment,
        runtime.ledger,
    )?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| McpError::Listen { addr, source })?;
    tracing::info!(%addr, "capgate mcp gateway listening");
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let result = axum::serve(listener, router(gateway, cancel.clone()))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await
        .map_err(McpError::Serve);
    for task in runtime.tasks {
        task.abort();
    }
    result
}

/// Runs one stdio session in front of `server` (a configured command): the agent's messages
/// on stdin/stdout, the real server as a child process.
pub async fn serve_stdio(config: McpConfig, server: &str) -> Result<(), McpError> {
    let token = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or(McpError::NoToken)?;
    let runtime = crate::runtime::AdapterRuntime::start(
        &config.broker,
        config.adapter_key_env.as_deref(),
        config.audit_spool.clone(),
    )?;
    let gateway = Arc::new(Gateway::new(
        config,
        runtime.keys,
        runtime.revocations,
        runtime.containment,
        runtime.ledger,
    )?);
    let upstream = gateway
        .upstream(server)
        .ok_or_else(|| McpError::UnknownServer(server.to_owned()))?;
    let max_line = gateway.config.max_message_bytes;
    let handler = SessionHandler::new(gateway, upstream, TokenSource::Fixed(token.into()));
    // The same cap as over HTTP: a longer line is dropped unread, never buffered whole.
    let transport = rmcp::transport::async_rw::AsyncRwTransport::<rmcp::RoleServer, _, _>::new(
        tokio::io::stdin(),
        tokio::io::stdout(),
    )
    .with_max_line_length(max_line);
    let running = handler
        .serve(transport)
        .await
        .map_err(|e| McpError::Stdio(e.to_string()))?;
    let result = running
        .waiting()
        .await
        .map(|_| ())
        .map_err(|e| McpError::Stdio(e.to_string()));
    for task in runtime.tasks {
        task.abort();
    }
    result
}
