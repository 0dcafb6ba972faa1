//! Per-message mediation: the gateway's MCP server side. Each `tools/call` becomes one guard
//! operation (resource from the call's arguments, verb from the map, raised by annotations),
//! decided before anything reaches the upstream; `tools/list` answers only tools this
//! token could call and whose definitions still match their pins. Reads and prompts are
//! decided alike (`resources`, `prompts`); what every decision shares (the token, the
//! approval retry, the guard, the cancellable relay) lives here. Tool refusals reach the
//! agent as tool results with `isError` (the model reads them) carrying the deny code and
//! reason.

use std::future::Future;
use std::sync::Arc;

use rmcp::model::{
    CacheScope, CallToolRequestParams, CallToolResponse, GetPromptRequestParams, GetPromptResponse,
    Implementation, ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{Peer, RequestContext, ServiceError};
use rmcp::{ErrorData as McpError, RoleClient, RoleServer, ServerHandler};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::approvals::Collected;
use super::mapping::{raised_by_annotations, ResourceTemplate};
use super::pin::{tool_digest, write_canonical, PinCheck};
use super::refusal::{Code, Refusal};
use super::upstream::Upstream;
use super::{Gateway, ServerMaps};
use crate::screen::TokenSpellings;
use crate::{extract_token, TokenHeader};
use capgate_core::guard::containment::operation;
use capgate_core::guard::{Authorized, Decision, Outcome, Request as GuardRequest};
use capgate_core::scope::{ResourcePattern, Verb};

/// Where a session's token comes from: each HTTP request's own headers, or (stdio) the
/// environment the agent launched the gateway with.
#[derive(Clone)]
pub enum TokenSource {
    Headers,
    Fixed(Arc<str>),
}

/// One agent session in front of one upstream server.
#[derive(Clone)]
pub struct SessionHandler {
    pub(super) gateway: Arc<Gateway>,
    pub(super) upstream: Arc<Upstream>,
    token: TokenSource,
}

/// A mapped tool, ready to decide on.
struct Mapped {
    template: ResourceTemplate,
    verb: Verb,
}

/// Why a read or prompt was not answered: the gateway refused, or the upstream's own error
/// (passed on: it is the server's answer to a request the guard allowed).
pub(super) enum Failure {
    Refused(Refusal),
    Upstream(McpError),
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        Failure::Refused(refusal)
    }
}

impl Failure {
    fn into_error(self, url_elicitation: bool) -> McpError {
        match self {
            Failure::Refused(refusal) => refusal.request_error(url_elicitation),
            Failure::Upstream(error) => error,
        }
    }
}

/// The rights of a token's authority block in the gateway's environment: what listings
/// filter on (attenuation can only narrow further; the guard decides each request).
pub(super) struct Rights(Vec<(ResourcePattern, Verb)>);

impl Rights {
    /// Could some request filling `template` name a resource one of the rights covers?
    pub(super) fn could_reach(&self, template: &ResourceTemplate, verb: Verb) -> bool {
        self.0
            .iter()
            .any(|(pattern, v)| *v == verb && template.reachable_by(pattern))
    }

    /// Does one of the rights cover `resource`?
    pub(super) fn covers(&self, resource: &str, verb: Verb) -> bool {
        self.0
            .iter()
            .any(|(pattern, v)| *v == verb && pattern.covers(resource))
    }
}

impl SessionHandler {
    pub fn new(gateway: Arc<Gateway>, upstream: Arc<Upstream>, token: TokenSource) -> Self {
        SessionHandler {
            gateway,
            upstream,
            token,
        }
    }

    pub(super) fn token(&self, context: &RequestContext<RoleServer>) -> Result<String, Refusal> {
        match &self.token {
            TokenSource::Fixed(token) => Ok(token.to_string()),
            TokenSource::Headers => {
                let parts = context
                    .extensions
                    .get::<http::request::Parts>()
                    .ok_or_else(|| {
                        Refusal::new(Code::TokenMissing, "no HTTP request to read the token from")
                    })?;
                match extract_token(&parts.headers) {
                    TokenHeader::Present(token) => Ok(token),
                    TokenHeader::Missing => Err(Refusal::new(
                        Code::TokenMissing,
                        "send your Capgate token as Authorization: Bearer",
                    )),
                    TokenHeader::Conflicting => Err(Refusal::new(
                        Code::TokenConflict,
                        "two different tokens were presented",
                    )),
                }
            }
        }
    }

