//! `capgate token`: request, inspect and attenuate tokens.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use capgate::client::Client;
use capgate::config::BrokerConfig;
use capgate::scope::{ResourcePattern, Scope, Verb};
use capgate::token::{attenuate, inspect, Attenuation, Keyring, PublicKeySet};
use clap::Subcommand;

use super::common::*;

#[derive(Subcommand)]
pub enum TokenCommand {
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

pub async fn token_command(command: TokenCommand) -> CliResult {
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
