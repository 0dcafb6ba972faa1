//! Policy replay: re-evaluates recorded decisions against a candidate adapter policy, at the
//! time they were made, and lists every decision whose policy verdict would change. Token-level
//! denials (malformed, expired, revoked, stale feed) never reached the policy and are skipped.

use std::collections::HashMap;

use biscuit_auth::builder::{date, fact, string};
use biscuit_auth::Biscuit;
use serde::Serialize;
use serde_json::Value;

use super::audit::{AuditKind, AuditRecord};
use crate::config::RunLimits;
use crate::policy::PolicySet;
use crate::token::{decode_token_bytes, from_unix_seconds, KeySetDocument};

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
const PRE_POLICY_CODES: [&str; 8] = [
    "token_too_large",
    "token_malformed",
    "token_unknown_key",
    "token_key_retired",
    "token_bad_signature",
    "token_expired",
    "token_revoked",
    "revocation_feed_stale",
];

pub fn replay(
    records: &[AuditRecord],
    keys: &KeySetDocument,
    policy: &PolicySet,
    limits: &RunLimits,
) -> ReplayReport {
    // Replays judge old decisions: every key the ring ever published counts, retired or not.
    let public: HashMap<u32, biscuit_auth::PublicKey> = keys
        .keys
        .iter()
        .filter_map(|k| k.public_key.parse().ok().map(|p| (k.key_id, p)))
        .collect();
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
        let Some(replayed_allowed) = evaluate(detail, record.at, &public, policy, limits) else {
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
    report
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
    keys: &HashMap<u32, biscuit_auth::PublicKey>,
    policy: &PolicySet,
    limits: &RunLimits,
) -> Option<bool> {
    let bytes = decode_token_bytes(detail["token"].as_str()?).ok()?;
    let biscuit = Biscuit::from(&bytes, |id: Option<u32>| {
        id.and_then(|id| keys.get(&id).copied())
            .ok_or(biscuit_auth::error::Format::UnknownPublicKey)
    })
    .ok()?;
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
