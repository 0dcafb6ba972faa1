//! The guard's containment step, after the policy allowed: freeze, recovery points, approval
//! blocks, and the obligations an adapter must fulfil (through its [`Ledger`]) before the
//! operation may go through: consume the approval once, count against velocity limits, and
//! record the decision in the audit trail.

use std::sync::RwLock;

use async_trait::async_trait;
use biscuit_auth::builder::Rule;
use biscuit_auth::{Authorizer, PublicKey};
use serde::Serialize;

use super::{DenyCode, Outcome, Request};
use crate::containment::audit::AuditEvent;
use crate::containment::{destroys_recovery_point, ContainmentDocument, Operation};
use crate::scope::Verb;
use crate::token::VerifiedToken;

/// What an allow still requires before the adapter may forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "obligation", rename_all = "snake_case")]
pub enum Obligation {
    /// Mark the approval used (single use, checked and recorded in the store).
    ConsumeApproval { approval_id: String, digest: String },
    /// Count against the agent's velocity limit for this verb.
    Count { verb: Verb },
    /// Record the decision in the audit trail before forwarding; if it cannot be stored, deny.
    Audit,
    /// Count one use against the token's own use budget (one-shot, N calls).
    Use,
}

/// Why a ledger could not do what the guard asked of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct LedgerDenial {
    pub code: LedgerCode,
    pub reason: String,
}

/// A ledger's refusals by stable code: the broker's, which it sends by these names, and the
/// adapter's own when the broker cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerCode {
    UseBudgetExhausted,
    RateLimited,
    ApprovalUsed,
    ApprovalExpired,
    ApprovalCancelled,
    ApprovalDelayed,
    ApprovalDigestMismatch,
    ApprovalNotApproved,
    ApprovalNotFound,
    ApprovalOtherSession,
    ApprovalUnbound,
    RecoveryPoint,
    AuditUnavailable,
    /// The broker refused with a code this adapter does not know.
    BrokerRefused,
    BrokerUnreachable,
    /// The adapter cannot count a token's uses (no broker behind it).
    UseBudgetUnavailable,
    /// The adapter cannot attach a preview to an approval.
    PreviewUnavailable,
}

impl LedgerCode {
    /// The codes a broker's refusal may carry.
    const FROM_BROKER: [LedgerCode; 13] = [
        LedgerCode::UseBudgetExhausted,
        LedgerCode::RateLimited,
        LedgerCode::ApprovalUsed,
        LedgerCode::ApprovalExpired,
        LedgerCode::ApprovalCancelled,
        LedgerCode::ApprovalDelayed,
        LedgerCode::ApprovalDigestMismatch,
        LedgerCode::ApprovalNotApproved,
        LedgerCode::ApprovalNotFound,
        LedgerCode::ApprovalOtherSession,
        LedgerCode::ApprovalUnbound,
        LedgerCode::RecoveryPoint,
        LedgerCode::AuditUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LedgerCode::UseBudgetExhausted => "use_budget_exhausted",
            LedgerCode::RateLimited => "rate_limited",
            LedgerCode::ApprovalUsed => "approval_used",
            LedgerCode::ApprovalExpired => "approval_expired",
            LedgerCode::ApprovalCancelled => "approval_cancelled",
            LedgerCode::ApprovalDelayed => "approval_delayed",
            LedgerCode::ApprovalDigestMismatch => "approval_digest_mismatch",
            LedgerCode::ApprovalNotApproved => "approval_not_approved",
            LedgerCode::ApprovalNotFound => "approval_not_found",
            LedgerCode::ApprovalOtherSession => "approval_other_session",
            LedgerCode::ApprovalUnbound => "approval_unbound",
            LedgerCode::RecoveryPoint => "recovery_point",
            LedgerCode::AuditUnavailable => "audit_unavailable",
            LedgerCode::BrokerRefused => "broker_refused",
            LedgerCode::BrokerUnreachable => "broker_unreachable",
            LedgerCode::UseBudgetUnavailable => "use_budget_unavailable",
            LedgerCode::PreviewUnavailable => "preview_unavailable",
        }
    }

    /// The code of a broker's refusal, read from its problem body; one this adapter does not
    /// know is [`LedgerCode::BrokerRefused`] (the broker's own text still says why).
    pub fn of_broker(code: &str) -> LedgerCode {
        Self::FROM_BROKER
            .into_iter()
            .find(|known| known.as_str() == code)
            .unwrap_or(LedgerCode::BrokerRefused)
    }
}

impl std::fmt::Display for LedgerCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The adapter's connection to shared containment state (the broker, in practice).
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Creates an approval request for `operation`; returns its id.
    async fn request_approval(
        &self,
        token: &str,
        operation: &Operation,
    ) -> Result<String, LedgerDenial>;
    async fn consume_approval(
        &self,
        token: &str,
        approval_id: &str,
        digest: &str,
    ) -> Result<(), LedgerDenial>;
    async fn count(&self, token: &str, verb: Verb) -> Result<(), LedgerDenial>;
    async fn audit(&self, event: AuditEvent) -> Result<(), LedgerDenial>;
    /// Stores several records at once, all or nothing as far as the caller knows: an error
    /// means none may be assumed stored.
    async fn audit_batch(&self, events: &[AuditEvent]) -> Result<(), LedgerDenial> {
        for event in events {
            self.audit(event.clone()).await?;
        }
        Ok(())
    }
    /// Counts one call against the token's use budget; refuses once it is spent.
    async fn count_use(&self, _token: &str) -> Result<(), LedgerDenial> {
        Err(LedgerDenial {
            code: LedgerCode::UseBudgetUnavailable,
            reason: "this adapter cannot count token uses".into(),
        })
    }
    /// Records a decision off the request path (reads, denials); best effort, spooled.
    fn record_later(&self, _event: AuditEvent) {}
    /// Attaches what a pending approval's operation would touch (a measured preview).
    async fn attach_preview(&self, _approval_id: &str, _preview: &str) -> Result<(), LedgerDenial> {
        Err(LedgerDenial {
            code: LedgerCode::PreviewUnavailable,
            reason: "this adapter cannot attach previews".into(),
        })
    }
}

