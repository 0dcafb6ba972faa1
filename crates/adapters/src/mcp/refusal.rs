//! A refusal as the agent sees it: a stable code (the gateway's own, or the guard's deny
//! code), a reason, and where approval is involved the request id and the operator's page.
//! One place shapes it for each answer the protocol allows: an `isError` tool result the
//! model reads, the spec's URL-elicitation error, or a JSON-RPC error (reads, prompts,
//! listings).

use rmcp::model::{CallToolResult, ContentBlock, ErrorCode};
use rmcp::ErrorData as McpError;
use serde_json::json;

use capgate_core::guard::{Decision, Outcome, TokenDenial};

/// JSON-RPC code of the spec's `URLElicitationRequiredError` (2025-11-25 and later).
pub const URL_ELICITATION_REQUIRED: i32 = -32042;

/// Why the gateway itself refused, before or around the guard's decision. The strings are
/// part of the interface (agents and tests match on them): never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    TokenMissing,
    TokenConflict,
    /// The server offers no tool of that name.
    UnknownTool,
    ToolUnmapped,
    /// The definition no longer matches its pin.
    ToolChanged,
    /// First sight, but the pin could not be recorded.
    PinUnavailable,
    ResourceUnmapped,
    /// More than one resource mapping matches the URI.
    ResourceAmbiguous,
    UriRejected,
    PromptUnmapped,
    ArgumentRejected,
    TokenMisplaced,
    ApprovalPending,
    UpstreamUnavailable,
    Cancelled,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::TokenMissing => "token_missing",
            Code::TokenConflict => "token_conflict",
            Code::UnknownTool => "unknown_tool",
            Code::ToolUnmapped => "tool_unmapped",
            Code::ToolChanged => "tool_changed",
            Code::PinUnavailable => "pin_unavailable",
            Code::ResourceUnmapped => "resource_unmapped",
            Code::ResourceAmbiguous => "resource_ambiguous",
            Code::UriRejected => "uri_rejected",
            Code::PromptUnmapped => "prompt_unmapped",
            Code::ArgumentRejected => "argument_rejected",
            Code::TokenMisplaced => "token_misplaced",
            Code::ApprovalPending => "approval_pending",
            Code::UpstreamUnavailable => "upstream_unavailable",
            Code::Cancelled => "cancelled",
        }
    }
}

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
    pub fn new(code: Code, reason: impl Into<String>) -> Self {
        Self::with_code(code.as_str(), reason)
    }

    fn with_code(code: &str, reason: impl Into<String>) -> Self {
        Refusal {
            code: code.to_owned(),
            reason: reason.into(),
            decision_id: None,
            approval_id: None,
            approval_url: None,
        }
    }

    /// The guard refused the token itself.
    pub fn from_token(denial: TokenDenial) -> Self {
        Self::with_code(denial.code.as_str(), denial.reason)
    }

    pub fn from_decision(decision: &Decision) -> Self {
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
    pub fn tool_result(&self) -> CallToolResult {
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
    pub fn url_elicitation(&self) -> Option<McpError> {
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

    /// A JSON-RPC error whose `data.code` is the refusal's code: what requests without a
    /// result type for refusals (reads, prompts, listings) answer.
    pub fn protocol_error(&self) -> McpError {
        McpError::invalid_request(
            format!("capgate refused ({}): {}", self.code, self.reason),
            Some(json!({
                "code": self.code,
                "reason": self.reason,
                "decision_id": self.decision_id,
                "approval_id": self.approval_id,
                "approval_url": self.approval_url,
            })),
        )
    }

    /// The error for a read or prompt: URL elicitation where the client declared it and an
    /// approval is pending, the JSON-RPC error otherwise.
    pub fn request_error(&self, url_elicitation: bool) -> McpError {
        match self.url_elicitation().filter(|_| url_elicitation) {
            Some(error) => error,
            None => self.protocol_error(),
        }
    }
}
