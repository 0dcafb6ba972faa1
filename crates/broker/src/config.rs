//! The broker's configuration file (TOML): where things live, who may authenticate, which
//! environment each resource belongs to, and the bounds on tokens and Datalog runs.
//!
//! Everything is validated at load; the broker refuses to start on a doubtful configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use capgate_core::scope::ResourcePattern;
pub use capgate_core::settings::{duration, Environment, GrantSettings, RunLimits, TokenSettings};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One trusted JWT issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    pub issuer: String,
    pub audience: String,
    /// A JWKS (JSON) or PEM public key file, relative to the configuration file.
    pub keys: PathBuf,
    /// For a PEM file: RS256, ES256 or EdDSA. A JWKS names its own algorithms.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// The claim that names the agent.
    #[serde(default = "JwtIssuer::default_agent_claim")]
    pub agent_claim: String,
}

impl JwtIssuer {
    fn default_agent_claim() -> String {
        "sub".to_owned()
    }
}

/// An API key, stored only as the SHA-256 of the key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    pub agent: String,
    pub sha256: String,
    /// Extra claims that become `claim($key, $value)` facts.
    #[serde(default)]
    pub claims: toml::Table,
}

/// A human operator (revoke, approve, freeze), authenticated by an operator key hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorEntry {
    pub name: String,
    pub sha256: String,
}

/// What an operator accepts for one start of the broker, after looking (`capgate serve
/// --accept-store-loss`, `--accept-audit-rollback`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartOverrides {
    /// The store's generation differs from the one the data directory's checkpoint names (or
    /// it has none): start on it anyway, as a new generation.
    pub accept_store_loss: bool,
    /// The audit trail is behind, or disagrees with, the signed checkpoint: start anyway.
    pub accept_audit_rollback: bool,
}

/// Where shared state lives. Without `redis`, an embedded SQLite file in the data directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub redis: Option<String>,
    /// Key prefix, so several deployments (or tests) can share one Redis.
    #[serde(default = "StoreConfig::default_prefix")]
    pub prefix: String,
    /// Start on a Redis without persistence anyway (`serve --accept-volatile-store`): a Redis
    /// restart then loses every revocation; the broker notices and denies until recovered.
    #[serde(default)]
    pub accept_volatile: bool,
}

