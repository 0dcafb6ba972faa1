//! What every adapter process runs beside its protocol: the key, revocation and containment
//! views synced from the broker, and the ledger (with its audit spool) that fulfils the
//! guard's obligations.

use std::path::PathBuf;
use std::sync::Arc;

use super::ledger::{AuditSpool, BrokerLedger};
use super::sync::{empty_keys, spawn, SyncConfig};
use crate::client::{Client, ClientError};
use crate::guard::{ContainmentView, KeyView, Ledger};
use crate::revocation::RevocationView;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("adapter key variable {0} is not set")]
    AdapterKey(String),
}

pub struct AdapterRuntime {
    pub keys: KeyView,
    pub revocations: Arc<RevocationView>,
    pub containment: Arc<ContainmentView>,
    pub ledger: Arc<dyn Ledger>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl AdapterRuntime {
    /// Starts syncing from `broker`. The adapter key (read from `adapter_key_env`) lets the
    /// ledger record writes; without one, writes are denied.
    pub fn start(
        broker: &str,
        adapter_key_env: Option<&str>,
        spool: PathBuf,
    ) -> Result<Self, RuntimeError> {
        let keys = empty_keys();
        let revocations = Arc::new(RevocationView::new());
        let containment = Arc::new(ContainmentView::new());
        let tasks = spawn(
            SyncConfig::new(broker),
            revocations.clone(),
            keys.clone(),
            containment.clone(),
        )?;
        let client = Client::new(broker)?;
        let adapter_key = adapter_key_env
            .map(|var| std::env::var(var).map_err(|_| RuntimeError::AdapterKey(var.to_owned())))
            .transpose()?;
        let spool = AuditSpool::start(spool, client.clone(), adapter_key.clone());
        let ledger: Arc<dyn Ledger> = Arc::new(BrokerLedger::new(client, adapter_key, Some(spool)));
        Ok(AdapterRuntime {
            keys,
            revocations,
            containment,
            ledger,
            tasks,
        })
    }
}

/// Where adapter policies are, unless the configuration (broker's or adapter's) says otherwise.
pub(crate) fn default_adapter_policies() -> std::path::PathBuf {
    std::path::PathBuf::from("policies/adapters")
}

/// How old an adapter's revocation view may grow before it denies everything.
pub(crate) fn default_max_staleness() -> std::time::Duration {
    crate::broker::DEFAULT_MAX_STALENESS
}
