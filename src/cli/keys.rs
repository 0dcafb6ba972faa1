//! `capgate keygen` and `capgate keys`: the root signing keys in the data directory.

use std::process::ExitCode;
use std::time::SystemTime;

use capgate::token::Keyring;
use clap::Subcommand;

use super::common::*;

#[derive(Subcommand)]
pub enum KeysCommand {
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

pub fn keygen(args: ConfigArg) -> CliResult {
    let config = load_config(&args)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| e.to_string())?;
    let (ring, created) = Keyring::open_or_create(&config.data_dir).map_err(|e| e.to_string())?;
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

pub fn keys_command(command: KeysCommand) -> CliResult {
    match command {
        KeysCommand::Rotate {
            config,
            verify_old_until,
        } => {
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
        KeysCommand::List(args) => {
            let config = load_config(&args)?;
            let ring = Keyring::open(&config.data_dir).map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::to_string_pretty(ring.document()).map_err(|e| e.to_string())?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
