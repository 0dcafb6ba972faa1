//! `capgate audit`: verify, tail and export the hash-chained audit trail.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use capgate::config::BrokerConfig;
use capgate::token::Keyring;
use clap::Subcommand;

use super::common::*;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the whole chain; names every edited, removed or reordered record.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// Check an exported log (JSON lines) instead of the store.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// The newest records, readable; optionally of one agent or kind; `--follow` streams.
    Tail {
        #[command(flatten)]
        config: ConfigArg,
        /// Only records whose actor is this agent (or operator).
        #[arg(long)]
        agent: Option<String>,
        /// Only records of this kind (decision, issuance, approval, revocation, ...).
        #[arg(long)]
        kind: Option<String>,
        /// How many of the newest (matching) records to show first.
        #[arg(short, default_value_t = 50)]
        n: usize,
        /// Keep printing new records as they are appended (polls the store).
        #[arg(long, short)]
        follow: bool,
        /// How often `--follow` looks for new records.
        #[arg(long, default_value = "500ms")]
        interval: humantime::Duration,
    },
    /// Print the trail as JSON lines (for `policy replay --audit`).
    Export(ConfigArg),
}

pub fn read_audit_file(
    path: &Path,
) -> Result<Vec<capgate::containment::audit::AuditRecord>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// The data directory's newest audit checkpoint, its signature checked with the broker's
/// checkpoint key (an unsigned or forged one is an error, not a pass).
fn signed_checkpoint(
    config: &BrokerConfig,
) -> Result<Option<capgate::containment::checkpoint::Checkpoint>, String> {
    let Some(checkpoint) =
        capgate::containment::checkpoint::load(&config.data_dir).map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let key = Keyring::open(&config.data_dir)
        .and_then(|ring| ring.checkpoint_key())
        .map_err(|e| format!("cannot check the audit checkpoint: {e}"))?;
    checkpoint
        .verify(&key.public())
        .map_err(|e| format!("TAMPERED: {e}"))?;
    Ok(Some(checkpoint))
}

/// The whole trail, the store's head and its generation.
async fn read_audit_store(
    config: &BrokerConfig,
) -> Result<
    (
        Vec<capgate::containment::audit::AuditRecord>,
        u64,
        Option<String>,
    ),
    String,
> {
    let store = capgate::store::open(config)
        .await
        .map_err(|e| e.to_string())?;
    let head = store.audit_head().await.map_err(|e| e.to_string())?;
    let generation = store.generation().await.map_err(|e| e.to_string())?;
    let mut records = Vec::new();
    loop {
        let since = records
            .last()
            .map(|r: &capgate::containment::audit::AuditRecord| r.seq)
            .unwrap_or(0);
        let page = store
            .audit_since(since, 5000)
            .await
            .map_err(|e| e.to_string())?;
        if page.is_empty() {
            break;
        }
        records.extend(page);
    }
    Ok((records, head, generation))
}

