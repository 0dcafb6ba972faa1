//! What every adapter process runs beside its protocol: the key, revocation and containment
//! views synced from the broker, and the ledger (with its audit spool) that fulfils the
//! guard's obligations.

use std::path::PathBuf;
use std::sync::Arc;

use super::ledger::{AuditSpool, BrokerLedger};
use super::sync::{empty_keys, spawn, SyncConfig};
use capgate_client::{Client, ClientError};
use capgate_core::guard::{ContainmentView, KeyView, Ledger};
use capgate_core::revocation::RevocationView;

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
    /// The audit spool's depth and shipping counters, for `/metrics`.
    pub spool_metrics: Arc<capgate_core::metrics::SpoolMetrics>,
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
        let spool_metrics = spool.metrics().clone();
        let ledger: Arc<dyn Ledger> = Arc::new(BrokerLedger::new(client, adapter_key, Some(spool)));
        Ok(AdapterRuntime {
            keys,
            revocations,
            containment,
            ledger,
            spool_metrics,
            tasks,
        })
    }
}

impl AdapterRuntime {
    /// Serves `/metrics` on `addr` (bound before returning, so a bad address is a start
    /// error): this guard's decisions, the revocation view and the audit spool.
    pub async fn serve_metrics(
        &self,
        addr: std::net::SocketAddr,
        guard: &capgate_core::guard::Guard,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "metrics listening");
        let sources = capgate_core::metrics::Sources {
            decisions: vec![guard.metrics().clone()],
            revocations: Some(self.revocations.clone()),
            spool: Some(self.spool_metrics.clone()),
            ..Default::default()
        };
        Ok(tokio::spawn(async move {
            if let Err(e) = capgate_net::exposition::serve_adapter_metrics(listener, sources).await
            {
                tracing::error!(error = %e, "metrics server failed");
            }
        }))
    }
}