/// The containment settings an adapter got from the broker, and the freeze flag from the feed.
#[derive(Default)]
pub struct ContainmentView {
    document: RwLock<Option<(ContainmentDocument, PublicKey)>>,
    frozen: RwLock<bool>,
}

impl ContainmentView {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_document(&self, document: ContainmentDocument) -> Result<(), String> {
        let key: PublicKey = document
            .approval_public_key
            .parse()
            .map_err(|e| format!("approval key: {e}"))?;
        if let Ok(mut slot) = self.document.write() {
            *slot = Some((document, key));
        }
        Ok(())
    }

    pub fn set_frozen(&self, frozen: bool) {
        if let Ok(mut slot) = self.frozen.write() {
            *slot = frozen;
        }
    }

    /// The freeze flag as last seen (a poisoned flag reads as frozen).
    pub fn frozen(&self) -> bool {
        self.frozen.read().map(|f| *f).unwrap_or(true)
    }

    /// Whether `verb` needs approval; unknown settings count as yes (fail closed).
    pub fn needs_approval(&self, verb: Verb) -> bool {
        match self.document.read() {
            Ok(document) => document
                .as_ref()
                .is_none_or(|(d, _)| d.approval_verbs.contains(&verb)),
            Err(_) => true,
        }
    }

    fn snapshot(&self) -> Option<(ContainmentDocument, PublicKey, bool)> {
        let document = self.document.read().ok()?.clone()?;
        // A poisoned flag reads as frozen: fail closed.
        let frozen = self.frozen.read().map(|f| *f).unwrap_or(true);
        Some((document.0, document.1, frozen))
    }
}

/// Runs after the policy allowed. `Ok` carries the obligations; `Err` the outcome instead.
pub(super) fn check(
    view: &ContainmentView,
    adapter: &str,
    verified: &VerifiedToken,
    request: &Request,
    authorizer: Option<&mut Authorizer>,
) -> Result<Vec<Obligation>, Outcome> {
    if request.verb == Verb::Read {
        return Ok(Vec::new());
    }
    let deny = |code, reason: String| Outcome::Deny { code, reason };
    let Some((document, approval_key, frozen)) = view.snapshot() else {
        return Err(deny(
            DenyCode::ContainmentUnavailable,
            "containment settings not yet received from the broker".into(),
        ));
    };
    if frozen {
        return Err(deny(
            DenyCode::Frozen,
            "an operator froze all writes".into(),
        ));
    }
    if request.verb == Verb::Delete {
        if let Some(point) = destroys_recovery_point(&document.recovery_points, &request.resource) {
            return Err(deny(
                DenyCode::RecoveryPoint,
                format!(
                    "deleting {} would destroy recovery point {point}; no approval can allow it",
                    request.resource
                ),
            ));
        }
    }
    let mut obligations = Vec::new();
    if document
        .velocity
        .iter()
        .any(|l| l.verb == request.verb && (l.agent == verified.agent || l.agent == "*"))
    {
        obligations.push(Obligation::Count { verb: request.verb });
    }
    if document.approval_verbs.contains(&request.verb) {
        let operation = operation(adapter, request);
        let digest = operation.digest();
        // Only a cached verdict comes without an authorizer, and the guard uses one only for
        // verbs that need no approval: the settings changed in between.
        let Some(authorizer) = authorizer else {
            return Err(deny(
                DenyCode::ContainmentUnavailable,
                "approval settings changed while deciding; ask again".into(),
            ));
        };
        let presented =
            approvals(authorizer, approval_key).map_err(|e| deny(DenyCode::PolicyError, e))?;
        match presented.into_iter().find(|(d, _)| *d == digest) {
            Some((digest, approval_id)) => obligations.push(Obligation::ConsumeApproval {
                approval_id,
                digest,
            }),
            None => {
                return Err(Outcome::ApprovalRequired {
                    approval_id: None,
                    digest,
                })
            }
        }
    }
    obligations.push(Obligation::Audit);
    Ok(obligations)
}

/// The operation an approval must name: this adapter, resource, verb and protocol detail.
pub fn operation(adapter: &str, request: &Request) -> Operation {
    Operation {
        adapter: adapter.to_owned(),
        resource: request.resource.clone(),
        verb: request.verb,
        detail: request.attributes.iter().cloned().collect(),
    }
}

/// `approved(digest, id)` facts from blocks signed by the broker's approval key only.
fn approvals(
    authorizer: &mut Authorizer,
    approval_key: PublicKey,
) -> Result<Vec<(String, String)>, String> {
    let mut rule: Rule = "data($digest, $id) <- approved($digest, $id) trusting {approval_key}"
        .try_into()
        .map_err(|e: biscuit_auth::error::Token| e.to_string())?;
    rule.set_scope("approval_key", approval_key)
        .map_err(|e| e.to_string())?;
    authorizer.query(rule).map_err(|e| e.to_string())
}
