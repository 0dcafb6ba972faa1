//! The adapter's [`Ledger`]: containment state lives at the broker. Consuming an approval,
//! counting against a velocity limit and recording a write or delete happen synchronously
//! before forwarding (any failure is a deny). Other decisions go through a local spool file
//! shipped in batches off the request path, so nothing is lost while the broker is down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use capgate_client::{Client, ClientError};
use capgate_core::containment::audit::AuditEvent;
use capgate_core::containment::Operation;
use capgate_core::guard::{Ledger, LedgerCode, LedgerDenial};
use capgate_core::metrics::SpoolMetrics;
use capgate_core::scope::Verb;
use std::sync::atomic::Ordering;

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
            code: LedgerCode::of_broker(&code),
            reason: detail,
        },
        other => LedgerDenial {
            code: LedgerCode::BrokerUnreachable,
            reason: other.to_string(),
        },
    }
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
        self.audit_batch(std::slice::from_ref(&event)).await
    }

    async fn audit_batch(&self, events: &[AuditEvent]) -> Result<(), LedgerDenial> {
        let Some(key) = &self.adapter_key else {
            return Err(LedgerDenial {
                code: LedgerCode::AuditUnavailable,
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

    async fn attach_preview(&self, approval_id: &str, preview: &str) -> Result<(), LedgerDenial> {
        let Some(key) = &self.adapter_key else {
            return Err(LedgerDenial {
                code: LedgerCode::PreviewUnavailable,
                reason: "this adapter has no adapter key configured".into(),
            });
        };
        self.client
            .attach_preview(key, approval_id, preview)
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

/// Decisions recorded asynchronously. Sessions drop them in a shared queue without waking
/// anyone (a wake-up per decision cost a context switch per statement); a writer thread
/// appends the queue to a local JSON-lines spool every [`WRITE_EVERY`] and syncs it to disk
/// at most every [`SYNC_EVERY`]; a task ships the spool to the broker in batches and has
/// the writer drop what the broker stored.
#[derive(Clone)]
pub struct AuditSpool {
    queue: Arc<Mutex<Vec<SpoolCommand>>>,
    metrics: Arc<SpoolMetrics>,
}

/// How long a decision may wait in memory before it is written to the spool.
const WRITE_EVERY: Duration = Duration::from_millis(50);

/// How long a spooled record may sit in the page cache before it is synced: the bound on
/// what a crash of the whole machine could lose of read decisions (writes are recorded at
/// the broker before they take effect, never only here).
const SYNC_EVERY: Duration = Duration::from_millis(200);

enum SpoolCommand {
    Record(AuditEvent),
    /// Drop the first `bytes` of the spool: the broker has stored them. Answered once done,
    /// so the shipper never reads (and sends) those records again.
    Trim(usize, tokio::sync::oneshot::Sender<()>),
}

impl AuditSpool {
    pub fn start(path: PathBuf, client: Client, adapter_key: Option<String>) -> Self {
        let spool = AuditSpool {
            queue: Arc::new(Mutex::new(Vec::new())),
            metrics: Arc::new(SpoolMetrics::default()),
        };
        let (writer_path, queue) = (path.clone(), spool.queue.clone());
        let spawned = std::thread::Builder::new()
            .name("capgate-audit-spool".into())
            .spawn(move || write_spool(&writer_path, &queue));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the audit spool writer");
        }
        if let Some(key) = adapter_key {
            tokio::spawn(ship_spool(path, client, key, spool.clone()));
        }
        spool
    }

    /// Depth, shipped records and shipping failures, for `/metrics`.
    pub fn metrics(&self) -> &Arc<SpoolMetrics> {
        &self.metrics
    }

    pub fn record(&self, event: AuditEvent) {
        self.push(SpoolCommand::Record(event));
    }

    fn push(&self, command: SpoolCommand) {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(command);
    }
}

fn write_spool(path: &Path, queue: &Mutex<Vec<SpoolCommand>>) {
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let mut file = match open(path) {
        Ok(file) => file,
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "cannot open audit spool");
            return;
        }
    };
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    let mut lines = Vec::new();
    loop {
        std::thread::sleep(WRITE_EVERY);
        let commands = std::mem::take(
            &mut *queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        // Everything queued goes in the same write.
        for command in commands {
            match command {
                SpoolCommand::Record(event) => match serde_json::to_vec(&event) {
                    Ok(line) => {
                        lines.extend_from_slice(&line);
                        lines.push(b'\n');
                    }
                    Err(e) => tracing::error!(error = %e, "audit record not serialisable"),
                },
                SpoolCommand::Trim(bytes, done) => {
                    if let Err(e) = flush(&mut file, &mut lines).and_then(|()| trim(path, bytes)) {
                        tracing::error!(error = %e, "cannot trim audit spool; records may be sent twice");
                    }
                    let _ = done.send(());
                    match open(path) {
                        Ok(reopened) => file = reopened,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot reopen audit spool");
                            return;
                        }
                    }
                }
            }
        }
        if !lines.is_empty() {
            if let Err(e) = flush(&mut file, &mut lines) {
                tracing::error!(error = %e, path = %path.display(), "cannot write audit spool");
            }
            unsynced = true;
        }
        if unsynced && last_sync.elapsed() >= SYNC_EVERY {
            if let Err(e) = file.sync_data() {
                tracing::error!(error = %e, "cannot sync audit spool");
            }
            unsynced = false;
            last_sync = Instant::now();
        }
    }
}

fn flush(file: &mut std::fs::File, lines: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Write;
    let result = file.write_all(lines);
    lines.clear();
    result
}

/// Rewrites the spool without its first `bytes`, atomically (a new file renamed over it).
fn trim(path: &Path, bytes: usize) -> std::io::Result<()> {
    let text = std::fs::read(path)?;
    let rest = text.get(bytes..).unwrap_or_default();
    let fresh = path.with_extension("trim");
    std::fs::write(&fresh, rest)?;
    std::fs::File::open(&fresh)?.sync_all()?;
    std::fs::rename(&fresh, path)
}

async fn ship_spool(path: PathBuf, client: Client, key: String, spool: AuditSpool) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        ticker.tick().await;
        let shipped = ship(&path, &client, &key, &spool.metrics).await;
        if shipped > 0 {
            let (done, trimmed) = tokio::sync::oneshot::channel();
            spool.push(SpoolCommand::Trim(shipped, done));
            if trimmed.await.is_err() {
                tracing::error!("audit spool writer stopped");
                return;
            }
        }
    }
}

