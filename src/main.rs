//! The `capgate` command line: parse, call the library, print. Logs go to stderr so that
//! `export CAPGATE_TOKEN=$(capgate token request ...)` captures only the token.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, Parser, Subcommand};

/// The proxies allocate per message and per decision on every core; glibc's allocator spent
/// about 15% of the PostgreSQL proxy's time under pgbench, mimalloc a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use capgate::client::Client;
use capgate::config::BrokerConfig;
use capgate::guard::{Guard, GuardConfig, Request};
use capgate::identity::{new_key, AGENT_KEY_PREFIX, OPERATOR_KEY_PREFIX};
use capgate::policy::{run_cases, CaseOutcome, GrantEvaluator, PolicySet};
use capgate::revocation::RevocationView;
use capgate::scope::{ResourcePattern, Scope, Verb};
use capgate::store::RevocationKind;
use capgate::token::{attenuate, inspect, Attenuation, Keyring, PublicKeySet};

const DEFAULT_CONFIG: &str = "capgate.toml";

#[derive(Parser)]
#[command(
    name = "capgate",
    version,
    about = "Capability-token permission broker for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArg {
    /// Broker configuration file (defaults apply when ./capgate.toml does not exist).
    #[arg(long, short, env = "CAPGATE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (creates the root key on first start).
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Shared state on Redis (redis://host:port/db) instead of the embedded SQLite store.
        #[arg(long)]
        store: Option<String>,
        #[command(flatten)]
        accept: AcceptArgs,
    },
    /// Create the root signing key in the data directory if there is none.
    Keygen(ConfigArg),
    /// Root key management.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Request, inspect and attenuate tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check, test and explain policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Revoke a token, a session or every token of an agent (operator).
    Revoke(RevokeArgs),
    /// List, approve, deny or cancel approval requests (operator).
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Emergency brake: deny every non-read verb at every adapter (operator).
    Freeze {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Verify, tail or export the hash-chained audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run an adapter in front of real infrastructure.
    #[command(subcommand)]
    Proxy(ProxyCommand),
    /// Create a new agent API key and print its configuration entry.
    ApiKey {
        #[arg(long)]
        agent: String,
    },
    /// Create a new operator key and print its configuration entry.
    OperatorKey {
        #[arg(long)]
        name: String,
    },
}

/// Risks an operator accepts for this start, after looking at why the broker refused.
#[derive(Args)]
struct AcceptArgs {
    /// Start on a Redis without persistence (no AOF, no RDB snapshots).
    #[arg(long)]
    accept_volatile_store: bool,
    /// Start on a store whose generation is not the one the data directory's audit
    /// checkpoint names (emptied or replaced): it becomes a new generation.
    #[arg(long)]
    accept_store_loss: bool,
    /// Start although the audit trail is behind, or disagrees with, the signed checkpoint.
    #[arg(long)]
    accept_audit_rollback: bool,
}

