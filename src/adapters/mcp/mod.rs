//! `capgate proxy mcp`: a terminating MCP gateway. Agents speak MCP to the gateway (Streamable
//! HTTP in both protocol eras, or stdio), authenticated by their Capgate token; the gateway
//! speaks MCP to each real server as its own client with the real credential. In between,
//! every `tools/call` is one guard operation decided on its arguments, and `tools/list`
//! shows only what this token could call. The protocol on both sides is the official SDK's
//! (`rmcp`); this module owns only the decisions.
//!
//! - `config`: servers, credentials, the tool map.
//! - `mapping`: resource templates filled from arguments; annotations raising verbs.
//! - `uri`: resource URIs matched against URI templates and prefixes.
//! - `pin`: tool definition digests and the pin file.
//! - `upstream`: the gateway's client connection to one server.
//! - `mediate`: the per-message decisions (the MCP server handler).
//! - `intake`: what an HTTP body must be before the SDK parses it; a closed stream cancels.
//! - `transport`: the HTTP router (`/mcp/{server}`) and the stdio wrapper.

pub mod approvals;
pub mod config;
pub mod intake;
pub mod mapping;
pub mod mediate;
pub mod pin;
pub mod transport;
pub mod upstream;
pub mod uri;

use std::collections::HashMap;
use std::sync::Arc;

pub use config::{McpConfig, McpConfigError, ServerConfig, ToolConfig};
pub use transport::router;
pub use transport::{serve, serve_stdio, McpError};

use crate::guard::{
    Authorized, ContainmentView, Decision, Guard, GuardConfig, KeyView, Ledger,
    Request as GuardRequest,
};
use crate::policy::PolicySet;
use crate::revocation::RevocationView;
use pin::PinBook;
use upstream::Upstream;

/// What every session shares: the guard, the ledger, the pins and the upstream connections.
pub struct Gateway {
    config: McpConfig,
    guard: Arc<Guard>,
    ledger: Arc<dyn Ledger>,
    pins: PinBook,
    approvals: approvals::PendingApprovals,
    upstreams: HashMap<String, Arc<Upstream>>,
}

impl Gateway {
    /// Builds the gateway over views the caller keeps fresh (see `adapters::sync`).
    pub fn new(
        config: McpConfig,
        keys: KeyView,
        revocations: Arc<RevocationView>,
        containment: Arc<ContainmentView>,
        ledger: Arc<dyn Ledger>,
    ) -> Result<Self, McpError> {
        config.validate()?;
        let policy = PolicySet::load_dir(&config.adapter_policies)?;
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
        let mut configured = Vec::new();
        let mut upstreams = HashMap::new();
        for server in &config.servers {
            configured.extend(server.pins());
            upstreams.insert(
                server.name.clone(),
                Arc::new(Upstream::new(server.clone())?),
            );
        }
        let pins = PinBook::open(&config.pin_file, &configured)?;
        let approval_url = config.approval_url.clone().unwrap_or_else(|| {
            format!(
                "{}/v1/approvals/{{id}}",
                config.broker.trim_end_matches('/')
            )
        });
        let approvals = approvals::PendingApprovals::new(
            crate::client::Client::new(&config.broker)?,
            approval_url,
        );
        Ok(Gateway {
            approvals,
            config,
            guard: Arc::new(guard),
            ledger,
            pins,
            upstreams,
        })
    }

    pub fn guard(&self) -> &Arc<Guard> {
        &self.guard
    }

    pub fn config(&self) -> &McpConfig {
        &self.config
    }

    fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.upstreams.get(name).cloned()
    }

    /// The one call site of the guard for MCP operations.
    async fn authorize<T>(
        &self,
        token: &str,
        request: &GuardRequest,
        payload: T,
    ) -> Result<Authorized<T>, Box<Decision>> {
        mediate::authorize_operation(self, token, request, payload).await
    }
}
