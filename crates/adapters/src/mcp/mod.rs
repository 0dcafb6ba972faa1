//! `capgate proxy mcp`: a terminating MCP gateway. Agents speak MCP to the gateway (Streamable
//! HTTP in both protocol eras, or stdio), authenticated by their Capgate token; the gateway
//! speaks MCP to each real server as its own client with the real credential. In between,
//! every `tools/call`, `resources/read` and `prompts/get` is one guard operation decided on
//! what it asks for, and each listing shows only what this token could use. The protocol
//! on both sides is the official SDK's (`rmcp`); this module owns only the decisions.
//!
//! - `config`: servers, credentials, the tool, resource and prompt maps.
//! - `mapping`: resource templates filled from arguments; annotations raising verbs.
//! - `uri`: resource URIs matched against URI templates and prefixes.
//! - `pin`: tool definition digests and the pin file.
//! - `upstream`: the gateway's client connection to one server.
//! - `mediate`: the per-message decisions (the MCP server handler) and tool calls.
//! - `resources`, `prompts`: reads and prompts as guard operations; their listings.
//! - `refusal`: refusals with stable codes, shaped for each kind of answer.
//! - `intake`: what an HTTP body must be before the SDK parses it; a closed stream cancels.
//! - `transport`: the HTTP router (`/mcp/{server}`) and the stdio wrapper.

pub mod approvals;
pub mod config;
pub mod intake;
pub mod mapping;
pub mod mediate;
pub mod pin;
pub mod prompts;
pub mod refusal;
pub mod resources;
pub mod transport;
pub mod upstream;
pub mod uri;

use std::collections::HashMap;
use std::sync::Arc;

pub use config::{McpConfig, McpConfigError, ServerConfig, ToolConfig};
pub use transport::router;
pub use transport::{serve, serve_stdio, McpError};

use capgate_core::guard::{
    Authorized, ContainmentView, Decision, Guard, GuardConfig, KeyView, Ledger,
    Request as GuardRequest,
};
use capgate_core::policy::PolicySet;
use capgate_core::revocation::RevocationView;
use pin::PinBook;
use prompts::PromptMap;
use resources::ResourceMap;
use upstream::Upstream;

/// One server's resource and prompt maps, parsed at start.
#[derive(Default)]
pub struct ServerMaps {
    pub resources: ResourceMap,
    pub prompts: PromptMap,
}

/// What every session shares: the guard, the ledger, the pins, the maps and the upstream
/// connections.
pub struct Gateway {
    config: McpConfig,
    guard: Arc<Guard>,
    ledger: Arc<dyn Ledger>,
    pins: PinBook,
    approvals: approvals::PendingApprovals,
    upstreams: HashMap<String, Arc<Upstream>>,
    maps: HashMap<String, Arc<ServerMaps>>,
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
        let mut maps = HashMap::new();
        for server in &config.servers {
            configured.extend(server.pins());
            upstreams.insert(
                server.name.clone(),
                Arc::new(Upstream::new(server.clone())?),
            );
            maps.insert(
                server.name.clone(),
                Arc::new(ServerMaps {
                    resources: ResourceMap::compile(server)?,
                    prompts: PromptMap::compile(server)?,
                }),
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
            capgate_client::Client::new(&config.broker)?,
            approval_url,
        );
        Ok(Gateway {
            approvals,
            config,
            guard: Arc::new(guard),
            ledger,
            pins,
            upstreams,
            maps,
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