pub async fn audit_command(command: AuditCommand) -> CliResult {
    match command {
        AuditCommand::Verify { config, file } => {
            let config = load_config(&config)?;
            // The store's generation, when checking the store (`Some(None)`: it has none).
            let (records, head, generation) = match file {
                Some(path) => (read_audit_file(&path)?, None, None),
                None => {
                    let (records, head, generation) = read_audit_store(&config).await?;
                    (records, Some(head), Some(generation))
                }
            };
            let mut problems = capgate::containment::audit::verify(&records, head)
                .err()
                .unwrap_or_default();
            let anchored = match signed_checkpoint(&config)? {
                None => {
                    println!(
                        "warning: no signed checkpoint in {}: removal of the newest records \
                         cannot be detected",
                        config.data_dir.display()
                    );
                    None
                }
                Some(checkpoint) => {
                    if let Some(found) =
                        generation.filter(|g| g.as_deref() != Some(checkpoint.generation.as_str()))
                    {
                        println!(
                            "TAMPERED: the store's generation is {}, the signed checkpoint's is \
                             {}: the store was emptied or replaced",
                            found.as_deref().unwrap_or("none"),
                            checkpoint.generation
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                    if let Err(tamper) = checkpoint.check(&records) {
                        problems.push(tamper);
                    }
                    Some(checkpoint.seq)
                }
            };
            if problems.is_empty() {
                match anchored {
                    Some(seq) => println!(
                        "audit trail intact: {} records, up to the signed checkpoint at record {seq}",
                        records.len()
                    ),
                    None => println!("audit trail intact: {} records", records.len()),
                }
                Ok(ExitCode::SUCCESS)
            } else {
                for problem in problems {
                    println!("TAMPERED: {problem}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        AuditCommand::Tail {
            config,
            agent,
            kind,
            n,
            follow,
            interval,
        } => {
            let config = load_config(&config)?;
            let filter = TailFilter { agent, kind };
            let store = capgate::store::open(&config)
                .await
                .map_err(|e| e.to_string())?;
            let mut last = tail_newest(store.as_ref(), &filter, n).await?;
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            let interval: Duration = interval.into();
            let streaming = async {
                loop {
                    tokio::time::sleep(interval).await;
                    let page = match store.audit_since(last, 1000).await {
                        Ok(page) => page,
                        Err(e) => return Err::<ExitCode, String>(e.to_string()),
                    };
                    for record in &page {
                        last = last.max(record.seq);
                        if filter.matches(record) {
                            print_audit_record(record)?;
                        }
                    }
                }
            };
            tokio::select! {
                result = streaming => result,
                _ = shutdown_signal() => Ok(ExitCode::SUCCESS),
            }
        }
        AuditCommand::Export(config) => {
            let config = load_config(&config)?;
            let (records, _, _) = read_audit_store(&config).await?;
            for record in records {
                println!(
                    "{}",
                    serde_json::to_string(&record).map_err(|e| e.to_string())?
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `audit tail` shows; no field set shows everything.
struct TailFilter {
    agent: Option<String>,
    kind: Option<String>,
}

impl TailFilter {
    fn matches(&self, record: &capgate::containment::audit::AuditRecord) -> bool {
        let kind = format!("{:?}", record.event.kind).to_lowercase();
        self.agent
            .as_deref()
            .is_none_or(|agent| record.event.actor.as_deref() == Some(agent))
            && self.kind.as_deref().is_none_or(|k| k == kind)
    }

    fn is_empty(&self) -> bool {
        self.agent.is_none() && self.kind.is_none()
    }
}

/// Prints the newest `n` matching records, oldest first, and returns the store's head (what
/// `--follow` continues from). Without a filter only the last `n` records are read.
async fn tail_newest(
    store: &dyn capgate::store::Store,
    filter: &TailFilter,
    n: usize,
) -> Result<u64, String> {
    let head = store.audit_head().await.map_err(|e| e.to_string())?;
    let mut newest = std::collections::VecDeque::with_capacity(n.min(10_000));
    let mut since = if filter.is_empty() {
        head.saturating_sub(n as u64)
    } else {
        0
    };
    while since < head && n > 0 {
        let page = store
            .audit_since(since, 5000)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = page.last().map(|r| r.seq) else {
            break;
        };
        since = last;
        for record in page.into_iter().filter(|r| r.seq <= head) {
            if filter.matches(&record) {
                if newest.len() == n {
                    newest.pop_front();
                }
                newest.push_back(record);
            }
        }
    }
    for record in &newest {
        print_audit_record(record)?;
    }
    Ok(head)
}

fn print_audit_record(record: &capgate::containment::audit::AuditRecord) -> Result<(), String> {
    use std::io::Write;
    let at = capgate::token::rfc3339(capgate::token::from_unix_seconds(record.at));
    let detail = &record.event.detail;
    let what = match record.event.kind {
        capgate::containment::audit::AuditKind::Decision => format!(
            "{} {} {} -> {}",
            detail["adapter"].as_str().unwrap_or("?"),
            detail["verb"].as_str().unwrap_or("?"),
            detail["resource"]
                .as_str()
                .unwrap_or(detail["event"].as_str().unwrap_or("?")),
            detail["outcome"]["code"]
                .as_str()
                .or(detail["outcome"]["decision"].as_str())
                .unwrap_or("?")
        ),
        _ => detail.to_string(),
    };
    let mut out = std::io::stdout().lock();
    // Flushed per record so `--follow` piped into another program streams.
    writeln!(
        out,
        "{at}  #{:<6} {:<10} {:<12} {what}",
        record.seq,
        format!("{:?}", record.event.kind).to_lowercase(),
        record.event.actor.as_deref().unwrap_or("-"),
    )
    .and_then(|()| out.flush())
    .map_err(|e| format!("cannot write: {e}"))
}
