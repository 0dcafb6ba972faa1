//! What every command group shares: the configuration and operator arguments, loading the
//! broker's configuration, the token argument, an offline guard, and the shutdown signal.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capgate::config::BrokerConfig;
use capgate::guard::{Guard, GuardConfig};
use capgate::policy::PolicySet;
use capgate::revocation::RevocationView;
use capgate::token::Keyring;
use clap::Args;

pub const DEFAULT_CONFIG: &str = "capgate.toml";

pub type CliResult = Result<ExitCode, String>;

#[derive(Args, Clone)]
pub struct ConfigArg {
    /// Broker configuration file (defaults apply when ./capgate.toml does not exist).
    #[arg(long, short, env = "CAPGATE_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Args)]
pub struct OperatorArgs {
    #[arg(long, env = "CAPGATE_BROKER", default_value = "http://127.0.0.1:8080")]
    pub broker: String,
    #[arg(long, env = "CAPGATE_OPERATOR_KEY", hide_env_values = true)]
    pub operator_key: String,
}

/// A guard over the data directory's keys and stored revocations, for offline explanations.
pub async fn offline_guard(config: &BrokerConfig) -> Result<Guard, String> {
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

pub fn load_config(args: &ConfigArg) -> Result<BrokerConfig, String> {
    match &args.config {
        Some(path) => BrokerConfig::load(path).map_err(|e| e.to_string()),
        None if Path::new(DEFAULT_CONFIG).exists() => {
            BrokerConfig::load(Path::new(DEFAULT_CONFIG)).map_err(|e| e.to_string())
        }
        None => Ok(BrokerConfig::default()),
    }
}

pub fn token_arg(token: Option<String>) -> Result<String, String> {
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

pub async fn shutdown_signal() {
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
