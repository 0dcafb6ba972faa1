//! Policy replay: re-evaluates recorded decisions against a candidate adapter policy, at the
//! time they were made, and lists every decision whose policy verdict would change. Token-level
//! denials (malformed, expired, revoked, stale feed) never reached the policy and are skipped.
//!
//! A record holds the token's blocks, not the token (`token_record`); the replay rebuilds a
//! token from them with the same block scoping. Limit: a candidate policy that itself trusts
//! a third-party signer by key (`trusting ed25519/…`) cannot see the rebuilt blocks, which are
//! re-signed by stand-in keys, so decisions whose token has such a block are skipped, counted.
//! Trails written before records dropped the token are refused, naming the first such record.

use biscuit_auth::builder::{date, fact, string};
use serde::Serialize;
use serde_json::Value;

use super::audit::{AuditKind, AuditRecord};
use super::token_record::{external_keys, rebuild, BlockRecord};
use crate::policy::PolicySet;
use crate::settings::RunLimits;
use crate::token::from_unix_seconds;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "record {seq} holds a bearer token (written by a Capgate that kept tokens in the trail); \
         it is not replayed: export the trail, keep it as secret as the tokens, and replay \
         records written since the upgrade"
    )]
    LegacyToken { seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayChange {
    pub seq: u64,
    pub decision_id: String,
    pub agent: Option<String>,
    pub resource: String,
    pub verb: String,
    pub recorded_allowed: bool,
    pub replayed_allowed: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    pub replayed: usize,
    pub skipped: usize,
    pub changes: Vec<ReplayChange>,
}

/// Deny codes that come from the policy run itself.
const POLICY_CODES: [&str; 3] = ["policy_denied", "policy_run_limit", "policy_error"];
/// Deny codes decided before any policy ran: nothing to replay.
const PRE_POLICY_CODES: [&str; 9] = [
    "token_too_large",
    "token_malformed",
    "token_unknown_key",
    "token_key_retired",
    "token_bad_signature",
    "token_expired",
    "token_revoked",
    "revocation_feed_stale",
    "revocation_feed_reset",
];

pub fn replay(
    records: &[AuditRecord],
    policy: &PolicySet,
    limits: &RunLimits,
) -> Result<ReplayReport, ReplayError> {
    if let Some(legacy) = records
        .iter()
        .find(|r| r.event.kind == AuditKind::Decision && r.event.detail.get("token").is_some())
    {
        return Err(ReplayError::LegacyToken { seq: legacy.seq });
    }
    let policy_text = policy.builder().dump_code();
    let mut report = ReplayReport::default();
    for record in records
        .iter()
        .filter(|r| r.event.kind == AuditKind::Decision)
    {
        let detail = &record.event.detail;
        let Some(recorded_allowed) = recorded_policy_verdict(&detail["outcome"]) else {
            report.skipped += 1;
            continue;
        };
        let text = |key: &str| detail[key].as_str().unwrap_or("").to_owned();
        let Some(replayed_allowed) = evaluate(detail, record.at, policy, &policy_text, limits)
        else {
            report.skipped += 1;
            continue;
        };
        report.replayed += 1;
        if replayed_allowed != recorded_allowed {
            report.changes.push(ReplayChange {
                seq: record.seq,
                decision_id: text("decision_id"),
                agent: record.event.actor.clone(),
                resource: text("resource"),
                verb: text("verb"),
                recorded_allowed,
                replayed_allowed,
            });
        }
    }
    Ok(report)
}

/// Did the recorded decision pass the policy? `None` when no policy ran.
fn recorded_policy_verdict(outcome: &Value) -> Option<bool> {
    match outcome["decision"].as_str()? {
        "allow" | "approval_required" => Some(true),
        "deny" => {
            let code = outcome["code"].as_str()?;
            if POLICY_CODES.contains(&code) {
                Some(false)
            } else if PRE_POLICY_CODES.contains(&code) {
                None
            } else {
                Some(true) // containment denials come after the policy allowed
            }
        }
        _ => None,
    }
}

fn evaluate(
    detail: &Value,
    at: u64,
    policy: &PolicySet,
    policy_text: &str,
    limits: &RunLimits,
) -> Option<bool> {
    let blocks: Vec<BlockRecord> = serde_json::from_value(detail.get("blocks")?.clone()).ok()?;
    if external_keys(&blocks)
        .iter()
        .any(|key| policy_text.contains(key.as_str()))
    {
        return None;
    }
    let biscuit = rebuild(&blocks).ok()?;
    let str_fact =
        |name: &str, key: &str| fact(name, &[string(detail[key].as_str().unwrap_or(""))]);
    let mut builder = policy
        .builder()
        .set_limits(limits.to_biscuit())
        .fact(fact("time", &[date(&from_unix_seconds(at))]))
        .and_then(|b| b.fact(str_fact("resource", "resource")))
        .and_then(|b| b.fact(str_fact("verb", "verb")))
        .and_then(|b| b.fact(str_fact("environment", "environment")))
        .and_then(|b| b.fact(str_fact("adapter", "adapter")))
        .ok()?;
    for pair in detail["attributes"].as_array().into_iter().flatten() {
        let (Some(k), Some(v)) = (pair[0].as_str(), pair[1].as_str()) else {
            continue;
        };
        builder = builder
            .fact(fact("attribute", &[string(k), string(v)]))
            .ok()?;
    }
    let mut authorizer = builder.build(&biscuit).ok()?;
    Some(authorizer.authorize().is_ok())
}
