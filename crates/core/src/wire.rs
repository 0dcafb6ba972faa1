//! The JSON bodies the broker answers with and its clients (agents, adapters, the CLI) read:
//! one definition on both sides of the wire.

use serde::{Deserialize, Serialize};

use crate::containment::approval::Approval;
use crate::containment::audit::AuditRecord;
use crate::revocation::Revocation;
use crate::token::GrantedRight;

#[derive(Debug, Serialize, Deserialize)]
pub struct GrantResponse {
    /// The agent's token with the approval block appended.
    pub token: String,
    pub approval: Approval,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CountResponse {
    pub count: u64,
    pub limit: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeState {
    pub frozen: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FeedPage {
    pub revocations: Vec<Revocation>,
    pub next_cursor: u64,
    /// The operators' freeze switch: while on, adapters deny every non-read verb.
    pub frozen: bool,
    /// The store's generation: when it changes, the store was replaced and a follower must
    /// drop its view and read the feed again from cursor 0.
    pub generation: String,
    /// The store's newest cursor: one below the follower's own means entries were lost.
    pub head: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    /// The newest sequence number in the store, so removal of the newest records shows.
    pub head: u64,
}

/// RFC 9396 authorization detail: every action on every location.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationDetail {
    #[serde(rename = "type")]
    pub kind: String,
    pub locations: Vec<String>,
    pub actions: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub issued_token_type: String,
    pub token_type: String,
    pub expires_in: u64,
    pub expires_at: String,
    pub agent: String,
    pub session_id: String,
    pub key_id: u32,
    pub granted: Vec<GrantedRight>,
}
