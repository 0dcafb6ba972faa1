//! Containment: what a token alone can never do. Destructive verbs need an operator's
//! approval bound to the exact operation; recovery points can never be deleted; velocity
//! limits stop a runaway cascade; a freeze stops every write at once.
//!
//! This module holds the configuration, the operation digest and the pure rules; the guard
//! applies them, the stores keep their state, the broker serves them.

pub mod approval;
pub mod audit;
pub mod checkpoint;
pub mod replay;
pub mod token_record;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::scope::{ResourcePattern, Verb};
use crate::settings::duration;

/// A per-agent (or `*`) budget of one verb in a fixed window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VelocityLimit {
    /// Agent name, or `*` for every agent without a limit of its own.
    pub agent: String,
    pub verb: Verb,
    pub limit: u64,
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub per: Duration,
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainmentConfig {
    /// Verbs that are never allowed by a token alone.
    #[serde(default = "ContainmentConfig::default_approval_verbs")]
    pub approval_verbs: Vec<Verb>,
    /// Distinct operators that must approve (1 or 2).
    #[serde(default = "ContainmentConfig::default_approvers")]
    pub approvers_required: u32,
    /// How long an approved operation may be carried out.
    #[serde(
        default = "ContainmentConfig::default_approval_ttl",
        deserialize_with = "duration"
    )]
    pub approval_ttl: Duration,
    /// Staged execution: the approved operation waits this long, cancellable by any operator.
    #[serde(default, deserialize_with = "duration")]
    pub approval_delay: Duration,
    /// Backups and snapshots: never deletable, and nothing that contains one is either.
    #[serde(default)]
    pub recovery_points: Vec<ResourcePattern>,
    #[serde(default)]
    pub velocity: Vec<VelocityLimit>,
}

impl ContainmentConfig {
    fn default_approval_verbs() -> Vec<Verb> {
        vec![Verb::Delete]
    }
    fn default_approvers() -> u32 {
        1
    }
    fn default_approval_ttl() -> Duration {
        Duration::from_secs(600)
    }

    pub fn needs_approval(&self, verb: Verb) -> bool {
        self.approval_verbs.contains(&verb)
    }

    /// The limit that applies to `agent` for `verb`: its own, else the `*` one.
    pub fn velocity_for(&self, agent: &str, verb: Verb) -> Option<&VelocityLimit> {
        let matching = |name: &str| {
            self.velocity
                .iter()
                .find(|l| l.verb == verb && l.agent == name)
        };
        matching(agent).or_else(|| matching("*"))
    }
}

impl Default for ContainmentConfig {
    fn default() -> Self {
        ContainmentConfig {
            approval_verbs: Self::default_approval_verbs(),
            approvers_required: Self::default_approvers(),
            approval_ttl: Self::default_approval_ttl(),
            approval_delay: Duration::ZERO,
            recovery_points: Vec::new(),
            velocity: Vec::new(),
        }
    }
}

/// What adapters need from the broker to apply containment (served at `/v1/containment`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainmentDocument {
    /// Public key of the broker's approval signer (biscuit textual form).
    pub approval_public_key: String,
    pub approval_verbs: Vec<Verb>,
    pub recovery_points: Vec<ResourcePattern>,
    /// Which (agent, verb) pairs are limited; the broker holds the counts.
    pub velocity: Vec<VelocityLimit>,
}

impl ContainmentDocument {
    pub fn new(config: &ContainmentConfig, approval_key: &biscuit_auth::PublicKey) -> Self {
        ContainmentDocument {
            approval_public_key: approval_key.to_string(),
            approval_verbs: config.approval_verbs.clone(),
            recovery_points: config.recovery_points.clone(),
            velocity: config.velocity.clone(),
        }
    }
}

/// Would deleting `resource` destroy a recovery point? True when the resource is one, or when
/// a recovery point lives under it (deleting a volume deletes the backups stored on it).
pub fn destroys_recovery_point(
    recovery_points: &[ResourcePattern],
    resource: &str,
) -> Option<ResourcePattern> {
    let as_prefix = format!("{}/", resource.trim_end_matches('/'));
    recovery_points
        .iter()
        .find(|point| {
            point.covers(resource)
                || point.as_str().starts_with(&as_prefix)
                || point.as_str() == resource
        })
        .cloned()
}

/// Does a granted pattern reach a recovery point with a destructive verb?
pub fn grant_reaches_recovery_point(
    recovery_points: &[ResourcePattern],
    pattern: &ResourcePattern,
) -> Option<ResourcePattern> {
    recovery_points
        .iter()
        .find(|point| {
            point.overlaps(pattern)
                || destroys_recovery_point(std::slice::from_ref(point), pattern.as_str()).is_some()
        })
        .cloned()
}

/// The exact operation an approval is bound to: adapter, resource, verb and protocol detail
/// (HTTP method, canonical path, query, body digest; or SQL text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    pub adapter: String,
    pub resource: String,
    pub verb: Verb,
    pub detail: BTreeMap<String, String>,
}

impl Operation {
    /// SHA-256 over the canonical JSON (sorted keys) of the operation, hex.
    pub fn digest(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&canonical))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points() -> Vec<ResourcePattern> {
        vec![
            "http://railway/backups/".parse().expect("p"),
            "http://railway/volumes/vol_prod/backups/"
                .parse()
                .expect("p"),
        ]
    }

    #[test]
    fn deleting_a_recovery_point_or_its_container_is_recognised() {
        let p = points();
        assert!(destroys_recovery_point(&p, "http://railway/backups/bk_1").is_some());
        assert!(
            destroys_recovery_point(&p, "http://railway/volumes/vol_prod").is_some(),
            "its backups live on it"
        );
        assert!(
            destroys_recovery_point(&p, "http://railway/volumes/vol_prod/backups/bk_2").is_some()
        );
        assert!(destroys_recovery_point(&p, "http://railway/volumes/vol_dev").is_none());
        assert!(destroys_recovery_point(&p, "http://railway/backupsx").is_none());
    }

    #[test]
    fn grants_that_reach_recovery_points_are_recognised() {
        let p = points();
        let pattern = |s: &str| s.parse::<ResourcePattern>().expect("p");
        assert!(grant_reaches_recovery_point(&p, &pattern("http://railway/")).is_some());
        assert!(
            grant_reaches_recovery_point(&p, &pattern("http://railway/volumes/vol_prod")).is_some()
        );
        assert!(
            grant_reaches_recovery_point(&p, &pattern("http://railway/volumes/vol_dev")).is_none()
        );
    }

    #[test]
    fn the_digest_binds_every_field() {
        let op = Operation {
            adapter: "railway".into(),
            resource: "http://railway/volumes/vol_1".into(),
            verb: Verb::Delete,
            detail: BTreeMap::from([
                ("method".into(), "DELETE".into()),
                ("path".into(), "/v2/volumes/vol_1".into()),
            ]),
        };
        let mut other = op.clone();
        other
            .detail
            .insert("path".into(), "/v2/volumes/vol_2".into());
        assert_ne!(op.digest(), other.digest());
        assert_eq!(op.digest(), op.clone().digest());
        assert_eq!(op.digest().len(), 64);
    }
}
