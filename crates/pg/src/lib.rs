//! `capgate proxy pg`: a PostgreSQL wire-protocol proxy. Agents log in with their Capgate
//! token as the password; the proxy connects upstream with the real credential, classifies
//! every statement with PostgreSQL's own parser and asks the guard about each access.
//! Sessions whose token grants no change to the database run upstream with
//! `default_transaction_read_only=on`, so PostgreSQL itself refuses a misjudged write.

pub mod classify;
mod names;
mod parameters;
mod preview;
mod resource;
mod session;
mod upstream;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpListener;

use capgate_core::guard::{ContainmentView, Guard, GuardConfig, KeyView, Ledger};
use capgate_core::policy::PolicySet;
use capgate_core::revocation::RevocationView;
use capgate_core::settings::{duration, RunLimits};
use capgate_core::token::VerifiedToken;
use capgate_net::connections::{accept_backoff, Tracker};

#[derive(Debug, thiserror::Error)]
pub enum PgProxyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Policy(#[from] capgate_core::policy::PolicyError),
    #[error(transparent)]
    Client(#[from] capgate_client::ClientError),
    #[error(transparent)]
    Runtime(#[from] capgate_adapters::runtime::RuntimeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Credential(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgUpstreamConfig {
    /// host:port of the real PostgreSQL.
    pub addr: String,
    pub database: String,
    pub user: String,
    /// Environment variable with the upstream password (md5, SCRAM or cleartext, as asked).
    #[serde(default)]
    pub password_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgProxyConfig {
    pub listen: SocketAddr,
    pub broker: String,
    pub environment: String,
    /// The database alias: clients must name it, and resources are `pg://<alias>/schema.table`.
    pub database: String,
    #[serde(default = "PgProxyConfig::default_name")]
    pub name: String,
    #[serde(default = "capgate_core::settings::default_adapter_policies")]
    pub adapter_policies: PathBuf,
    #[serde(
        default = "capgate_core::settings::default_max_staleness",
        deserialize_with = "duration"
    )]
    pub max_staleness: Duration,
    #[serde(default)]
    pub datalog: RunLimits,
    #[serde(default = "PgProxyConfig::default_schema")]
    pub default_schema: String,
    #[serde(default = "PgProxyConfig::default_max_frame")]
    pub max_frame_bytes: usize,
    #[serde(default)]
    pub allow_non_loopback_plaintext: bool,
    #[serde(default)]
    pub adapter_key_env: Option<String>,
    #[serde(default = "PgProxyConfig::default_spool")]
    pub audit_spool: PathBuf,
    /// Serve Prometheus `/metrics` on this address (never on the PostgreSQL listener).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    pub upstream: PgUpstreamConfig,
    /// Startup and idle timeouts and the connection cap (`[connections]`).
    #[serde(default)]
    pub connections: capgate_net::connections::ConnectionLimits,
}

impl PgProxyConfig {
    fn default_name() -> String {
        "pg-proxy".into()
    }
    fn default_schema() -> String {
        "public".into()
    }
    fn default_max_frame() -> usize {
        1 << 20
    }
    fn default_spool() -> PathBuf {
        PathBuf::from("capgate-pg-audit-spool.jsonl")
    }

    pub fn load(path: &Path) -> Result<Self, PgProxyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PgProxyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: PgProxyConfig =
            toml::from_str(&text).map_err(|e| PgProxyError::Config {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.adapter_policies, &mut config.audit_spool] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }
}

pub struct PgProxy {
    config: PgProxyConfig,
    guard: Arc<Guard>,
    ledger: Arc<dyn Ledger>,
    limits: classify::Limits,
    upstream_password: Option<String>,
    /// Client-facing cancel keys minted here -> the real backend's key.
    cancels: Mutex<HashMap<(i32, i32), (i32, i32)>>,
}

impl PgProxy {
    pub fn new(
        config: PgProxyConfig,
        keys: KeyView,
        revocations: Arc<RevocationView>,
        containment: Arc<ContainmentView>,
        ledger: Arc<dyn Ledger>,
    ) -> Result<Self, PgProxyError> {
        let policy = PolicySet::load_dir(&config.adapter_policies)?;
        let upstream_password = match &config.upstream.password_env {
            Some(var) => Some(
                std::env::var(var)
                    .map_err(|_| PgProxyError::Credential(format!("{var} is not set")))?,
            ),
            None => None,
        };
        let guard = Guard::new(
            GuardConfig {
                adapter: config.name.clone(),
                max_token_bytes: 16 * 1024,
                max_staleness: config.max_staleness,
                limits: config.datalog.clone(),
                cache_capacity: 10_000,
            },
            keys,
            revocations,
            policy,
        )
        .with_containment(containment);
        Ok(PgProxy {
            config,
            guard: Arc::new(guard),
            ledger,
            limits: classify::Limits::default(),
            upstream_password,
            cancels: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts sessions for as long as the process runs. At the connection cap the
    /// connection longest in startup is shed for a newcomer (a flood of half-open logins
    /// cannot lock out a real client); logged-in sessions are never shed.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limits = &self.config.connections;
        // Two descriptors per session: the client's and its upstream connection.
        let tracker = Tracker::new(limits.cap(2));
        tracing::info!(
            max_connections = tracker.cap(),
            startup_timeout = ?limits.startup_timeout,
            "connection limits"
        );
        let mut failures = 0u32;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => {
                    failures = 0;
                    accepted
                }
                Err(e) => {
                    accept_backoff(&e, &mut failures).await;
                    continue;
                }
            };
            let Some(admission) = tracker.admit() else {
                tracing::warn!(%peer, "connection cap reached with every session logged in: refused");
                continue;
            };
            let proxy = self.clone();
            tokio::spawn(async move {
                let activity = admission.activity.clone();
                tokio::select! {
                    ended = session::run(stream, peer, proxy, activity.clone()) => {
                        if let Err(e) = ended {
                            tracing::debug!(%peer, error = %e, "pg session ended");
                        }
                    }
                    () = activity.shed() => {
                        tracing::debug!(%peer, "connection in startup shed at the cap");
                    }
                }
                drop(admission);
            });
        }
    }

    /// Does the token grant anything but `read` inside this database?
    fn token_may_change_database(&self, verified: &VerifiedToken) -> bool {
        let alias = resource::resource(&self.config.database, &classify::Object::Database);
        verified.grants_within(&alias, session::changes_database)
    }

    /// The token's `row_budget(n)`, if its authority block states one.
    fn row_budget_of(&self, token: &str) -> Option<u64> {
        self.guard.verify_token(token).ok()?.row_budget()
    }

    fn register_cancel(&self, real: Option<(i32, i32)>) -> (i32, i32) {
        let mut bytes = [0u8; 8];
        let _ = getrandom::getrandom(&mut bytes);
        let minted = (
            i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) & i32::MAX,
            i32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        );
        if let (Some(real), Ok(mut cancels)) = (real, self.cancels.lock()) {
            cancels.insert(minted, real);
        }
        minted
    }

    fn unregister_cancel(&self, minted: (i32, i32)) {
        if let Ok(mut cancels) = self.cancels.lock() {
            cancels.remove(&minted);
        }
    }

    /// A cancel carrying a key this proxy minted reaches the real backend; any other is dropped.
    async fn forward_cancel(&self, pid: i32, secret: i32) {
        let real = self
            .cancels
            .lock()
            .ok()
            .and_then(|c| c.get(&(pid, secret)).copied());
        match real {
            Some((real_pid, real_secret)) => {
                if let Err(e) =
                    upstream::cancel(&self.config.upstream.addr, real_pid, real_secret).await
                {
                    tracing::warn!(error = %e, "cancel could not be forwarded");
                }
            }
            None => tracing::warn!(pid, "cancel request with an unknown key ignored"),
        }
    }
}

/// Runs the PostgreSQL proxy: syncs from the broker and serves until the process ends.
pub async fn serve(config: PgProxyConfig) -> Result<(), PgProxyError> {
    let runtime = capgate_adapters::runtime::AdapterRuntime::start(
        &config.broker,
        config.adapter_key_env.as_deref(),
        config.audit_spool.clone(),
    )?;
    let addr = config.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| PgProxyError::Listen { addr, source })?;
    tracing::info!(%addr, "capgate pg proxy listening");
    let metrics_listen = config.metrics_listen;
    let proxy = Arc::new(PgProxy::new(
        config,
        runtime.keys.clone(),
        runtime.revocations.clone(),
        runtime.containment.clone(),
        runtime.ledger.clone(),
    )?);
    if let Some(addr) = metrics_listen {
        runtime
            .serve_metrics(addr, &proxy.guard)
            .await
            .map_err(|source| PgProxyError::Listen { addr, source })?;
    }
    proxy.serve(listener).await;
    Ok(())
}
