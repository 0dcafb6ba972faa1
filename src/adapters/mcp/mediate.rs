//! Per-message mediation: the gateway's MCP server side. Each `tools/call` becomes one guard
//! operation (resource from the call's arguments, verb from the map, raised by annotations),
//! decided before anything reaches the upstream; `tools/list` answers only tools this
//! token could call and whose definitions still match their pins. Refusals reach the agent
//! as tool results with `isError` (the model reads them) carrying the deny code and reason.

use std::sync::Arc;

use biscuit_auth::builder::AuthorizerBuilder;
use rmcp::model::{
    CacheScope, CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorCode,
    Implementation, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
    Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::approvals::Collected;
use super::mapping::{raised_by_annotations, ResourceTemplate};
use super::pin::{tool_digest, write_canonical, PinCheck};
use super::upstream::Upstream;
use super::Gateway;
use crate::adapters::screen::TokenSpellings;
use crate::adapters::{extract_token, Mode, TokenHeader};
use crate::guard::containment::operation;
use crate::guard::{Authorized, Decision, Outcome, Request as GuardRequest};
use crate::scope::{ResourcePattern, Verb};
use crate::token::VerifiedToken;

/// JSON-RPC code of the spec's `URLElicitationRequiredError` (2025-11-25 and later).
pub const URL_ELICITATION_REQUIRED: i32 = -32042;

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
    gateway: Arc<Gateway>,
    upstream: Arc<Upstream>,
    token: TokenSource,
}

/// A mapped tool, ready to decide on.
struct Mapped {
    template: ResourceTemplate,
    verb: Verb,
}

impl SessionHandler {
    pub fn new(gateway: Arc<Gateway>, upstream: Arc<Upstream>, token: TokenSource) -> Self {
        SessionHandler {
            gateway,
            upstream,
            token,
        }
    }

