//! `capgate serve`: the broker, with the risks an operator accepts for this start.

use std::process::ExitCode;

use clap::Args;

use super::common::*;

/// Risks an operator accepts for this start, after looking at why the broker refused.
#[derive(Args)]
pub struct AcceptArgs {
    /// Start on a Redis without persistence (no AOF, no RDB snapshots).
    #[arg(long)]
    pub accept_volatile_store: bool,
    /// Start on a store whose generation is not the one the data directory's audit
    /// checkpoint names (emptied or replaced): it becomes a new generation.
    #[arg(long)]
    pub accept_store_loss: bool,
    /// Start although the audit trail is behind, or disagrees with, the signed checkpoint.
    #[arg(long)]
    pub accept_audit_rollback: bool,
}

pub async fn serve(config: ConfigArg, store: Option<String>, accept: AcceptArgs) -> CliResult {
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
