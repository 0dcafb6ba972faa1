//! Decision cache: an agent's calls repeat a handful of operations, and running Datalog
//! (building biscuit's authorizer from the token, then running it) is most of a decision's
//! cost. That run's verdict is a pure function of the token, the operation, the adapter's
//! policy and the time, so an allow is kept for as long as the time cannot change it
//! ([`DatalogProfile::stable_until`]): an attenuated expiry, a not-before or any other date in
//! the token or the policy ends the entry exactly when it could change the verdict.
//!
//! Only the Datalog verdict is cached. Key validity, expiry and revocation run before it and
//! containment (freeze, recovery points, approvals, velocity, audit) after it on every call,
//! so none of their changes waits for an entry to go.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::operation::Operation;
use crate::scope::Verb;
use crate::token::{DatalogProfile, VerifiedToken};

pub struct DecisionCache {
    entries: RwLock<HashMap<DecisionKey, CachedAllow>>,
    capacity: usize,
    /// The adapter policy's half of every profile.
    policy: DatalogProfile,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct DecisionKey {
    /// The signature of the token's last block: one per token chain.
    token: Box<str>,
    resource: Box<str>,
    verb: Verb,
    environment: Box<str>,
    /// Empty unless the token or the policy can read `attribute` facts.
    attributes: Vec<(String, String)>,
}

struct CachedAllow {
    explanation: Vec<String>,
    /// Seconds since the epoch: the verdict holds from the first to before the second.
    from: u64,
    until: u64,
}

impl DecisionCache {
    pub fn new(capacity: usize, policy: DatalogProfile) -> Self {
        DecisionCache {
            entries: RwLock::new(HashMap::new()),
            capacity,
            policy,
        }
    }

    /// The key this token and operation are cached under; `None` when the cache is off.
    pub(super) fn key(
        &self,
        verified: &VerifiedToken,
        operation: &Operation,
    ) -> Option<DecisionKey> {
        if self.capacity == 0 {
            return None;
        }
        let sees_attributes = verified.profile.sees_attributes() || self.policy.sees_attributes();
        Some(DecisionKey {
            token: verified.revocation_ids.last()?.as_str().into(),
            resource: operation.resource.as_str().into(),
            verb: operation.verb,
            environment: operation.environment.as_str().into(),
            attributes: if sees_attributes {
                operation.attributes.clone()
            } else {
                Vec::new()
            },
        })
    }

    /// The explanation of a cached allow that still holds at `now`.
    pub(super) fn get(&self, key: &DecisionKey, now: SystemTime) -> Option<Vec<String>> {
        let second = seconds(now)?;
        let entries = self.entries.read().ok()?;
        let entry = entries.get(key)?;
        (entry.from <= second && second < entry.until).then(|| entry.explanation.clone())
    }

    /// Keeps an allow reached at `now` for as long as neither program's dates can change it.
    pub(super) fn insert(
        &self,
        key: DecisionKey,
        verified: &VerifiedToken,
        explanation: &[String],
        now: SystemTime,
    ) {
        let Some(from) = seconds(now) else { return };
        let (Some(token_until), Some(policy_until)) = (
            verified.profile.stable_until(from),
            self.policy.stable_until(from),
        ) else {
            return;
        };
        let until = token_until.min(policy_until);
        let Ok(mut entries) = self.entries.write() else {
            return;
        };
        if entries.len() >= self.capacity {
            entries.retain(|_, entry| from < entry.until);
        }
        // Still full of live entries: start over rather than stop caching the new working set.
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(
            key,
            CachedAllow {
                explanation: explanation.to_vec(),
                from,
                until,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.read().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whole seconds since the epoch, as biscuit's `date` term counts them.
fn seconds(now: SystemTime) -> Option<u64> {
    now.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}