    fn token(&self, context: &RequestContext<RoleServer>) -> Result<String, Refusal> {
        match &self.token {
            TokenSource::Fixed(token) => Ok(token.to_string()),
            TokenSource::Headers => {
                let parts = context
                    .extensions
                    .get::<http::request::Parts>()
                    .ok_or_else(|| {
                        Refusal::new("token_missing", "no HTTP request to read the token from")
                    })?;
                match extract_token(&parts.headers) {
                    TokenHeader::Present(token) => Ok(token),
                    TokenHeader::Missing => Err(Refusal::new(
                        "token_missing",
                        "send your Capgate token as Authorization: Bearer",
                    )),
                    TokenHeader::Conflicting => Err(Refusal::new(
                        "token_conflict",
                        "two different tokens were presented",
                    )),
                }
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
            Refusal::new("upstream_unavailable", "the upstream server did not answer")
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
                "unknown_tool",
                format!("the server offers no tool named {}", params.name),
            ));
        };
        let Some(mapped) = self.mapped(&tool) else {
            return Err(Refusal::new(
                "tool_unmapped",
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
                    "tool_changed",
                    format!(
                        "the definition of {} changed: now {seen}, pinned {pinned}; an operator accepts it by setting digest = \"{seen}\" on this tool in the gateway's configuration",
                        params.name
                    ),
                ))
            }
            PinCheck::Unavailable(why) => {
                return Err(Refusal::new(
                    "pin_unavailable",
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
            .map_err(|e| Refusal::new("argument_rejected", e.to_string()))?;
        let mut canonical = String::new();
        write_canonical(&arguments, &mut canonical);
        // The token never travels upstream, in arguments either.
        if TokenSpellings::new(&token).is_some_and(|t| t.found_in(canonical.as_bytes())) {
            return Err(Refusal::new(
                "token_misplaced",
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
        // A retry of a call that asked for approval: collect the operator's grant and decide
        // with it (its approval block names this exact operation's digest).
        let digest = operation(&self.gateway.config.name, &request).digest();
        let approvals = &self.gateway.approvals;
        let mut deciding = token.clone();
        if let Some(id) = approvals.pending(&token, &digest) {
            match approvals.collect(&token, &digest, &id).await {
                Collected::Granted(granted) => deciding = granted,
                Collected::Waiting => {
                    let mut refusal = Refusal::new(
                        "approval_pending",
                        format!("approval request {id} is still waiting for an operator"),
                    );
                    refusal.approval_id = Some(id.clone());
                    refusal.approval_url = Some(approvals.url(&id));
                    return Err(refusal);
                }
                Collected::Gone => {}
            }
        }
        let authorized = match self.gateway.authorize(&deciding, &request, params).await {
            Ok(authorized) => authorized,
            Err(decision) => {
                let mut refusal = Refusal::from_decision(&decision);
                if let Outcome::ApprovalRequired {
                    approval_id: Some(id),
                    ..
                } = &decision.outcome
                {
                    approvals.remember(&token, &digest, id);
                    refusal.approval_url = Some(approvals.url(id));
                }
                return Err(refusal);
            }
        };
        let decision_id = authorized.decision_id().to_owned();
        let params = authorized.into_inner();
        let peer = self.upstream.peer().await.map_err(|e| {
            tracing::error!(error = %e, decision_id, "upstream connect failed");
            Refusal::new("upstream_unavailable", "the upstream server did not answer")
        })?;
        // Dropping the upstream call (the agent went away) sends it a cancellation.
        tokio::select! {
            result = peer.call_tool_once(params) => result.map_err(|e| {
                tracing::error!(error = %e, decision_id, "upstream tools/call failed");
                Refusal::new("upstream_unavailable", "the upstream server failed the call")
            }),
            _ = context.ct.cancelled() => Err(Refusal::new("cancelled", "the client cancelled the call")),
        }
    }

    /// Tools this token could call: mapped, pinned, and reachable by one of the rights of
    /// its authority block (attenuation can only narrow further; the guard decides each call).
    async fn listing(&self, context: RequestContext<RoleServer>) -> Result<Vec<Tool>, Refusal> {
        let token = self.token(&context)?;
        let verified = self
            .gateway
            .guard
            .verify_token(&token)
            .map_err(|(code, reason)| Refusal::new(code.as_str(), reason))?;
        let rights = authority_rights(&verified);
        let environment = &self.gateway.config.environment;
        let tools = self.upstream.tools().await.map_err(|e| {
            tracing::error!(error = %e, "upstream tools/list failed");
            Refusal::new("upstream_unavailable", "the upstream server did not answer")
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
                    && rights.iter().any(|(pattern, verb, env)| {
                        env == environment
                            && *verb == mapped.verb
                            && mapped.template.reachable_by(pattern)
                    })
            })
            .map(|((tool, _), _)| tool.clone())
            .collect())
    }
}

/// The `right(resource, verb, environment)` facts of the token's authority block.
fn authority_rights(verified: &VerifiedToken) -> Vec<(ResourcePattern, Verb, String)> {
    let Ok(mut authorizer) = AuthorizerBuilder::new().build(&verified.biscuit) else {
        return Vec::new();
    };
    let facts: Vec<(String, String, String)> = authorizer
        .query("right_of($r, $v, $e) <- right($r, $v, $e)")
        .unwrap_or_default();
    facts
        .into_iter()
        .filter_map(|(r, v, e)| {
            Some((ResourcePattern::parse(&r).ok()?, v.parse::<Verb>().ok()?, e))
        })
        .collect()
}

/// A refusal as the agent sees it: a stable code and a reason.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: String,
    pub reason: String,
    pub decision_id: Option<String>,
    pub approval_id: Option<String>,
    /// Where the operator approves (the URL-mode elicitation's target).
    pub approval_url: Option<String>,
}

impl Refusal {
    fn new(code: &str, reason: impl Into<String>) -> Self {
        Refusal {
            code: code.to_owned(),
            reason: reason.into(),
            decision_id: None,
            approval_id: None,
            approval_url: None,
        }
    }

    fn from_decision(decision: &Decision) -> Self {
        let (code, reason, approval_id) = match &decision.outcome {
            Outcome::Deny { code, reason } => (code.as_str().to_owned(), reason.clone(), None),
            Outcome::ApprovalRequired {
                approval_id,
                digest,
            } => (
                "approval_required".to_owned(),
                match approval_id {
                    Some(id) => format!("this call needs an operator's approval: request {id} (digest {digest}); retry with the token returned by POST /v1/approvals/{id}/grant once approved"),
                    None => format!("this call needs an operator's approval (digest {digest})"),
                },
                approval_id.clone(),
            ),
            Outcome::Allow => ("policy_error".to_owned(), "allow mapped to a deny".to_owned(), None),
        };
        Refusal {
            code,
            reason,
            decision_id: Some(decision.id.clone()),
            approval_id,
            approval_url: None,
        }
    }

    /// `isError` tool result: the model reads the code and reason and can act on them.
    fn tool_result(&self) -> CallToolResult {
        let text = format!("capgate denied this call ({}): {}", self.code, self.reason);
        let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
        let mut meta = rmcp::model::MetaObject::new();
        meta.0.insert(
            "io.capgate/denial".into(),
            json!({
                "code": self.code,
                "reason": self.reason,
                "decision_id": self.decision_id,
                "approval_id": self.approval_id,
                "approval_url": self.approval_url,
            }),
        );
        result.meta = Some(meta);
        result
    }

    /// For clients that declared URL-mode elicitation: the spec's "URL elicitation required"
    /// error (-32042) pointing at the operator's approval page, with the request id as the
    /// elicitation id. The client shows the URL; the retry is what counts, never its answer.
    fn url_elicitation(&self) -> Option<McpError> {
        let (id, url) = (self.approval_id.as_ref()?, self.approval_url.as_ref()?);
        let message = format!(
            "An operator must approve this call (approval request {id}); retry it once approved."
        );
        Some(McpError::new(
            ErrorCode(URL_ELICITATION_REQUIRED),
            message.clone(),
            Some(json!({
                "elicitations": [{
                    "mode": "url",
                    "elicitationId": id,
                    "url": url,
                    "message": message,
                }],
                "code": self.code,
                "reason": self.reason,
                "decision_id": self.decision_id,
            })),
        ))
    }

    fn protocol_error(&self) -> McpError {
        McpError::invalid_request(
            format!("capgate refused ({}): {}", self.code, self.reason),
            Some(
                json!({"code": self.code, "reason": self.reason, "decision_id": self.decision_id}),
            ),
        )
    }
}

impl ServerHandler for SessionHandler {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
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
        let url_elicitation = context
            .peer
            .peer_info()
            .and_then(|info| info.capabilities.elicitation.clone())
            .is_some_and(|e| e.url.is_some());
        match self.call(request, context).await {
            Ok(response) => Ok(response),
            Err(refusal) => match refusal.url_elicitation().filter(|_| url_elicitation) {
                Some(error) => Err(error),
                None => Ok(refusal.tool_result().into()),
            },
        }
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
    match gateway.config.mode {
        Mode::Enforce => {
            gateway
                .guard
                .authorize_with(token, request, payload, gateway.ledger.as_ref())
                .await
        }
        Mode::Shadow => {
            gateway
                .guard
                .authorize_shadow(token, request, payload, Some(gateway.ledger.as_ref()))
                .await
        }
    }
}
