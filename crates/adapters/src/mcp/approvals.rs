//! Approvals through the protocol. A call that needs approval is refused with the id of the
//! approval request the guard created (as a URL-mode elicitation error for clients that
//! declared URL elicitation, as a tool error otherwise). When the agent retries the same
//! call with the same token, the gateway collects the operator's grant from the broker on
//! the agent's behalf (its token, its session) and decides the retry with the granted token,
//! whose approval block names this call's digest: any other call, or a second retry after
//! the approval was consumed, is not covered. Nothing the client answers (a form, an
//! "accept") ever counts as approval: only the operator's grant at the broker does.

use std::collections::HashMap;
use std::sync::Mutex;

use capgate_client::{Client, ClientError};
use capgate_core::containment::approval::ApprovalStatus;

/// Most approval requests remembered at once; beyond it the oldest are forgotten (the agent
/// then gets a fresh request, never an allow).
const MAX_PENDING: usize = 10_000;

pub enum Collected {
    /// Approved: decide the retry with this token (the agent's, plus the approval block).
    Granted(String),
    /// Still waiting for an operator.
    Waiting,
    /// Denied, cancelled, used or unknown: decide afresh.
    Gone,
}

pub struct PendingApprovals {
    client: Client,
    /// (agent token, operation digest) -> approval request id.
    pending: Mutex<HashMap<(String, String), String>>,
    /// Where an operator approves: `{id}` is replaced by the request id.
    url_template: String,
}

impl PendingApprovals {
    pub fn new(client: Client, url_template: String) -> Self {
        PendingApprovals {
            client,
            pending: Mutex::default(),
            url_template,
        }
    }

    pub fn url(&self, id: &str) -> String {
        self.url_template.replace("{id}", id)
    }

    pub fn remember(&self, token: &str, digest: &str, id: &str) {
        if let Ok(mut pending) = self.pending.lock() {
            if pending.len() >= MAX_PENDING {
                pending.clear();
            }
            pending.insert((token.to_owned(), digest.to_owned()), id.to_owned());
        }
    }

    pub fn pending(&self, token: &str, digest: &str) -> Option<String> {
        self.pending
            .lock()
            .ok()?
            .get(&(token.to_owned(), digest.to_owned()))
            .cloned()
    }

    fn forget(&self, token: &str, digest: &str) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&(token.to_owned(), digest.to_owned()));
        }
    }

    /// Asks the broker for the grant of request `id` with the agent's own token.
    pub async fn collect(&self, token: &str, digest: &str, id: &str) -> Collected {
        match self.client.grant(token, id).await {
            Ok(grant) => {
                self.forget(token, digest);
                Collected::Granted(grant.token)
            }
            Err(ClientError::Refused { status: 409, .. }) => {
                match self.client.approval(token, id).await {
                    Ok(approval) if approval.status == ApprovalStatus::Pending => {
                        Collected::Waiting
                    }
                    Ok(_) | Err(ClientError::Refused { .. }) => {
                        self.forget(token, digest);
                        Collected::Gone
                    }
                    Err(_) => Collected::Waiting,
                }
            }
            Err(ClientError::Refused { .. }) => {
                self.forget(token, digest);
                Collected::Gone
            }
            // The broker is unreachable: the call stays refused, the request stays known.
            Err(_) => Collected::Waiting,
        }
    }
}
