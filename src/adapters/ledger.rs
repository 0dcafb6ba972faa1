//! The adapter's [`Ledger`]: containment state lives at the broker. Consuming an approval,
//! counting against a velocity limit and recording a write or delete happen synchronously
//! before forwarding (any failure is a deny). Other decisions go through a local spool file
//! shipped in batches off the request path, so nothing is lost while the broker is down.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::client::{Client, ClientError};
use crate::containment::audit::AuditEvent;
use crate::containment::Operation;
use crate::guard::{Ledger, LedgerDenial};
use crate::scope::Verb;

pub struct BrokerLedger {
    client: Client,
    /// The adapter's own key for appending to the audit trail; without it writes are denied.
    adapter_key: Option<String>,
    spool: Option<AuditSpool>,
}

impl BrokerLedger {
    pub fn new(client: Client, adapter_key: Option<String>, spool: Option<AuditSpool>) -> Self {
        BrokerLedger {
            client,
            adapter_key,
            spool,
        }
    }
}

fn denial(e: ClientError) -> LedgerDenial {
    match e {
        ClientError::Refused { code, detail, .. } => LedgerDenial {
            code: static_code(&code),
            reason: detail,
        },
        other => LedgerDenial {
            code: "broker_unreachable",
            reason: other.to_string(),
        },
    }
}

/// Broker codes this adapter passes on; anything else is reported generically.
fn static_code(code: &str) -> &'static str {
    const KNOWN: [&str; 11] = [
        "use_budget_exhausted",
        "rate_limited",
        "approval_used",
        "approval_expired",
        "approval_cancelled",
        "approval_delayed",
        "approval_digest_mismatch",
        "approval_not_approved",
        "approval_not_found",
        "recovery_point",
        "audit_unavailable",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("broker_refused")
}

#[async_trait]
impl Ledger for BrokerLedger {
    async fn request_approval(
        &self,
        token: &str,
        operation: &Operation,
    ) -> Result<String, LedgerDenial> {
        self.client
            .request_approval(token, operation)
            .await
            .map(|a| a.id)
            .map_err(denial)
    }

    async fn consume_approval(
        &self,
        token: &str,
        approval_id: &str,
        digest: &str,
    ) -> Result<(), LedgerDenial> {
        self.client
            .consume_approval(token, approval_id, digest)
            .await
            .map(|_| ())
            .map_err(denial)
    }

    async fn count(&self, token: &str, verb: Verb) -> Result<(), LedgerDenial> {
        self.client
            .count(token, verb)
            .await
            .map(|_| ())
            .map_err(denial)
    }

    async fn count_use(&self, token: &str) -> Result<(), LedgerDenial> {
        self.client
            .count_use(token)
            .await
            .map(|_| ())
            .map_err(denial)
    }

    async fn audit(&self, event: AuditEvent) -> Result<(), LedgerDenial> {
        let Some(key) = &self.adapter_key else {
            return Err(LedgerDenial {
                code: "audit_unavailable",
                reason: "this adapter has no audit key configured, so it cannot record writes"
                    .into(),
            });
        };
        self.client
            .append_audit(key, std::slice::from_ref(&event))
            .await
            .map(|_| ())
            .map_err(denial)
    }

    async fn audit_batch(&self, events: &[AuditEvent]) -> Result<(), LedgerDenial> {
        let Some(key) = &self.adapter_key else {
            return Err(LedgerDenial {
                code: "audit_unavailable",
                reason: "this adapter has no audit key configured, so it cannot record writes"
                    .into(),
            });
        };
        if events.is_empty() {
            return Ok(());
        }
        self.client
            .append_audit(key, events)
            .await
            .map(|_| ())
            .map_err(denial)
    }

    fn record_later(&self, event: AuditEvent) {
        if let Some(spool) = &self.spool {
            spool.record(event);
        }
    }
}

/// Decisions recorded asynchronously: appended to a local JSON-lines spool at once, shipped
/// to the broker in batches, and removed from the spool only once the broker stored them.
#[derive(Clone)]
pub struct AuditSpool {
    sender: mpsc::UnboundedSender<AuditEvent>,
}

impl AuditSpool {
    pub fn start(path: PathBuf, client: Client, adapter_key: Option<String>) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run_spool(path, client, adapter_key, receiver));
        AuditSpool { sender }
    }

    pub fn record(&self, event: AuditEvent) {
        if self.sender.send(event).is_err() {
            tracing::error!("audit spool stopped; decision not recorded");
        }
    }
}

async fn run_spool(
    path: PathBuf,
    client: Client,
    adapter_key: Option<String>,
    mut receiver: mpsc::UnboundedReceiver<AuditEvent>,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            event = receiver.recv() => {
                let Some(event) = event else { return };
                // Everything already queued goes in the same write and the same fsync.
                let mut batch = vec![event];
                while let Ok(more) = receiver.try_recv() {
                    batch.push(more);
                }
                if let Err(e) = append_lines(&path, &batch).await {
                    tracing::error!(error = %e, path = %path.display(), "cannot write audit spool");
                }
            }
            _ = ticker.tick() => {
                if let Some(key) = &adapter_key {
                    ship(&path, &client, key).await;
                }
            }
        }
    }
}

async fn append_lines(path: &PathBuf, events: &[AuditEvent]) -> std::io::Result<()> {
    let mut line = Vec::new();
    for event in events {
        line.extend(serde_json::to_vec(event).map_err(std::io::Error::other)?);
        line.push(b'\n');
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    file.write_all(&line).await?;
    file.sync_data().await
}

async fn ship(path: &PathBuf, client: &Client, key: &str) {
    let Ok(text) = tokio::fs::read_to_string(path).await else {
        return; // nothing spooled yet
    };
    let events: Vec<AuditEvent> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if events.is_empty() {
        return;
    }
    for batch in events.chunks(500) {
        if let Err(e) = client.append_audit(key, batch).await {
            tracing::warn!(error = %e, spooled = events.len(), "broker unreachable; audit records stay spooled");
            return;
        }
    }
    // Only what was read is shipped; anything appended since stays for the next round.
    if let Ok(now) = tokio::fs::read_to_string(path).await {
        let rest = now.get(text.len()..).unwrap_or("");
        if let Err(e) = tokio::fs::write(path, rest).await {
            tracing::error!(error = %e, "cannot trim audit spool; records may be sent twice");
        }
    }
}
