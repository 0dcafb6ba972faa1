//! `capgate proxy`: run an adapter in front of real infrastructure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::common::*;

#[derive(Subcommand)]
pub enum ProxyCommand {
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

pub async fn proxy_command(command: ProxyCommand) -> CliResult {
    match command {
        ProxyCommand::Pg { config } => proxy_pg(&config).await,
        ProxyCommand::Http { config } => {
            let config =
                capgate::adapters::http::ProxyConfig::load(&config).map_err(|e| e.to_string())?;
            capgate::adapters::http::serve(config, shutdown_signal())
                .await
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        ProxyCommand::Mcp { config, stdio } => {
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
