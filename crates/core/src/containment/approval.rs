//! Approval requests and their life: pending → approved (by enough distinct operators) →
//! used once; or denied, or cancelled (also during a staged delay), or expired (nobody
//! decided in time). Transitions are pure functions; stores apply them atomically
//! (compare-and-set on `version`), so of several brokers sweeping expired requests exactly
//! one moves each and tells anyone.

use serde::{Deserialize, Serialize};

use super::Operation;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Denied,
    Cancelled,
    Used,
    /// Still pending when it expired; marked by the broker's expiry sweep.
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub id: String,
    pub status: ApprovalStatus,
    pub agent: String,
    pub session: String,
    /// The revocation id of the requesting token's authority block: the token and every
    /// attenuated copy of it. Absent on approvals stored before approvals were bound to
    /// their requester; those can no longer be collected or used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<String>,
    /// What the approver sees and approves: adapter, resource, verb, method/path/body or SQL.
    pub operation: Operation,
    pub digest: String,
    pub created_at: u64,
    /// After this instant the request (or the approved operation) can no longer be used.
    pub expires_at: u64,
    pub required: u32,
    pub approvers: Vec<String>,
    pub decided_by: Option<String>,
    /// Staged execution: not usable before this instant.
    pub not_before: Option<u64>,
    pub delay_seconds: u64,
    pub used_at: Option<u64>,
    /// Incremented by every change; stores compare-and-set on it.
    pub version: u64,
    /// What the operation would touch, measured by the adapter without running it (a SQL
    /// statement's row count), or why it was not measured. Shown to approvers; outside the
    /// digest, so it can never change what is approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<Preview>,
}

/// An adapter's measurement of what an approval's operation would touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preview {
    /// "48,211 of 48,230 rows", or "not measured: <why>".
    pub text: String,
    /// The adapter that measured it.
    pub by: String,
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalAction {
    Approve {
        operator: String,
        ttl_seconds: u64,
    },
    Deny {
        operator: String,
    },
    Cancel {
        operator: String,
    },
    Consume {
        digest: String,
        requester: Requester,
    },
    /// A pending request past its expiry becomes `Expired`; refused before then.
    Expire,
    /// The adapter attaches its measurement while the request is pending.
    AttachPreview {
        preview: Preview,
    },
}

/// Who is collecting or using an approval: the session and token lineage of the token
/// presented. Only the requester of an approval may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub session: String,
    pub lineage: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error("approval is {0:?}, not pending")]
    NotPending(ApprovalStatus),
    #[error("operator {0} has already approved; a second approval must come from someone else")]
    SameOperator(String),
    #[error("operator {0} cannot approve a request made under its own name: the requester may not be an approver")]
    SelfApproval(String),
    #[error("approval has expired")]
    Expired,
    #[error("approval is bound to a different operation")]
    DigestMismatch,
    #[error("approval is {0:?}, not approved")]
    NotApproved(ApprovalStatus),
    #[error("staged execution: not before {0}")]
    TooEarly(u64),
    #[error("approval was already used")]
    AlreadyUsed,
    #[error("approval was requested by another session; only the session (and token lineage) that asked can collect or use it")]
    OtherSession,
    #[error("approval was stored before approvals were bound to their session; request a new one")]
    Unbound,
    #[error("approval has not expired yet")]
    NotExpired,
}

impl ApprovalError {
    pub fn code(&self) -> &'static str {
        match self {
            ApprovalError::NotPending(_) => "approval_not_pending",
            ApprovalError::SameOperator(_) => "approval_same_operator",
            ApprovalError::SelfApproval(_) => "approval_self",
            ApprovalError::Expired => "approval_expired",
            ApprovalError::DigestMismatch => "approval_digest_mismatch",
            ApprovalError::NotApproved(ApprovalStatus::Cancelled) => "approval_cancelled",
            ApprovalError::NotApproved(_) => "approval_not_approved",
            ApprovalError::TooEarly(_) => "approval_delayed",
            ApprovalError::AlreadyUsed => "approval_used",
            ApprovalError::OtherSession => "approval_other_session",
            ApprovalError::Unbound => "approval_unbound",
            ApprovalError::NotExpired => "approval_not_expired",
        }
    }

    /// Whether the caller is the wrong party (403) rather than the approval in the wrong
    /// state (409).
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            ApprovalError::OtherSession | ApprovalError::Unbound | ApprovalError::SelfApproval(_)
        )
    }
}

impl Approval {
    /// Refuses anyone but the session and token lineage that requested the approval, so
    /// another session of the same agent cannot collect it or run the operation.
    pub fn check_requester(&self, requester: &Requester) -> Result<(), ApprovalError> {
        let Some(lineage) = &self.lineage else {
            return Err(ApprovalError::Unbound);
        };
        if *lineage != requester.lineage || self.session != requester.session {
            return Err(ApprovalError::OtherSession);
        }
        Ok(())
    }