impl StoreConfig {
    fn default_prefix() -> String {
        "capgate:".into()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            redis: None,
            prefix: Self::default_prefix(),
            accept_volatile: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub jwt: Vec<JwtIssuer>,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    #[serde(default = "BrokerConfig::default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "BrokerConfig::default_data_dir")]
    pub data_dir: PathBuf,
    /// Grant policies: every `*.dl` file in this directory.
    #[serde(default = "BrokerConfig::default_policies")]
    pub policies: PathBuf,
    /// Adapter policies used by the dry-run endpoint (the same files adapters load).
    #[serde(default = "capgate_core::settings::default_adapter_policies")]
    pub adapter_policies: PathBuf,
    #[serde(default)]
    pub tokens: TokenSettings,
    #[serde(default)]
    pub datalog: RunLimits,
    #[serde(default)]
    pub environments: Vec<Environment>,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub operators: Vec<OperatorEntry>,
    /// Adapters that report decisions to the audit trail, by key hash.
    #[serde(default)]
    pub adapters: Vec<OperatorEntry>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub containment: capgate_core::containment::ContainmentConfig,
    /// Approval notifications: webhook sinks, the console's public URL, the expiry sweep.
    #[serde(default)]
    pub notifications: crate::server::webhooks::NotificationConfig,
    /// Timeouts and the connection cap (`[connections]`).
    #[serde(default)]
    pub connections: capgate_net::connections::ConnectionLimits,
    /// Where this file was read from; relative paths in it are resolved against its folder.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// One-off operator decisions given on the command line, never in the file.
    #[serde(skip)]
    pub overrides: StartOverrides,
}

impl BrokerConfig {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8080))
    }
    fn default_data_dir() -> PathBuf {
        PathBuf::from("capgate-data")
    }
    fn default_policies() -> PathBuf {
        PathBuf::from("policies")
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: BrokerConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.source = Some(path.to_owned());
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for path in [
            &mut self.data_dir,
            &mut self.policies,
            &mut self.adapter_policies,
        ] {
            *path = resolve(base, path);
        }
        for issuer in &mut self.identity.jwt {
            issuer.keys = resolve(base, &issuer.keys);
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.tokens.default_ttl > self.tokens.max_ttl {
            return Err("tokens.default_ttl is longer than tokens.max_ttl".into());
        }
        if self.tokens.max_ttl.is_zero() {
            return Err("tokens.max_ttl must be positive".into());
        }
        for (i, a) in self.environments.iter().enumerate() {
            if a.name.is_empty() {
                return Err("an environment has an empty name".into());
            }
            for b in &self.environments[i + 1..] {
                if a.name == b.name {
                    return Err(format!("environment {:?} is defined twice", a.name));
                }
                for pa in &a.resources {
                    if let Some(pb) = b.resources.iter().find(|pb| pa.overlaps(pb)) {
                        return Err(format!(
                            "resource {pa} of environment {:?} overlaps {pb} of environment {:?}: every resource must belong to one environment",
                            a.name, b.name
                        ));
                    }
                }
            }
        }
        let agent_hashes = self
            .identity
            .api_keys
            .iter()
            .map(|k| (&k.sha256, "api key"));
        let operator_hashes = self.operators.iter().map(|o| (&o.sha256, "operator key"));
        let adapter_hashes = self.adapters.iter().map(|a| (&a.sha256, "adapter key"));
        let mut seen = std::collections::HashSet::new();
        for (hash, what) in agent_hashes.chain(operator_hashes).chain(adapter_hashes) {
            if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!("{what} sha256 {hash:?} is not 64 hex characters"));
            }
            // An agent credential must never double as an operator credential.
            if !seen.insert(hash.to_ascii_lowercase()) {
                return Err(format!("{what} hash {hash} is configured twice"));
            }
        }
        let containment = &self.containment;
        if !(1..=2).contains(&containment.approvers_required) {
            return Err("containment.approvers_required must be 1 or 2".into());
        }
        for point in &containment.recovery_points {
            if self.environment_of(point).is_none() {
                return Err(format!(
                    "recovery point {point} belongs to no configured environment"
                ));
            }
        }
        for issuer in &self.identity.jwt {
            if issuer.issuer.is_empty() || issuer.audience.is_empty() {
                return Err("identity.jwt entries need an issuer and an audience".into());
            }
        }
        self.notifications.validate()?;
        Ok(())
    }

    /// The configured environment a requested pattern belongs to, if exactly one covers it.
    pub fn environment_of(&self, pattern: &ResourcePattern) -> Option<&str> {
        capgate_core::settings::environment_of(&self.environments, pattern)
    }

    /// What the grant evaluator needs of this file.
    pub fn grant_settings(&self) -> GrantSettings {
        GrantSettings {
            tokens: self.tokens.clone(),
            datalog: self.datalog.clone(),
            environments: self.environments.clone(),
            recovery_points: self.containment.recovery_points.clone(),
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: Self::default_listen(),
            data_dir: Self::default_data_dir(),
            policies: Self::default_policies(),
            adapter_policies: capgate_core::settings::default_adapter_policies(),
            tokens: TokenSettings::default(),
            datalog: RunLimits::default(),
            environments: Vec::new(),
            identity: IdentityConfig::default(),
            operators: Vec::new(),
            adapters: Vec::new(),
            store: StoreConfig::default(),
            containment: capgate_core::containment::ContainmentConfig::default(),
            notifications: Default::default(),
            connections: capgate_net::connections::ConnectionLimits::default(),
            source: None,
            overrides: StartOverrides::default(),
        }
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<BrokerConfig, ConfigError> {
        BrokerConfig::from_toml(text, Path::new("/etc/capgate/capgate.toml"))
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let config = load("data_dir = 'data'\npolicies = '/abs/policies'").expect("config");
        assert_eq!(config.data_dir, PathBuf::from("/etc/capgate/data"));
        assert_eq!(config.policies, PathBuf::from("/abs/policies"));
    }

    #[test]
    fn overlapping_environments_are_refused() {
        let err = load(
            "[[environments]]\nname='prod'\nresources=['pg://prod/']\n\
             [[environments]]\nname='staging'\nresources=['pg://prod/public.t']",
        )
        .expect_err("overlap");
        assert!(err.to_string().contains("overlaps"), "{err}");
    }

    #[test]
    fn an_operator_key_cannot_also_be_an_agent_key() {
        let hash = "a".repeat(64);
        let err = load(&format!(
            "[[identity.api_keys]]\nagent='bot'\nsha256='{hash}'\n[[operators]]\nname='alice'\nsha256='{hash}'"
        ))
        .expect_err("duplicate");
        assert!(err.to_string().contains("configured twice"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_errors() {
        assert!(load("listne = '127.0.0.1:1'").is_err());
        assert!(load("[tokens]\nmax_ttl = 'soon'").is_err());
        assert!(load("[tokens]\ndefault_ttl = '2h'\nmax_ttl = '1h'").is_err());
    }

    #[test]
    fn environment_lookup_uses_configured_prefixes() {
        let config = load(
            "[[environments]]\nname='staging'\nresources=['pg://staging/']\n\
             [[environments]]\nname='prod'\nresources=['pg://prod/', 'http://railway/']",
        )
        .expect("config");
        let pattern = |s| ResourcePattern::parse(s).expect("pattern");
        assert_eq!(
            config.environment_of(&pattern("pg://staging/public.t")),
            Some("staging")
        );
        assert_eq!(
            config.environment_of(&pattern("http://railway/volumes/")),
            Some("prod")
        );
        assert_eq!(config.environment_of(&pattern("pg://staging")), None);
        assert_eq!(config.environment_of(&pattern("pg://other/x")), None);
    }
}
