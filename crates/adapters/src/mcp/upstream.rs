//! One upstream MCP server as the gateway's own client sees it: connected on first use with
//! the real credential (a header for Streamable HTTP, an environment variable for a local
//! command), shared by every agent session, reconnected after it closes. Nothing of the
//! agent's request but the decided-on message itself ever reaches it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::Tool;
use rmcp::service::{Peer, RunningService, ServiceError};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};

use super::config::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {server}: credential variable {var} is not set")]
    Credential { server: String, var: String },
    #[error("upstream {server}: {message}")]
    Connect { server: String, message: String },
    #[error("upstream {server}: {source}")]
    Service {
        server: String,
        source: ServiceError,
    },
}

pub struct Upstream {
    config: ServerConfig,
    credential: Option<String>,
    connection: tokio::sync::Mutex<Option<RunningService<RoleClient, ()>>>,
    /// The definitions last listed, and when: calls within [`DEFINITIONS_MAX_AGE`] are decided
    /// on them instead of asking the server again (a listing always asks).
    definitions: std::sync::Mutex<Option<(Instant, Arc<Vec<Tool>>)>>,
}

/// How long a call may rely on the last listing of the server's tools.
const DEFINITIONS_MAX_AGE: Duration = Duration::from_secs(2);

/// Variables the gateway never hands to a server process it starts: the agent's token among
/// them, whatever the agent's launcher put in the gateway's environment.
pub const TOKEN_ENV: &str = "CAPGATE_TOKEN";

impl Upstream {
    /// Reads the credential now, so a missing one stops the gateway at start.
    pub fn new(config: ServerConfig) -> Result<Self, UpstreamError> {
        let credential = config
            .credential_env
            .as_ref()
            .map(|var| {
                std::env::var(var)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| UpstreamError::Credential {
                        server: config.name.clone(),
                        var: var.clone(),
                    })
            })
            .transpose()?;
        Ok(Upstream {
            config,
            credential,
            connection: tokio::sync::Mutex::new(None),
            definitions: std::sync::Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The live connection's peer, connecting (again) when there is none.
    pub async fn peer(&self) -> Result<Peer<RoleClient>, UpstreamError> {
        let mut slot = self.connection.lock().await;
        if let Some(service) = slot.as_ref() {
            if !service.is_closed() {
                return Ok(service.peer().clone());
            }
        }
        let service = self.connect().await?;
        let peer = service.peer().clone();
        *slot = Some(service);
        Ok(peer)
    }

    /// Every tool the server offers (all pages), asked now.
    pub async fn tools(&self) -> Result<Arc<Vec<Tool>>, UpstreamError> {
        let peer = self.peer().await?;
        let tools = Arc::new(
            peer.list_all_tools()
                .await
                .map_err(|source| self.service_error(source))?,
        );
        if let Ok(mut slot) = self.definitions.lock() {
            *slot = Some((Instant::now(), tools.clone()));
        }
        Ok(tools)
    }

    /// The server's tools as listed at most [`DEFINITIONS_MAX_AGE`] ago.
    pub async fn recent_tools(&self) -> Result<Arc<Vec<Tool>>, UpstreamError> {
        let recent = self.definitions.lock().ok().and_then(|slot| {
            slot.as_ref()
                .filter(|(at, _)| at.elapsed() < DEFINITIONS_MAX_AGE)
                .map(|(_, tools)| tools.clone())
        });
        match recent {
            Some(tools) => Ok(tools),
            None => self.tools().await,
        }
    }

    pub fn service_error(&self, source: ServiceError) -> UpstreamError {
        UpstreamError::Service {
            server: self.config.name.clone(),
            source,
        }
    }

    async fn connect(&self) -> Result<RunningService<RoleClient, ()>, UpstreamError> {
        let fail = |message: String| UpstreamError::Connect {
            server: self.config.name.clone(),
            message,
        };
        if let Some(url) = &self.config.url {
            let mut transport = StreamableHttpClientTransportConfig::with_uri(url.as_str());
            if let Some(secret) = &self.credential {
                let header = self.config.credential_header.to_ascii_lowercase();
                if header == "authorization" && self.config.credential_prefix == "Bearer " {
                    transport = transport.auth_header(secret.clone());
                } else {
                    let name = http::HeaderName::from_bytes(header.as_bytes())
                        .map_err(|e| fail(format!("credential_header: {e}")))?;
                    let mut value = http::HeaderValue::from_str(&format!(
                        "{}{secret}",
                        self.config.credential_prefix
                    ))
                    .map_err(|_| fail("credential is not a valid header value".into()))?;
                    value.set_sensitive(true);
                    transport = transport.custom_headers(HashMap::from([(name, value)]));
                }
            }
            let transport = StreamableHttpClientTransport::from_config(transport);
            ().serve(transport)
                .await
                .map_err(|e| fail(format!("initialize failed: {e}")))
        } else if let Some(command) = &self.config.command {
            let (program, args) = command
                .split_first()
                .ok_or_else(|| fail("empty command".into()))?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args);
            // The agent's token stays with the gateway: no CAPGATE_* variable reaches the
            // server process.
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("CAPGATE_") {
                    cmd.env_remove(&key);
                }
            }
            if let (Some(var), Some(secret)) = (&self.config.credential_child_env, &self.credential)
            {
                cmd.env(var, secret);
            }
            let transport = TokioChildProcess::new(cmd)
                .map_err(|e| fail(format!("cannot start {program}: {e}")))?;
            ().serve(transport)
                .await
                .map_err(|e| fail(format!("initialize failed: {e}")))
        } else {
            Err(fail("no url and no command".into()))
        }
    }
}
