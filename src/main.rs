//! The `capgate` command line: parse, call the library, print. Logs go to stderr so that
//! `export CAPGATE_TOKEN=$(capgate token request ...)` captures only the token. Each command
//! group lives in its own file under `cli/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use cli::audit::AuditCommand;
use cli::common::{CliResult, ConfigArg, OperatorArgs};
use cli::keys::KeysCommand;
use cli::operator::{ApprovalsCommand, RevokeArgs};
use cli::policy::PolicyCommand;
use cli::proxy::ProxyCommand;
use cli::serve::AcceptArgs;
use cli::token::TokenCommand;

/// The proxies allocate per message and per decision on every core; glibc's allocator spent
/// about 15% of the PostgreSQL proxy's time under pgbench, mimalloc a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

async fn run(command: Command) -> CliResult {
    match command {
        Command::Serve {
            config,
            store,
            accept,
        } => cli::serve::serve(config, store, accept).await,
        Command::Keygen(args) => cli::keys::keygen(args),
        Command::Keys(command) => cli::keys::keys_command(command),
        Command::Token(command) => cli::token::token_command(command).await,
        Command::Policy(command) => cli::policy::policy_command(command).await,
        Command::Revoke(args) => cli::operator::revoke(args).await,
        Command::Approvals { command, operator } => {
            cli::operator::approvals(command, operator).await
        }
        Command::Freeze { state, operator } => cli::operator::freeze(state, operator).await,
        Command::Audit { command } => cli::audit::audit_command(command).await,
        Command::Proxy(command) => cli::proxy::proxy_command(command).await,
        Command::ApiKey { agent } => cli::operator::api_key(agent),
        Command::OperatorKey { name } => cli::operator::operator_key(name),
    }
}