    /// Applies one action at `now` (seconds since the epoch), returning the next state.
    pub fn apply(&self, action: &ApprovalAction, now: u64) -> Result<Approval, ApprovalError> {
        let mut next = self.clone();
        next.version += 1;
        match action {
            ApprovalAction::Approve {
                operator,
                ttl_seconds,
            } => {
                self.require_pending(now)?;
                // Operator and agent names share one namespace: a person holding both
                // credentials under one name would otherwise approve their own agent.
                if *operator == self.agent {
                    return Err(ApprovalError::SelfApproval(operator.clone()));
                }
                if self.approvers.contains(operator) {
                    return Err(ApprovalError::SameOperator(operator.clone()));
                }
                next.approvers.push(operator.clone());
                if next.approvers.len() as u32 >= self.required {
                    let not_before = now + self.delay_seconds;
                    next.status = ApprovalStatus::Approved;
                    next.not_before = Some(not_before);
                    next.expires_at = not_before + ttl_seconds;
                    next.decided_by = Some(next.approvers.join(", "));
                }
            }
            ApprovalAction::Deny { operator } => {
                self.require_pending(now)?;
                next.status = ApprovalStatus::Denied;
                next.decided_by = Some(operator.clone());
            }
            ApprovalAction::Cancel { operator } => match self.status {
                ApprovalStatus::Pending | ApprovalStatus::Approved => {
                    next.status = ApprovalStatus::Cancelled;
                    next.decided_by = Some(operator.clone());
                }
                other => return Err(ApprovalError::NotPending(other)),
            },
            ApprovalAction::Consume { digest, requester } => {
                self.check_requester(requester)?;
                match self.status {
                    ApprovalStatus::Approved => {}
                    ApprovalStatus::Used => return Err(ApprovalError::AlreadyUsed),
                    other => return Err(ApprovalError::NotApproved(other)),
                }
                if *digest != self.digest {
                    return Err(ApprovalError::DigestMismatch);
                }
                if let Some(not_before) = self.not_before {
                    if now < not_before {
                        return Err(ApprovalError::TooEarly(not_before));
                    }
                }
                if now >= self.expires_at {
                    return Err(ApprovalError::Expired);
                }
                next.status = ApprovalStatus::Used;
                next.used_at = Some(now);
            }
            ApprovalAction::Expire => {
                if self.status != ApprovalStatus::Pending {
                    return Err(ApprovalError::NotPending(self.status));
                }
                if now < self.expires_at {
                    return Err(ApprovalError::NotExpired);
                }
                next.status = ApprovalStatus::Expired;
            }
            ApprovalAction::AttachPreview { preview } => {
                self.require_pending(now)?;
                next.preview = Some(preview.clone());
            }
        }
        Ok(next)
    }

