//! Grant evaluation: which of the requested scopes the policy grants to this identity.
//!
//! Facts given to the policy: `agent($name)`, `auth_method($m)`, `claim($key, $value)`,
//! `requested($resource, $verb)`, `requested_prefix($resource, $verb)` for prefix requests,
//! `environment_of($resource, $env)` and `time($now)`. A scope is granted only if the policy
//! derives `grant($resource, $verb)` and no `refuse($resource, $verb, $reason)`. Policies may
//! cap the lifetime with `max_ttl($seconds)`. Nothing is narrowed silently: every refused scope
//! comes back with its reason.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use biscuit_auth::builder::{boolean, date, fact, int, string, Term};
use biscuit_auth::error::Token as BiscuitError;

use super::PolicySet;
use crate::identity::{ClaimValue, Identity};
use crate::scope::Scope;
use crate::settings::{environment_of, GrantSettings, RunLimits};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ScopeOutcome {
    Granted { environment: String },
    Refused { reason: String },
}

#[derive(Debug, Clone)]
pub struct GrantDecision {
    pub outcomes: Vec<(Scope, ScopeOutcome)>,
    pub ttl: Duration,
    /// The smallest `row_budget($n)` the policy derives, if any.
    pub row_budget: Option<u64>,
    /// The smallest `use_budget($n)` the policy derives, if any.
    pub use_budget: Option<u64>,
}

impl GrantDecision {
    pub fn all_granted(&self) -> bool {
        self.outcomes
            .iter()
            .all(|(_, o)| matches!(o, ScopeOutcome::Granted { .. }))
    }

