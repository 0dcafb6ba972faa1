//! The audit event for a decision: request facts, outcome, and of the token only what
//! `containment::token_record` keeps (digest, blocks, revocation ids), never the token.

use super::{Decision, Request};
use crate::containment::audit::{AuditEvent, AuditKind};
use crate::containment::token_record::{blocks_of, token_digest};
use crate::scope::Verb;
use crate::token::{AuditMemo, VerifiedToken};

/// `verified` is the token as the guard verified it; a token that never verified (malformed,
/// forged, expired) is recorded by its digest alone.
pub fn decision_event(
    adapter: &str,
    request: &Request,
    decision: &Decision,
    token: &str,
    verified: Option<&VerifiedToken>,
) -> AuditEvent {
    let memo = verified.map(|verified| {
        verified.audit_memo.get_or_init(|| AuditMemo {
            token_sha256: token_digest(token),
            blocks: blocks_of(&verified.biscuit).map(|blocks| serde_json::json!(blocks)),
        })
    });
    let mut detail = serde_json::json!({
        "decision_id": decision.id,
        "adapter": adapter,
        "outcome": decision.outcome,
        "session": decision.session,
        "resource": request.resource,
        "verb": request.verb,
        "environment": request.environment,
        "attributes": request.attributes,
        "token_sha256": match memo {
            Some(memo) => memo.token_sha256.clone(),
            None => token_digest(token),
        },
    });
    if let (Some(verified), Some(memo), Some(object)) = (verified, memo, detail.as_object_mut()) {
        if let Some(blocks) = &memo.blocks {
            object.insert("blocks".into(), blocks.clone());
        }
        object.insert(
            "revocation_ids".into(),
            serde_json::json!(verified.revocation_ids),
        );
    }
    AuditEvent {
        kind: AuditKind::Decision,
        actor: decision.agent.clone(),
        detail,
    }
}

/// The verb a decision event records, for a ledger that treats verbs differently (the
/// PostgreSQL session holds the records of writes until their transaction commits). `None`
/// for any other event.
pub fn decision_verb(event: &AuditEvent) -> Option<Verb> {
    if event.kind != AuditKind::Decision {
        return None;
    }
    event.detail.get("verb")?.as_str()?.parse().ok()
}