    fn require_pending(&self, now: u64) -> Result<(), ApprovalError> {
        // Swept or not, an expired request answers the same.
        if self.status == ApprovalStatus::Expired {
            return Err(ApprovalError::Expired);
        }
        if self.status != ApprovalStatus::Pending {
            return Err(ApprovalError::NotPending(self.status));
        }
        if now >= self.expires_at {
            return Err(ApprovalError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Verb;
    use std::collections::BTreeMap;

    fn pending(required: u32, delay: u64) -> Approval {
        let operation = Operation {
            adapter: "railway".into(),
            resource: "http://railway/volumes/vol_1".into(),
            verb: Verb::Delete,
            detail: BTreeMap::new(),
        };
        Approval {
            id: "a1".into(),
            status: ApprovalStatus::Pending,
            agent: "bot".into(),
            session: "s".into(),
            lineage: Some("l".into()),
            digest: operation.digest(),
            operation,
            created_at: 100,
            expires_at: 700,
            required,
            approvers: vec![],
            decided_by: None,
            not_before: None,
            delay_seconds: delay,
            used_at: None,
            version: 0,
            preview: None,
        }
    }

    fn consume(digest: &str) -> ApprovalAction {
        ApprovalAction::Consume {
            digest: digest.into(),
            requester: requester(),
        }
    }

    fn requester() -> Requester {
        Requester {
            session: "s".into(),
            lineage: "l".into(),
        }
    }

    fn approve(who: &str) -> ApprovalAction {
        ApprovalAction::Approve {
            operator: who.into(),
            ttl_seconds: 300,
        }
    }

    #[test]
    fn two_person_rule_needs_two_distinct_operators() {
        let a = pending(2, 0);
        let once = a.apply(&approve("alice"), 110).expect("first");
        assert_eq!(once.status, ApprovalStatus::Pending);
        assert_eq!(
            once.apply(&approve("alice"), 111),
            Err(ApprovalError::SameOperator("alice".into()))
        );
        let twice = once.apply(&approve("bob"), 112).expect("second");
        assert_eq!(twice.status, ApprovalStatus::Approved);
        assert_eq!(twice.version, 2);
    }

    #[test]
    fn the_requesting_agent_cannot_approve_under_an_operator_key() {
        for required in [1, 2] {
            let a = pending(required, 0);
            assert_eq!(
                a.apply(&approve("bot"), 110)
                    .map_err(|e| (e.code(), e.is_forbidden())),
                Err(("approval_self", true)),
                "{required} required"
            );
        }
        let once = pending(2, 0).apply(&approve("alice"), 110).expect("first");
        assert_eq!(
            once.apply(&approve("bot"), 111),
            Err(ApprovalError::SelfApproval("bot".into())),
            "not the second person either"
        );
        // Denying one's own request stays possible: it only makes things safer.
        let denied = pending(1, 0).apply(
            &ApprovalAction::Deny {
                operator: "bot".into(),
            },
            110,
        );
        assert_eq!(denied.map(|d| d.status), Ok(ApprovalStatus::Denied));
    }

    #[test]
    fn consumption_is_single_use_digest_bound_and_time_bound() {
        let approved = pending(1, 0)
            .apply(&approve("alice"), 110)
            .expect("approve");
        let digest = approved.digest.clone();
        assert_eq!(
            approved.apply(&consume(&"0".repeat(64)), 120),
            Err(ApprovalError::DigestMismatch)
        );
        assert_eq!(
            approved.apply(&consume(&digest), 410),
            Err(ApprovalError::Expired)
        );
        let used = approved.apply(&consume(&digest), 120).expect("use");
        assert_eq!(
            used.apply(&consume(&digest), 121),
            Err(ApprovalError::AlreadyUsed)
        );
    }

    #[test]
    fn staged_execution_waits_and_can_be_cancelled() {
        let approved = pending(1, 60)
            .apply(&approve("alice"), 110)
            .expect("approve");
        let digest = approved.digest.clone();
        assert_eq!(
            approved.apply(&consume(&digest), 150),
            Err(ApprovalError::TooEarly(170))
        );
        let cancelled = approved
            .apply(
                &ApprovalAction::Cancel {
                    operator: "bob".into(),
                },
                160,
            )
            .expect("cancel");
        assert_eq!(
            cancelled
                .apply(&consume(&digest), 180)
                .map_err(|e| e.code()),
            Err("approval_cancelled")
        );
    }

    #[test]
    fn denied_and_expired_requests_cannot_be_approved() {
        let denied = pending(1, 0)
            .apply(
                &ApprovalAction::Deny {
                    operator: "alice".into(),
                },
                110,
            )
            .expect("deny");
        assert_eq!(
            denied.apply(&approve("bob"), 111),
            Err(ApprovalError::NotPending(ApprovalStatus::Denied))
        );
        assert_eq!(
            pending(1, 0).apply(&approve("bob"), 800),
            Err(ApprovalError::Expired)
        );
    }

    #[test]
    fn only_a_pending_request_past_its_expiry_expires_and_only_once() {
        let a = pending(1, 0);
        assert_eq!(
            a.apply(&ApprovalAction::Expire, 699),
            Err(ApprovalError::NotExpired)
        );
        let expired = a.apply(&ApprovalAction::Expire, 700).expect("expire");
        assert_eq!(expired.status, ApprovalStatus::Expired);
        assert_eq!(expired.version, 1);
        // A second sweeper (another broker) loses: the state already moved.
        assert_eq!(
            expired.apply(&ApprovalAction::Expire, 701),
            Err(ApprovalError::NotPending(ApprovalStatus::Expired))
        );
        assert_eq!(
            expired.apply(&approve("bob"), 701),
            Err(ApprovalError::Expired)
        );
        assert_eq!(
            expired
                .apply(
                    &ApprovalAction::Deny {
                        operator: "bob".into()
                    },
                    701
                )
                .map_err(|e| e.code()),
            Err("approval_expired")
        );
        let approved = a.apply(&approve("alice"), 110).expect("approve");
        assert_eq!(
            approved.apply(&ApprovalAction::Expire, 10_000),
            Err(ApprovalError::NotPending(ApprovalStatus::Approved))
        );
    }

    #[test]
    fn only_the_requesting_session_and_lineage_may_use_an_approval() {
        let approved = pending(1, 0)
            .apply(&approve("alice"), 110)
            .expect("approve");
        let digest = approved.digest.clone();
        for (session, lineage) in [("other", "l"), ("s", "other"), ("other", "other")] {
            let action = ApprovalAction::Consume {
                digest: digest.clone(),
                requester: Requester {
                    session: session.into(),
                    lineage: lineage.into(),
                },
            };
            assert_eq!(
                approved.apply(&action, 120),
                Err(ApprovalError::OtherSession),
                "{session}/{lineage}"
            );
        }
        let mut unbound = approved.clone();
        unbound.lineage = None;
        assert_eq!(
            unbound.apply(&consume(&digest), 120).map_err(|e| e.code()),
            Err("approval_unbound")
        );
        assert!(approved.apply(&consume(&digest), 120).is_ok());
    }

    #[test]
    fn approvals_stored_before_binding_still_load_and_are_refused() {
        let mut stored = serde_json::to_value(pending(1, 0)).expect("json");
        stored.as_object_mut().map(|o| o.remove("lineage"));
        let old: Approval = serde_json::from_value(stored).expect("old approval loads");
        assert_eq!(old.lineage, None);
        assert_eq!(
            old.check_requester(&requester()),
            Err(ApprovalError::Unbound)
        );
    }
}