#[derive(Args)]
struct OperatorArgs {
    #[arg(long, env = "CAPGATE_BROKER", default_value = "http://127.0.0.1:8080")]
    broker: String,
    #[arg(long, env = "CAPGATE_OPERATOR_KEY", hide_env_values = true)]
    operator_key: String,
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// Every request with the exact operation (method, path, body digest or SQL).
    List,
    Approve {
        id: String,
    },
    Deny {
        id: String,
    },
    /// Cancel a pending or approved (staged) operation.
    Cancel {
        id: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
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

#[derive(Subcommand)]
enum ProxyCommand {
    /// Reverse proxy for an HTTP API: route table, guard, credential injection.
    Http {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// PostgreSQL wire-protocol proxy: every statement classified and checked.
    Pg {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// MCP gateway: every tool call decided on its arguments by the agent's token.
    Mcp {
        #[arg(long, short)]
        config: PathBuf,
        /// Serve one session on stdin/stdout in front of this (command) server instead of
        /// listening on HTTP; the token comes from CAPGATE_TOKEN.
        #[arg(long)]
        stdio: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new key active; the old one keeps verifying until the given date.
    Rotate {
        #[command(flatten)]
        config: ConfigArg,
        /// RFC 3339 date until which the old key still verifies (default: now + max token TTL).
        #[arg(long)]
        verify_old_until: Option<String>,
    },
    /// Print the published key set.
    List(ConfigArg),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Ask the broker for a token and print it (for `export CAPGATE_TOKEN=$(...)`).
    Request {
        #[arg(long, env = "CAPGATE_BROKER", default_value = "http://127.0.0.1:8080")]
        broker: String,
        /// RESOURCE:VERB, e.g. pg://staging/:write. Repeatable.
        #[arg(long = "scope", required = true)]
        scopes: Vec<Scope>,
        /// Lifetime, e.g. 5m (capped by policy).
        #[arg(long)]
        ttl: Option<humantime::Duration>,
        /// Usable this many times in all, across adapters (1 = one-shot).
        #[arg(long)]
        max_uses: Option<u64>,
        /// Agent credential: an API key (cgk_…) or an identity JWT.
        #[arg(long, env = "CAPGATE_CREDENTIAL", hide_env_values = true)]
        credential: String,
    },
    /// Show a token's blocks, facts, checks, expiry, key id and revocation ids.
    Inspect {
        /// The token (reads stdin when absent).
        token: Option<String>,
        /// Verify the signature against this broker's published keys.
        #[arg(long)]
        broker: Option<String>,
        /// Verify against the keys in this configuration's data directory.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Append a block that narrows resource, verbs or lifetime. Needs no key.
    Attenuate {
        token: Option<String>,
        #[arg(long)]
        resource: Option<ResourcePattern>,
        #[arg(long = "verb")]
        verbs: Vec<Verb>,
        #[arg(long)]
        ttl: Option<humantime::Duration>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse every grant and adapter policy; exit non-zero on any error.
    Check(ConfigArg),
    /// Run the cases in policies/tests/ and exit non-zero on any mismatch.
    Test {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        cases: Option<PathBuf>,
    },
    /// Re-evaluate recorded decisions against candidate adapter policies; list what flips.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        audit: PathBuf,
        #[arg(long)]
        policies: PathBuf,
    },
    /// Explain offline whether a token may do VERB on RESOURCE, and why.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        resource: ResourcePattern,
        #[arg(long)]
        verb: Verb,
    },
}

#[derive(Args)]
struct RevokeArgs {
    #[arg(long, env = "CAPGATE_BROKER", default_value = "http://127.0.0.1:8080")]
    broker: String,
    #[arg(long, env = "CAPGATE_OPERATOR_KEY", hide_env_values = true)]
    operator_key: String,
    #[arg(long, group = "target")]
    agent: Option<String>,
    #[arg(long, group = "target")]
    session: Option<String>,
    /// A biscuit revocation id (hex), as shown by `capgate token inspect`.
    #[arg(long, group = "target")]
    token_id: Option<String>,
    #[arg(long, default_value = "")]
    reason: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<ExitCode, String>;

async fn run(command: Command) -> CliResult {
    match command {
        Command::Serve {
            config,
            store,
            accept,
        } => {
            let mut config = load_config(&config)?;
            if let Some(url) = store {
                config.store.redis = Some(url);
            }
            config.store.accept_volatile |= accept.accept_volatile_store;
            config.overrides = capgate::config::StartOverrides {
                accept_store_loss: accept.accept_store_loss,
                accept_audit_rollback: accept.accept_audit_rollback,
            };
            capgate::broker::serve(config, shutdown_signal())
                .await
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen(args) => {
            let config = load_config(&args)?;
            std::fs::create_dir_all(&config.data_dir).map_err(|e| e.to_string())?;
            let (ring, created) =
                Keyring::open_or_create(&config.data_dir).map_err(|e| e.to_string())?;
            let verb = if created {
                "created"
            } else {
                "already present"
            };
            println!(
                "root key {} {verb} in {}",
                ring.active_key_id(),
                config.data_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCommand::Rotate {
            config,
            verify_old_until,
        }) => {
            let config = load_config(&config)?;
            let until = match verify_old_until {
                Some(date) => humantime::parse_rfc3339_weak(&date)
                    .map_err(|e| format!("--verify-old-until: {e}"))?,
                None => SystemTime::now()
                    .checked_add(config.tokens.max_ttl)
                    .ok_or("tokens.max_ttl is out of range")?,
            };
            let ring = Keyring::rotate(&config.data_dir, until).map_err(|e| e.to_string())?;
            println!(
                "active root key is now {}; the previous key verifies until {}",
                ring.active_key_id(),
                capgate::token::rfc3339(until)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCommand::List(args)) => {
            let config = load_config(&args)?;
            let ring = Keyring::open(&config.data_dir).map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::to_string_pretty(ring.document()).map_err(|e| e.to_string())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(command) => token_command(command).await,
        Command::Approvals { command, operator } => {
            let client = Client::new(&operator.broker).map_err(|e| e.to_string())?;
            let key = &operator.operator_key;
            let result = match command {
                ApprovalsCommand::List => {
                    let approvals = client.approvals(key).await.map_err(|e| e.to_string())?;
                    for a in approvals {
                        println!(
                            "{}  {:?}  {} wants {} on {} via {}  approvers: [{}] of {}",
                            a.id,
                            a.status,
                            a.agent,
                            a.operation.verb,
                            a.operation.resource,
                            a.operation.adapter,
                            a.approvers.join(", "),
                            a.required
                        );
                        for (k, v) in &a.operation.detail {
                            println!("    {k}: {v}");
                        }
                        if let Some(preview) = &a.preview {
                            println!("    preview: {} (measured by {})", preview.text, preview.by);
                        }
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                ApprovalsCommand::Approve { id } => {
                    client.decide_approval(key, &id, "approve").await
                }
                ApprovalsCommand::Deny { id } => client.decide_approval(key, &id, "deny").await,
                ApprovalsCommand::Cancel { id } => client.decide_approval(key, &id, "cancel").await,
            };
            let approval = result.map_err(|e| e.to_string())?;
            println!("approval {} is now {:?}", approval.id, approval.status);
            Ok(ExitCode::SUCCESS)
        }
        Command::Freeze { state, operator } => {
            let client = Client::new(&operator.broker).map_err(|e| e.to_string())?;
            let frozen = client
                .set_freeze(&operator.operator_key, state == "on")
                .await
                .map_err(|e| e.to_string())?;
            println!("frozen: {}", frozen.frozen);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command } => audit_command(command).await,
        Command::Proxy(ProxyCommand::Pg { config }) => proxy_pg(&config).await,
        Command::Proxy(ProxyCommand::Http { config }) => {
            let config =
                capgate::adapters::http::ProxyConfig::load(&config).map_err(|e| e.to_string())?;
            capgate::adapters::http::serve(config, shutdown_signal())
                .await
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Proxy(ProxyCommand::Mcp { config, stdio }) => {
            let config =
                capgate::adapters::mcp::McpConfig::load(&config).map_err(|e| e.to_string())?;
            match stdio {
                Some(server) => tokio::select! {
                    result = capgate::adapters::mcp::serve_stdio(config, &server) => result.map_err(|e| e.to_string())?,
                    _ = shutdown_signal() => {}
                },
                None => capgate::adapters::mcp::serve(config, shutdown_signal())
                    .await
                    .map_err(|e| e.to_string())?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(command) => policy_command(command).await,
        Command::Revoke(args) => {
            let (kind, value) = match (args.agent, args.session, args.token_id) {
                (Some(agent), None, None) => (RevocationKind::Agent, agent),
                (None, Some(session), None) => (RevocationKind::Session, session),
                (None, None, Some(id)) => (RevocationKind::Token, id),
                _ => return Err("give exactly one of --agent, --session, --token-id".into()),
            };
            let client = Client::new(&args.broker).map_err(|e| e.to_string())?;
            let entry = client
                .revoke(&args.operator_key, kind, &value, &args.reason)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "revoked {} {} (cursor {})",
                entry.kind.as_str(),
                entry.value,
                entry.cursor
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::ApiKey { agent } => {
            capgate::identity::validate_agent_name(&agent).map_err(|e| e.to_string())?;
            let (key, hash) = new_key(AGENT_KEY_PREFIX);
            println!("# give this key to the agent (shown once):\n# {key}\n[[identity.api_keys]]\nagent = {agent:?}\nsha256 = \"{hash}\"");
            Ok(ExitCode::SUCCESS)
        }
        Command::OperatorKey { name } => {
            let (key, hash) = new_key(OPERATOR_KEY_PREFIX);
            println!("# give this key to the operator (shown once):\n# {key}\n[[operators]]\nname = {name:?}\nsha256 = \"{hash}\"");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn token_command(command: TokenCommand) -> CliResult {
    match command {
        TokenCommand::Request {
            broker,
            scopes,
            ttl,
            max_uses,
            credential,
        } => {
            let client = Client::new(&broker).map_err(|e| e.to_string())?;
            match client
                .request_token_with_uses(&credential, &scopes, ttl.map(Into::into), max_uses)
                .await
            {
                Ok(issued) => {
                    println!("{}", issued.token);
                    Ok(ExitCode::SUCCESS)
                }
                Err(capgate::client::ClientError::Refused {
                    code,
                    detail,
                    refused,
                    ..
                }) => {
                    eprintln!("error: broker refused ({code}): {detail}");
                    for line in refused {
                        eprintln!("  refused {line}");
                    }
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e.to_string()),
            }
        }
        TokenCommand::Inspect {
            token,
            broker,
            config,
            json,
        } => {
            let token = token_arg(token)?;
            let keys = match (broker, config) {
                (Some(broker), _) => {
                    let document = Client::new(&broker)
                        .map_err(|e| e.to_string())?
                        .keys()
                        .await
                        .map_err(|e| e.to_string())?;
                    Some(PublicKeySet::from_document(&document)?)
                }
                (None, Some(path)) => {
                    let config = BrokerConfig::load(&path).map_err(|e| e.to_string())?;
                    let ring = Keyring::open(&config.data_dir).map_err(|e| e.to_string())?;
                    Some(ring.public_keys().map_err(|e| e.to_string())?)
                }
                (None, None) => None,
            };
            let inspection = inspect(&token, keys.as_ref()).map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&inspection).map_err(|e| e.to_string())?
                );
            } else {
                print!("{inspection}");
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Attenuate {
            token,
            resource,
            verbs,
            ttl,
        } => {
            let token = token_arg(token)?;
            let expires_at = ttl
                .map(|t| {
                    SystemTime::now()
                        .checked_add(t.into())
                        .ok_or("--ttl is out of range")
                })
                .transpose()?;
            let narrowing = Attenuation {
                resource,
                verbs,
                expires_at,
            };
            println!(
                "{}",
                attenuate(&token, &narrowing).map_err(|e| e.to_string())?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn policy_command(command: PolicyCommand) -> CliResult {
    match command {
        PolicyCommand::Check(args) => {
            let config = load_config(&args)?;
            for dir in [&config.policies, &config.adapter_policies] {
                let set = PolicySet::load_dir(dir).map_err(|e| e.to_string())?;
                for file in set.files() {
                    println!("ok  {}", file.path.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test { config, cases } => {
            let config = load_config(&config)?;
            let cases = cases.unwrap_or_else(|| config.policies.join("tests"));
            let policy = PolicySet::load_dir(&config.policies).map_err(|e| e.to_string())?;
            let evaluator = GrantEvaluator::new(policy, config.grant_settings());
            let reports = run_cases(&cases, &evaluator)?;
            let mut failed = 0;
            for report in &reports {
                match &report.outcome {
                    CaseOutcome::Pass => {
                        println!("PASS {}: {}", report.file.display(), report.name)
                    }
                    CaseOutcome::Fail(why) => {
                        failed += 1;
                        println!(
                            "FAIL {}: {}\n     {why}",
                            report.file.display(),
                            report.name
                        );
                    }
                }
            }
            println!("{} passed, {} failed", reports.len() - failed, failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PolicyCommand::Replay {
            config,
            audit,
            policies,
        } => {
            let config = load_config(&config)?;
            let records = read_audit_file(&audit)?;
            let policy = PolicySet::load_dir(&policies).map_err(|e| e.to_string())?;
            let report = capgate::containment::replay::replay(&records, &policy, &config.datalog)
                .map_err(|e| e.to_string())?;
            for change in &report.changes {
                println!(
                    "record {} decision {}: {} {} {} was {}, would be {}",
                    change.seq,
                    change.decision_id,
                    change.agent.as_deref().unwrap_or("?"),
                    change.verb,
                    change.resource,
                    if change.recorded_allowed {
                        "allowed"
                    } else {
                        "denied"
                    },
                    if change.replayed_allowed {
                        "allowed"
                    } else {
                        "denied"
                    },
                );
            }
            println!(
                "{} decisions replayed, {} skipped, {} would change",
                report.replayed,
                report.skipped,
                report.changes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain {
            config,
            token,
            resource,
            verb,
        } => {
            let config = load_config(&config)?;
            let token = token_arg(token)?;
            let environment = config
                .environment_of(&resource)
                .ok_or("resource belongs to no configured environment")?
                .to_owned();
            let guard = offline_guard(&config).await?;
            let decision = guard.decide(
                &token,
                &Request {
                    resource: resource.to_string(),
                    verb,
                    environment,
                    attributes: vec![],
                },
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&decision).map_err(|e| e.to_string())?
            );
            Ok(if decision.is_allow() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn read_audit_file(path: &Path) -> Result<Vec<capgate::containment::audit::AuditRecord>, String> {
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

async fn audit_command(command: AuditCommand) -> CliResult {
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

/// A guard over the data directory's keys and stored revocations, for offline explanations.
async fn offline_guard(config: &BrokerConfig) -> Result<Guard, String> {
    let ring = Keyring::open(&config.data_dir).map_err(|e| e.to_string())?;
    let keys = Arc::new(std::sync::RwLock::new(Arc::new(
        ring.public_keys().map_err(|e| e.to_string())?,
    )));
    let view = Arc::new(RevocationView::new());
    if config.store.redis.is_some() || config.data_dir.join("state.db").exists() {
        let store = capgate::store::open(config)
            .await
            .map_err(|e| e.to_string())?;
        let entries = store
            .revocations_since(0, usize::MAX >> 1)
            .await
            .map_err(|e| e.to_string())?;
        view.apply(&entries, Instant::now());
    } else {
        view.apply(&[], Instant::now());
    }
    let policy = PolicySet::load_dir(&config.adapter_policies).map_err(|e| e.to_string())?;
    let containment = Arc::new(capgate::guard::ContainmentView::new());
    containment.set_document(capgate::containment::ContainmentDocument::new(
        &config.containment,
        &ring.approval_key().public(),
    ))?;
    Ok(Guard::new(
        GuardConfig {
            adapter: "policy-explain".into(),
            max_token_bytes: config.tokens.max_token_bytes,
            max_staleness: Duration::from_secs(60),
            limits: config.datalog.clone(),
            cache_capacity: 0,
        },
        keys,
        view,
        policy,
    )
    .with_containment(containment))
}

fn load_config(args: &ConfigArg) -> Result<BrokerConfig, String> {
    match &args.config {
        Some(path) => BrokerConfig::load(path).map_err(|e| e.to_string()),
        None if Path::new(DEFAULT_CONFIG).exists() => {
            BrokerConfig::load(Path::new(DEFAULT_CONFIG)).map_err(|e| e.to_string())
        }
        None => Ok(BrokerConfig::default()),
    }
}

fn token_arg(token: Option<String>) -> Result<String, String> {
    match token {
        Some(token) if token != "-" => Ok(token),
        _ => {
            let mut text = String::new();
            std::io::stdin()
                .take(1 << 20)
                .read_to_string(&mut text)
                .map_err(|e| format!("reading token from stdin: {e}"))?;
            Ok(text.trim().to_owned())
        }
    }
}

#[cfg(feature = "pg")]
async fn proxy_pg(config: &std::path::Path) -> Result<ExitCode, String> {
    let config = capgate::adapters::pg::PgProxyConfig::load(config).map_err(|e| e.to_string())?;
    tokio::select! {
        result = capgate::adapters::pg::serve(config) => result.map_err(|e| e.to_string())?,
        _ = shutdown_signal() => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// The PostgreSQL adapter is a build feature (pg_query needs libclang); say so rather than
/// pretend the command does not exist.
#[cfg(not(feature = "pg"))]
async fn proxy_pg(_config: &std::path::Path) -> Result<ExitCode, String> {
    Err(
        "this capgate was built without the PostgreSQL adapter: rebuild with \
         `cargo build --release --features pg` (needs libclang: apt-get install libclang-dev)"
            .into(),
    )
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