    /// The token's rights in this gateway's environment, the token verified first.
    pub(super) fn rights(&self, context: &RequestContext<RoleServer>) -> Result<Rights, Refusal> {
        let token = self.token(context)?;
        let verified = self
            .gateway
            .guard
            .verify_token(&token)
            .map_err(Refusal::from_token)?;
        let environment = &self.gateway.config.environment;
        Ok(Rights(
            verified
                .granted_rights()
                .into_iter()
                .filter(|right| &right.environment == environment)
                .map(|right| (right.resource, right.verb))
                .collect(),
        ))
    }

    pub(super) fn maps(&self) -> Arc<ServerMaps> {
        self.gateway
            .maps
            .get(self.upstream.name())
            .cloned()
            .unwrap_or_default()
    }

    /// `true` when the token appears in `bytes` (arguments, a URI): it never travels upstream.
    pub(super) fn carries_token(token: &str, bytes: &[u8]) -> bool {
        TokenSpellings::new(token).is_some_and(|t| t.found_in(bytes))
    }

    /// The guard's decision on `request`, collecting the operator's grant first when this is
    /// the retry of a request that asked for approval (its approval block names this exact
    /// operation's digest). A refusal names the approval request where there is one.
    pub(super) async fn decide<T>(
        &self,
        token: &str,
        request: &GuardRequest,
        payload: T,
    ) -> Result<Authorized<T>, Refusal> {
        let digest = operation(&self.gateway.config.name, request).digest();
        let approvals = &self.gateway.approvals;
        let mut deciding = token.to_owned();
        if let Some(id) = approvals.pending(token, &digest) {
            match approvals.collect(token, &digest, &id).await {
                Collected::Granted(granted) => deciding = granted,
                Collected::Waiting => {
                    let mut refusal = Refusal::new(
                        Code::ApprovalPending,
                        format!("approval request {id} is still waiting for an operator"),
                    );
                    refusal.approval_id = Some(id.clone());
                    refusal.approval_url = Some(approvals.url(&id));
                    return Err(refusal);
                }
                Collected::Gone => {}
            }
        }
        self.gateway
            .authorize(&deciding, request, payload)
            .await
            .map_err(|decision| {
                let mut refusal = Refusal::from_decision(&decision);
                if let Outcome::ApprovalRequired {
                    approval_id: Some(id),
                    ..
                } = &decision.outcome
                {
                    approvals.remember(token, &digest, id);
                    refusal.approval_url = Some(approvals.url(id));
                }
                refusal
            })
    }

    pub(super) async fn peer(&self) -> Result<Peer<RoleClient>, Refusal> {
        self.upstream.peer().await.map_err(|e| {
            tracing::error!(error = %e, server = self.upstream.name(), "upstream connect failed");
            Refusal::new(
                Code::UpstreamUnavailable,
                "the upstream server did not answer",
            )
        })
    }

    /// Runs an allowed request upstream until it answers or the agent cancels; dropping the
    /// upstream request (the agent went away) sends the server a cancellation.
    pub(super) async fn relay<T>(
        &self,
        context: &RequestContext<RoleServer>,
        upstream_call: impl Future<Output = Result<T, ServiceError>>,
    ) -> Result<Result<T, ServiceError>, Refusal> {
        tokio::select! {
            result = upstream_call => Ok(result),
            _ = context.ct.cancelled() => Err(Refusal::new(Code::Cancelled, "the client cancelled the call")),
        }
    }

    /// What a read or prompt answers when the upstream fails: its own JSON-RPC error, or
    /// `upstream_unavailable` for anything else.
    pub(super) fn upstream_failure(&self, decision_id: &str, error: ServiceError) -> Failure {
        match error {
            ServiceError::McpError(error) => Failure::Upstream(error),
            other => {
                tracing::error!(error = %other, decision_id, "upstream request failed");
                Failure::Refused(Refusal::new(
                    Code::UpstreamUnavailable,
                    "the upstream server failed the request",
                ))
            }
        }
    }

