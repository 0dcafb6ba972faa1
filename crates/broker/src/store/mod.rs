//! Durable state behind the broker: issued sessions and revocations (and, later, approvals,
//! counters and audit). A trait so the embedded SQLite default and a shared Redis store are
//! interchangeable without touching handlers. Signing keys are never stored here.
//!
//! Every method can fail; callers treat any error as a deny (fail closed).

mod redis;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::redis::RedisStore;
use capgate_core::containment::approval::{Approval, ApprovalAction, ApprovalError};
use capgate_core::containment::audit::{AuditEvent, AuditRecord};
pub use capgate_core::revocation::{Revocation, RevocationKind};
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("store is misconfigured: {0}")]
    Misconfigured(String),
    /// The store this broker was using is gone (emptied, replaced or rolled back); nothing
    /// that depends on its state is done until an operator accepts the loss.
    #[error("store lost: {0}")]
    Lost(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRevocation {
    pub kind: RevocationKind,
    pub value: String,
    pub reason: String,
    pub revoked_by: String,
    /// When what it revokes expires anyway (seconds since epoch); `None` = forever.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: String,
    pub agent: String,
    pub key_id: u32,
    pub issued_at: u64,
    pub expires_at: u64,
    /// The granted rights, as JSON, for audit and inspection.
    pub rights: String,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn record_session(&self, session: SessionRecord) -> Result<(), StoreError>;
    async fn session(&self, session_id: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// Idempotent: revoking the same thing twice returns the first entry.
    async fn revoke(&self, revocation: NewRevocation) -> Result<Revocation, StoreError>;
    async fn revocations_since(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<Revocation>, StoreError>;
    async fn agent_revoked(&self, agent: &str) -> Result<bool, StoreError>;
    /// Cheap liveness check for health endpoints.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Refuses (`Misconfigured`, saying which setting to change) a store that would lose
    /// acknowledged state on a restart. The embedded store is always durable.
    async fn check_durable(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// The random id the store was created with, `None` when it has none (new, or lost):
    /// a store that comes back without the generation a broker knew has lost its state.
    async fn generation(&self) -> Result<Option<String>, StoreError>;
    /// Sets the generation unless one is set (set-if-absent) and returns the stored one.
    async fn init_generation(&self, candidate: &str) -> Result<String, StoreError>;
    /// The newest revocation cursor ever handed out (0 when none); going backwards means
    /// the store lost entries.
    async fn revocation_head(&self) -> Result<u64, StoreError>;
    /// The newest revocation cursor this process knows of; changes when any broker sharing
    /// the store revokes something, so feed readers can be woken at once.
    fn changes(&self) -> watch::Receiver<u64>;

    async fn create_approval(&self, approval: &Approval) -> Result<(), StoreError>;
    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError>;
    /// Every approval request, newest first (bounded).
    async fn approvals(&self) -> Result<Vec<Approval>, StoreError>;
    /// Compare-and-set: stores `next` only if the stored version is `next.version - 1`.
    async fn replace_approval(&self, next: &Approval) -> Result<bool, StoreError>;

    /// Atomically counts one more event under `key` in the current fixed window of `window`
    /// and returns the count including it.
    async fn increment(&self, key: &str, window: Duration) -> Result<u64, StoreError>;

    async fn set_frozen(&self, frozen: bool) -> Result<(), StoreError>;
    async fn frozen(&self) -> Result<bool, StoreError>;

    /// Appends to the hash chain atomically and returns the stored record.
    async fn append_audit(&self, event: AuditEvent) -> Result<AuditRecord, StoreError>;
    /// Appends several records in order; stores that can, commit them together. Returns the
    /// sequence number of the last one.
    async fn append_audit_batch(&self, events: Vec<AuditEvent>) -> Result<u64, StoreError> {
        let mut head = 0;
        for event in events {
            head = self.append_audit(event).await?.seq;
        }
        Ok(head)
    }
    async fn audit_since(&self, seq: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
    /// The sequence number of the newest record (0 when empty).
    async fn audit_head(&self) -> Result<u64, StoreError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no approval {0}")]
    NotFound(String),
    #[error(transparent)]
    Rejected(#[from] ApprovalError),
}

/// Applies `action` to approval `id` atomically (read, transition, compare-and-set, retry).
pub async fn update_approval(
    store: &dyn Store,
    id: &str,
    action: &ApprovalAction,
    now: u64,
) -> Result<Approval, UpdateError> {
    for _ in 0..16 {
        let current = store
            .approval(id)
            .await?
            .ok_or_else(|| UpdateError::NotFound(id.to_owned()))?;
        let next = current.apply(action, now)?;
        if store.replace_approval(&next).await? {
            return Ok(next);
        }
    }
    Err(StoreError::Unavailable("approval kept changing under concurrent updates".into()).into())
}

/// Opens the configured store: Redis when a URL is given, else SQLite in the data directory.
pub async fn open(config: &crate::config::BrokerConfig) -> Result<Arc<dyn Store>, StoreError> {
    match &config.store.redis {
        Some(url) => Ok(Arc::new(
            RedisStore::connect(url, &config.store.prefix).await?,
        )),
        None => Ok(Arc::new(SqliteStore::open(
            &config.data_dir.join("state.db"),
        )?)),
    }
}
