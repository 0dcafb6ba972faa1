//! `GET /metrics`: the broker's counters (issuance, approvals, webhooks, its dry-run guard
//! and revocation view) plus what this scrape reads from the store (approvals by status,
//! audit head). Unauthenticated like most scrape targets: no label carries an agent,
//! resource, token or operator, only adapter names, verbs, outcomes and stable codes.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use super::BrokerState;
use capgate_core::containment::approval::ApprovalStatus;
use capgate_core::metrics::Sources;

const STATUSES: [(ApprovalStatus, &str); 6] = [
    (ApprovalStatus::Pending, "pending"),
    (ApprovalStatus::Approved, "approved"),
    (ApprovalStatus::Denied, "denied"),
    (ApprovalStatus::Cancelled, "cancelled"),
    (ApprovalStatus::Used, "used"),
    (ApprovalStatus::Expired, "expired"),
];

pub async fn scrape(State(state): State<Arc<BrokerState>>) -> Response {
    // A store that cannot answer leaves its gauges out of this scrape rather than failing it:
    // the counters matter most exactly when the store is in trouble.
    let approvals = match state.store.approvals().await {
        Ok(all) => STATUSES
            .iter()
            .map(|(status, name)| {
                let n = all.iter().filter(|a| a.status == *status).count();
                (*name, n as u64)
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read approvals");
            Vec::new()
        }
    };
    let audit_head = state.store.audit_head().await.ok();
    capgate_net::exposition::response(Sources {
        decisions: vec![state.guard.metrics().clone()],
        revocations: Some(state.guard.revocations().clone()),
        spool: None,
        broker: Some(state.metrics.clone()),
        approvals,
        audit_head,
    })
}