    fn mapped(&self, tool: &Tool) -> Option<Mapped> {
        let config = self
            .upstream
            .config()
            .tools
            .iter()
            .find(|t| t.name == tool.name)?;
        // Templates were validated at load; a failure here is a deny, not a panic.
        let template = ResourceTemplate::parse(&config.resource).ok()?;
        Some(Mapped {
            template,
            verb: raised_by_annotations(config.verb, tool.annotations.as_ref()),
        })
    }

    fn pin(&self, tool: &Tool) -> PinCheck {
        self.gateway
            .pins
            .check(self.upstream.name(), &tool.name, &tool_digest(tool))
    }

    /// The upstream's definition of `name`, listed at most a moment ago: a call is decided on
    /// what the server says the tool is, so a changed definition is caught at the call too.
    async fn definition(&self, name: &str) -> Result<Option<Tool>, Refusal> {
        let tools = self.upstream.recent_tools().await.map_err(|e| {
            tracing::error!(error = %e, "upstream tools/list failed");
            Refusal::new(
                Code::UpstreamUnavailable,
                "the upstream server did not answer",
            )
        })?;
        Ok(tools.iter().find(|t| t.name == name).cloned())
    }

    async fn call(
        &self,
        params: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, Refusal> {
        let token = self.token(&context)?;
        let Some(tool) = self.definition(&params.name).await? else {
            return Err(Refusal::new(
                Code::UnknownTool,
                format!("the server offers no tool named {}", params.name),
            ));
        };
        let Some(mapped) = self.mapped(&tool) else {
            return Err(Refusal::new(
                Code::ToolUnmapped,
                format!(
                    "tool {} is not in the gateway's map: unmapped tools are denied",
                    params.name
                ),
            ));
        };
        match self.pin(&tool) {
            PinCheck::Pinned | PinCheck::Recorded => {}
            PinCheck::Changed { pinned, seen } => {
                return Err(Refusal::new(
                    Code::ToolChanged,
                    format!(
                        "the definition of {} changed: now {seen}, pinned {pinned}; an operator accepts it by setting digest = \"{seen}\" on this tool in the gateway's configuration",
                        params.name
                    ),
                ))
            }
            PinCheck::Unavailable(why) => {
                return Err(Refusal::new(
                    Code::PinUnavailable,
                    format!(
                        "tool {} is seen for the first time and its pin could not be recorded ({why})",
                        params.name
                    ),
                ))
            }
        }
        let arguments = Value::Object(params.arguments.clone().unwrap_or_default());
        let resource = mapped
            .template
            .render(&arguments)
            .map_err(|e| Refusal::new(Code::ArgumentRejected, e.to_string()))?;
        let mut canonical = String::new();
        write_canonical(&arguments, &mut canonical);
        if Self::carries_token(&token, canonical.as_bytes()) {
            return Err(Refusal::new(
                Code::TokenMisplaced,
                "the arguments carry the Capgate token; it never leaves the gateway",
            ));
        }
        let request = GuardRequest {
            resource,
            verb: mapped.verb,
            environment: self.gateway.config.environment.clone(),
            attributes: vec![
                ("server".into(), self.upstream.name().to_owned()),
                ("mcp_method".into(), "tools/call".into()),
                ("tool".into(), params.name.to_string()),
                (
                    "arguments_sha256".into(),
                    hex::encode(Sha256::digest(canonical.as_bytes())),
                ),
            ],
        };
        let authorized = self.decide(&token, &request, params).await?;
        let decision_id = authorized.decision_id().to_owned();
        let params = authorized.into_inner();
        let peer = self.peer().await?;
        self.relay(&context, peer.call_tool_once(params))
            .await?
            .map_err(|e| {
                tracing::error!(error = %e, decision_id, "upstream tools/call failed");
                Refusal::new(
                    Code::UpstreamUnavailable,
                    "the upstream server failed the call",
                )
            })
    }

    /// Tools this token could call: mapped, pinned, and reachable by one of its rights.
    async fn listing(&self, context: RequestContext<RoleServer>) -> Result<Vec<Tool>, Refusal> {
        let rights = self.rights(&context)?;
        let tools = self.upstream.tools().await.map_err(|e| {
            tracing::error!(error = %e, "upstream tools/list failed");
            Refusal::new(
                Code::UpstreamUnavailable,
                "the upstream server did not answer",
            )
        })?;
        let mapped: Vec<(&Tool, Mapped)> = tools
            .iter()
            .filter_map(|tool| Some((tool, self.mapped(tool)?)))
            .collect();
        // Every first sight of one listing recorded with one write of the pin file.
        let digests: Vec<(String, String)> = mapped
            .iter()
            .map(|(tool, _)| (tool.name.to_string(), tool_digest(tool)))
            .collect();
        let pairs: Vec<(&str, &str)> = digests
            .iter()
            .map(|(name, digest)| (name.as_str(), digest.as_str()))
            .collect();
        let pins = self.gateway.pins.check_all(self.upstream.name(), &pairs);
        Ok(mapped
            .into_iter()
            .zip(pins)
            .filter(|((_, mapped), pin)| {
                matches!(pin, PinCheck::Pinned | PinCheck::Recorded)
                    && rights.could_reach(&mapped.template, mapped.verb)
            })
            .map(|((tool, _), _)| tool.clone())
            .collect())
    }

    fn url_elicitation(context: &RequestContext<RoleServer>) -> bool {
        context
            .peer
            .peer_info()
            .and_then(|info| info.capabilities.elicitation.clone())
            .is_some_and(|e| e.url.is_some())
    }
}

impl ServerHandler for SessionHandler {
    fn get_info(&self) -> ServerConfig {
        let mut capabilities = ServerCapabilities::builder().enable_tools().build();
        // Offered only where something is mapped: everything else would be refused anyway.
        let maps = self.maps();
        if !maps.resources.is_empty() {
            capabilities.resources = Some(Default::default());
        }
        if !maps.prompts.is_empty() {
            capabilities.prompts = Some(Default::default());
        }
        let mut info = ServerConfig::new(capabilities);
        info.server_info = Implementation::new("capgate-mcp-gateway", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(format!(
            "Capgate gateway in front of {}: every call is decided by your Capgate token.",
            self.upstream.name()
        ));
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let tools = self
            .listing(context)
            .await
            .map_err(|r| r.protocol_error())?;
        // The list depends on the token: no client or intermediary may serve it to another.
        Ok(ListToolsResult::with_all_items(tools).with_cache_scope(CacheScope::Private))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let url_elicitation = Self::url_elicitation(&context);
        match self.call(request, context).await {
            Ok(response) => Ok(response),
            Err(refusal) => match refusal.url_elicitation().filter(|_| url_elicitation) {
                Some(error) => Err(error),
                None => Ok(refusal.tool_result().into()),
            },
        }
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let resources = self
            .readable_resources(context)
            .await
            .map_err(|r| r.protocol_error())?;
        Ok(ListResourcesResult::with_all_items(resources).with_cache_scope(CacheScope::Private))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        let templates = self
            .readable_templates(context)
            .await
            .map_err(|r| r.protocol_error())?;
        Ok(ListResourceTemplatesResult::with_all_items(templates)
            .with_cache_scope(CacheScope::Private))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let url_elicitation = Self::url_elicitation(&context);
        self.read(request, context)
            .await
            .map_err(|f| f.into_error(url_elicitation))
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        let prompts = self
            .usable_prompts(context)
            .await
            .map_err(|r| r.protocol_error())?;
        Ok(ListPromptsResult::with_all_items(prompts).with_cache_scope(CacheScope::Private))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        let url_elicitation = Self::url_elicitation(&context);
        self.prompt(request, context)
            .await
            .map_err(|f| f.into_error(url_elicitation))
    }
}

/// The guard's answer for one operation, in the gateway's mode. Kept in one place so the
/// gateway can move to batch authorisation without touching the mediation.
pub(super) async fn authorize_operation<T>(
    gateway: &Gateway,
    token: &str,
    request: &GuardRequest,
    payload: T,
) -> Result<Authorized<T>, Box<Decision>> {
    let ledger = Some(gateway.ledger.as_ref());
    crate::authorize(
        &gateway.guard,
        gateway.config.mode,
        ledger,
        token,
        std::slice::from_ref(request),
        payload,
    )
    .await
}