/// Batches stay under the broker's body limit for `POST /v1/audit` (4 MiB) and its 500
/// records per call.
const SHIP_BATCH_RECORDS: usize = 500;
const SHIP_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// What a spooled line must be to ship: one audit event, checked for shape without building
/// its detail (the costliest part of shipping was parsing each record into values and
/// serialising it again). A line that is not one is skipped and logged, so it cannot stall
/// every later record at the broker.
fn check_spooled(line: &str) -> Result<(), serde_json::Error> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SpooledEvent<'a> {
        #[serde(rename = "kind")]
        _kind: capgate_core::containment::audit::AuditKind,
        #[serde(rename = "actor", borrow)]
        _actor: Option<std::borrow::Cow<'a, str>>,
        #[serde(rename = "detail", borrow)]
        _detail: &'a serde_json::value::RawValue,
    }
    serde_json::from_str::<SpooledEvent>(line).map(|_| ())
}

/// Ships what the spool holds; returns how many of its leading bytes the broker stored.
async fn ship(path: &Path, client: &Client, key: &str, metrics: &SpoolMetrics) -> usize {
    let Ok(text) = tokio::fs::read_to_string(path).await else {
        return 0; // nothing spooled yet
    };
    // Complete lines still to ship: the spool's depth, counted down as batches are stored.
    let mut depth = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .count() as u64;
    metrics.depth.store(depth, Ordering::Relaxed);
    // Ships whole batches in order and remembers how far the broker has stored them, so a
    // failure part-way leaves exactly the unstored tail spooled.
    let mut shipped = 0usize;
    let mut batch: Vec<&str> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut offset = 0usize;
    let mut lines_in_batch = 0u64;
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        offset += line.len();
        if !line.ends_with('\n') {
            break; // a record still being written
        }
        lines_in_batch += 1;
        match check_spooled(line) {
            Ok(()) => {
                batch.push(line.trim_end());
                batch_bytes += line.len();
            }
            Err(e) => tracing::error!(error = %e, "unreadable audit spool line skipped"),
        }
        let last = lines.peek().is_none_or(|next| !next.ends_with('\n'));
        if batch.len() >= SHIP_BATCH_RECORDS || batch_bytes >= SHIP_BATCH_BYTES || last {
            if !batch.is_empty() {
                if let Err(e) = client.append_audit_serialised(key, &batch).await {
                    metrics.ship_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "broker unreachable; audit records stay spooled");
                    break;
                }
                let stored = batch.len() as u64;
                metrics.shipped.fetch_add(stored, Ordering::Relaxed);
            }
            // Skipped unreadable lines leave the spool with the batch around them.
            depth = depth.saturating_sub(lines_in_batch);
            metrics.depth.store(depth, Ordering::Relaxed);
            lines_in_batch = 0;
            shipped = offset;
            batch.clear();
            batch_bytes = 0;
        }
    }
    shipped
}

#[cfg(test)]
mod tests {
    use super::check_spooled;
    use capgate_core::containment::audit::{AuditEvent, AuditKind};

    #[test]
    fn only_whole_audit_events_ship() {
        let event = AuditEvent {
            kind: AuditKind::Decision,
            actor: Some("agent \"quoted\"".into()),
            detail: serde_json::json!({"resource": "r", "blocks": [{"source": "a;\n"}]}),
        };
        let line = serde_json::to_string(&event).expect("json") + "\n";
        assert!(check_spooled(&line).is_ok());
        // Torn by a crash mid-write, another shape, or not an event at all: skipped.
        assert!(check_spooled(&line[..line.len() / 2]).is_err());
        assert!(check_spooled(r#"{"kind":"decision","actor":null}"#).is_err());
        assert!(check_spooled(r#"{"kind":"nonsense","actor":null,"detail":{}}"#).is_err());
        assert!(
            check_spooled(r#"{"kind":"decision","actor":null,"detail":{},"extra":1}"#).is_err()
        );
        assert!(check_spooled("[]").is_err());
    }
}
