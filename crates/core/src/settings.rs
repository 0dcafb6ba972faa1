//! Settings the core's decisions depend on, read from the broker's or an adapter's
//! configuration file: Datalog run limits, token bounds, environments, and the human way of
//! writing durations. Files are read by the broker and the adapters; only the shapes live here.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::scope::ResourcePattern;

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

/// The configured environment a requested pattern belongs to, if exactly one covers it.
pub fn environment_of<'a>(
    environments: &'a [Environment],
    pattern: &ResourcePattern,
) -> Option<&'a str> {
    environments
        .iter()
        .find(|env| env.resources.iter().any(|r| r.covers(pattern.as_str())))
        .map(|env| env.name.as_str())
}

/// What the broker's grant decision reads of its configuration.
#[derive(Debug, Clone, Default)]
pub struct GrantSettings {
    pub tokens: TokenSettings,
    pub datalog: RunLimits,
    pub environments: Vec<Environment>,
    /// Backups and snapshots: no policy can grant a delete on them.
    pub recovery_points: Vec<ResourcePattern>,
}

/// How old an adapter's revocation view may grow before it denies everything, unless its
/// configuration says otherwise.
pub fn default_max_staleness() -> std::time::Duration {
    crate::revocation::DEFAULT_MAX_STALENESS
}

/// Where adapters (and the broker's dry run) find the adapter policies by default.
pub fn default_adapter_policies() -> PathBuf {
    PathBuf::from("policies/adapters")
}

/// Durations are written the human way: "10m", "1h 30m", "250ms".
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}
