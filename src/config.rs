//! The broker's configuration file (TOML): where things live, who may authenticate, which
//! environment each resource belongs to, and the bounds on tokens and Datalog runs.
//!
//! Everything is validated at load; the broker refuses to start on a doubtful configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::scope::ResourcePattern;

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

/// Runtime limits for every Datalog evaluation (grant policy, guard, dry run).
///
/// biscuit's defaults (1 ms, 1000 facts) reject valid tokens on a loaded machine, so the
/// limits are explicit and configured; hitting one is a distinct deny reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunLimits {
    #[serde(default = "RunLimits::default_max_facts")]
    pub max_facts: u64,
    #[serde(default = "RunLimits::default_max_iterations")]
    pub max_iterations: u64,
    #[serde(default = "RunLimits::default_max_time", deserialize_with = "duration")]
    pub max_time: Duration,
}

impl RunLimits {
    fn default_max_facts() -> u64 {
        10_000
    }
    fn default_max_iterations() -> u64 {
        100
    }
    /// Facts, iterations and the token size bound the work of a decision; the clock is the
    /// last net under them (a token whose own rules join large fact sets). It measures wall
    /// time, which CPU contention stretches: at 20 ms a loaded 2-core machine denied honest
    /// writes (`policy_run_limit` aborted a pgbench run at load 10), while a decision costs
    /// about 0.2 ms of CPU.
    fn default_max_time() -> Duration {
        Duration::from_millis(250)
    }

    pub fn to_biscuit(&self) -> biscuit_auth::AuthorizerLimits {
        biscuit_auth::AuthorizerLimits {
            max_facts: self.max_facts,
            max_iterations: self.max_iterations,
            max_time: self.max_time,
        }
    }
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            max_facts: Self::default_max_facts(),
            max_iterations: Self::default_max_iterations(),
            max_time: Self::default_max_time(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// TTL when the agent asks for none.
    #[serde(default = "TokenSettings::default_ttl", deserialize_with = "duration")]
    pub default_ttl: Duration,
    /// Hard maximum: no policy and no request can exceed it.
    #[serde(
        default = "TokenSettings::default_max_ttl",
        deserialize_with = "duration"
    )]
    pub max_ttl: Duration,
    /// Larger tokens are rejected before any parsing.
    #[serde(default = "TokenSettings::default_max_bytes")]
    pub max_token_bytes: usize,
}

impl TokenSettings {
    fn default_ttl() -> Duration {
        Duration::from_secs(600)
    }
    fn default_max_ttl() -> Duration {
        Duration::from_secs(3600)
    }
    fn default_max_bytes() -> usize {
        16 * 1024
    }
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            default_ttl: Self::default_ttl(),
            max_ttl: Self::default_max_ttl(),
            max_token_bytes: Self::default_max_bytes(),
        }
    }
}

/// A named environment (staging, prod) and the resources that belong to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    pub name: String,
    pub resources: Vec<ResourcePattern>,
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
    #[serde(default = "crate::adapters::runtime::default_adapter_policies")]
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
    pub containment: crate::containment::ContainmentConfig,
    /// Approval notifications: webhook sinks, the console's public URL, the expiry sweep.
    #[serde(default)]
    pub notifications: crate::broker::webhooks::NotificationConfig,
    /// Timeouts and the connection cap (`[connections]`).
    #[serde(default)]
    pub connections: crate::connections::ConnectionLimits,
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
        self.environments
            .iter()
            .find(|env| env.resources.iter().any(|r| r.covers(pattern.as_str())))
            .map(|env| env.name.as_str())
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: Self::default_listen(),
            data_dir: Self::default_data_dir(),
            policies: Self::default_policies(),
            adapter_policies: crate::adapters::runtime::default_adapter_policies(),
            tokens: TokenSettings::default(),
            datalog: RunLimits::default(),
            environments: Vec::new(),
            identity: IdentityConfig::default(),
            operators: Vec::new(),
            adapters: Vec::new(),
            store: StoreConfig::default(),
            containment: crate::containment::ContainmentConfig::default(),
            notifications: Default::default(),
            connections: crate::connections::ConnectionLimits::default(),
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

/// Durations are written the human way: "10m", "1h 30m", "250ms".
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
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