    pub fn refused(&self) -> impl Iterator<Item = (&Scope, &str)> {
        self.outcomes
            .iter()
            .filter_map(|(scope, outcome)| match outcome {
                ScopeOutcome::Refused { reason } => Some((scope, reason.as_str())),
                ScopeOutcome::Granted { .. } => None,
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyEvalError {
    #[error("grant policy hit its Datalog run limit: {0}")]
    RunLimit(String),
    #[error("grant policy evaluation failed: {0}")]
    Datalog(String),
    #[error("no scopes requested")]
    NothingRequested,
    #[error("too many scopes requested: at most {0} (location, action) pairs across all authorization_details")]
    TooManyScopes(usize),
}

impl PolicyEvalError {
    pub fn code(&self) -> &'static str {
        match self {
            PolicyEvalError::RunLimit(_) => "policy_run_limit",
            PolicyEvalError::Datalog(_) => "policy_error",
            PolicyEvalError::NothingRequested => "no_scopes",
            PolicyEvalError::TooManyScopes(_) => "too_many_scopes",
        }
    }
}

impl From<BiscuitError> for PolicyEvalError {
    fn from(e: BiscuitError) -> Self {
        match e {
            BiscuitError::RunLimit(limit) => PolicyEvalError::RunLimit(limit.to_string()),
            other => PolicyEvalError::Datalog(other.to_string()),
        }
    }
}

pub const MAX_SCOPES: usize = 64;

/// The broker's grant decision procedure: policy files plus configuration.
#[derive(Debug, Clone)]
pub struct GrantEvaluator {
    policy: PolicySet,
    limits: RunLimits,
    config: GrantSettings,
}

impl GrantEvaluator {
    pub fn new(policy: PolicySet, config: GrantSettings) -> Self {
        GrantEvaluator {
            policy,
            limits: config.datalog.clone(),
            config,
        }
    }

    /// What the policy itself derives for a delete on each recovery point, before the hard
    /// rule refuses it: a policy that tries to grant one is a policy bug worth failing on.
    pub fn recovery_point_grants(
        &self,
        identity: &Identity,
        now: SystemTime,
    ) -> Result<Vec<String>, PolicyEvalError> {
        let mut offending = Vec::new();
        for point in &self.config.recovery_points {
            let delete = Scope::new(point.clone(), crate::scope::Verb::Delete);
            let builder = self.request_builder(identity, std::slice::from_ref(&delete), now)?;
            let mut authorizer = builder.build_unauthenticated()?;
            let granted: Vec<(String, String)> =
                authorizer.query("granted($r, $v) <- grant($r, $v)")?;
            let refused: Vec<(String, String, String)> =
                authorizer.query("refused($r, $v, $why) <- refuse($r, $v, $why)")?;
            if !granted.is_empty() && refused.is_empty() {
                offending.push(point.to_string());
            }
        }
        Ok(offending)
    }

    pub fn evaluate(
        &self,
        identity: &Identity,
        requested: &[Scope],
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<GrantDecision, PolicyEvalError> {
        if requested.is_empty() {
            return Err(PolicyEvalError::NothingRequested);
        }
        if requested.len() > MAX_SCOPES {
            return Err(PolicyEvalError::TooManyScopes(MAX_SCOPES));
        }
        let requested: Vec<Scope> = requested
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let environments: BTreeMap<_, _> = requested
            .iter()
            .filter_map(|scope| {
                environment_of(&self.config.environments, &scope.resource)
                    .map(|env| (scope.resource.clone(), env.to_owned()))
            })
            .collect();
        let builder = self.request_builder(identity, &requested, now)?;
        let mut authorizer = builder.build_unauthenticated()?;
        let granted: BTreeSet<(String, String)> = authorizer
            .query("granted($r, $v) <- grant($r, $v)")?
            .into_iter()
            .collect();
        let mut refusals: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let refused: Vec<(String, String, String)> =
            authorizer.query("refused($r, $v, $why) <- refuse($r, $v, $why)")?;
        for (resource, verb, why) in refused {
            refusals.entry((resource, verb)).or_default().push(why);
        }
        let caps: Vec<(i64,)> = authorizer.query("cap($s) <- max_ttl($s)")?;
        let budgets: Vec<(i64,)> = authorizer.query("budget($n) <- row_budget($n)")?;
        let row_budget = budgets.into_iter().map(|(n,)| n.max(0) as u64).min();
        let uses: Vec<(i64,)> = authorizer.query("uses($n) <- use_budget($n)")?;
        let use_budget = uses.into_iter().map(|(n,)| n.max(0) as u64).min();

        let outcomes = requested
            .into_iter()
            .map(|scope| {
                let key = (
                    scope.resource.as_str().to_owned(),
                    scope.verb.as_str().to_owned(),
                );
                let recovery = (scope.verb == crate::scope::Verb::Delete)
                    .then(|| {
                        crate::containment::grant_reaches_recovery_point(
                            &self.config.recovery_points,
                            &scope.resource,
                        )
                    })
                    .flatten();
                let outcome = match (environments.get(&scope.resource), refusals.get(&key)) {
                    (None, _) => ScopeOutcome::Refused {
                        reason: "resource belongs to no configured environment".into(),
                    },
                    _ if recovery.is_some() => ScopeOutcome::Refused {
                        reason: format!(
                            "delete would reach recovery point {}: never granted",
                            recovery.as_ref().map(|p| p.as_str()).unwrap_or("")
                        ),
                    },
                    (_, Some(reasons)) => ScopeOutcome::Refused {
                        reason: reasons.join("; "),
                    },
                    (Some(env), None) if granted.contains(&key) => ScopeOutcome::Granted {
                        environment: env.clone(),
                    },
                    (Some(_), None) => ScopeOutcome::Refused {
                        reason: "no grant rule matches".into(),
                    },
                };
                (scope, outcome)
            })
            .collect();

        let mut ttl = ttl.unwrap_or(self.config.tokens.default_ttl);
        for (seconds,) in caps {
            ttl = ttl.min(Duration::from_secs(seconds.max(0) as u64));
        }
        ttl = ttl.min(self.config.tokens.max_ttl);
        Ok(GrantDecision {
            outcomes,
            ttl,
            row_budget,
            use_budget,
        })
    }
}

impl GrantEvaluator {
    /// The policy with the facts of one request: identity, claims, time, requested scopes and
    /// the configured environment of each.
    fn request_builder(
        &self,
        identity: &Identity,
        requested: &[Scope],
        now: SystemTime,
    ) -> Result<biscuit_auth::AuthorizerBuilder, PolicyEvalError> {
        let mut builder = self
            .policy
            .builder()
            .set_limits(self.limits.to_biscuit())
            .fact(fact("agent", &[string(&identity.agent)]))?
            .fact(fact("auth_method", &[string(identity.method.as_str())]))?
            .fact(fact("time", &[date(&now)]))?;
        for (key, value) in &identity.claims {
            builder = builder.fact(fact("claim", &[string(key), claim_term(value)]))?;
        }
        for scope in requested {
            let terms = [string(scope.resource.as_str()), string(scope.verb.as_str())];
            builder = builder.fact(fact("requested", &terms))?;
            if scope.resource.is_prefix() {
                builder = builder.fact(fact("requested_prefix", &terms))?;
            }
            if let Some(env) = environment_of(&self.config.environments, &scope.resource) {
                builder = builder.fact(fact(
                    "environment_of",
                    &[string(scope.resource.as_str()), string(env)],
                ))?;
            }
        }
        Ok(builder)
    }
}

fn claim_term(value: &ClaimValue) -> Term {
    match value {
        ClaimValue::Str(s) => string(s),
        ClaimValue::Int(i) => int(*i),
        ClaimValue::Bool(b) => boolean(*b),
    }
}
