//! The policy test runner: every `policies/tests/*.toml` file holds cases (an identity and a
//! request, with the expected grant or refusal); one function walks them all.
//!
//! ```toml
//! [[case]]
//! name = "deploy-bot can never delete backups"
//! agent = "deploy-bot"
//! claims = { team = "infra" }
//! scopes = ["http://railway/backups/:delete"]
//! expect = "refused"
//! refused = ["http://railway/backups/:delete"]   # optional: exactly these are refused
//! ```

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use super::{GrantEvaluator, ScopeOutcome};
use crate::identity::{AuthMethod, ClaimValue, Identity};
use crate::scope::Scope;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    #[serde(default)]
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Granted,
    Refused,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    agent: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    claims: toml::Table,
    scopes: Vec<String>,
    expect: Expect,
    #[serde(default)]
    refused: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseOutcome {
    Pass,
    Fail(String),
}

#[derive(Debug, Clone)]
pub struct CaseReport {
    pub file: PathBuf,
    pub name: String,
    pub outcome: CaseOutcome,
}

/// Runs every case file in `dir`. An unreadable or malformed case file is itself a failure.
pub fn run_cases(dir: &Path, evaluator: &GrantEvaluator) -> Result<Vec<CaseReport>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(format!("no *.toml case files in {}", dir.display()));
    }
    let mut reports = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: CasesFile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for case in file.case {
            let outcome = run_case(&case, evaluator);
            reports.push(CaseReport {
                file: path.clone(),
                name: case.name,
                outcome,
            });
        }
    }
    Ok(reports)
}

fn run_case(case: &Case, evaluator: &GrantEvaluator) -> CaseOutcome {
    let scopes: Result<Vec<Scope>, _> = case.scopes.iter().map(|s| s.parse::<Scope>()).collect();
    let scopes = match scopes {
        Ok(scopes) => scopes,
        Err(e) => return CaseOutcome::Fail(format!("bad scope in case: {e}")),
    };
    let method = match case.auth.as_deref() {
        None | Some("api_key") => AuthMethod::ApiKey,
        Some("jwt") => AuthMethod::Jwt,
        Some(other) => return CaseOutcome::Fail(format!("unknown auth {other:?}")),
    };
    let claims = case
        .claims
        .iter()
        .filter_map(|(k, v)| {
            let value = match v {
                toml::Value::String(s) => ClaimValue::Str(s.clone()),
                toml::Value::Integer(i) => ClaimValue::Int(*i),
                toml::Value::Boolean(b) => ClaimValue::Bool(*b),
                _ => return None,
            };
            Some((k.clone(), value))
        })
        .collect();
    let identity = Identity {
        agent: case.agent.clone(),
        method,
        claims,
    };
    // Invariant checked for every identity the cases name: no policy grants a delete on a
    // recovery point (the broker would refuse it anyway; a policy that tries is wrong).
    match evaluator.recovery_point_grants(&identity, SystemTime::now()) {
        Ok(points) if !points.is_empty() => {
            return CaseOutcome::Fail(format!(
                "policy grants delete on recovery point(s) {} to {}",
                points.join(", "),
                identity.agent
            ))
        }
        Ok(_) => {}
        Err(e) => return CaseOutcome::Fail(format!("evaluation error: {e}")),
    }
    let decision = match evaluator.evaluate(&identity, &scopes, None, SystemTime::now()) {
        Ok(decision) => decision,
        Err(e) => return CaseOutcome::Fail(format!("evaluation error: {e}")),
    };
    let refused: Vec<String> = decision.refused().map(|(s, _)| s.to_string()).collect();
    let describe = || {
        decision
            .outcomes
            .iter()
            .map(|(scope, outcome)| match outcome {
                ScopeOutcome::Granted { environment } => format!("{scope} granted ({environment})"),
                ScopeOutcome::Refused { reason } => format!("{scope} refused: {reason}"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    match case.expect {
        Expect::Granted if refused.is_empty() => CaseOutcome::Pass,
        Expect::Granted => CaseOutcome::Fail(format!("expected all granted, got {}", describe())),
        Expect::Refused if refused.is_empty() => {
            CaseOutcome::Fail(format!("expected a refusal, got {}", describe()))
        }
        Expect::Refused => match &case.refused {
            None => CaseOutcome::Pass,
            Some(expected) => {
                let mut expected: Vec<String> = expected
                    .iter()
                    .map(|s| {
                        s.parse::<Scope>()
                            .map(|s| s.to_string())
                            .unwrap_or_else(|_| s.clone())
                    })
                    .collect();
                expected.sort();
                let mut actual = refused.clone();
                actual.sort();
                if expected == actual {
                    CaseOutcome::Pass
                } else {
                    CaseOutcome::Fail(format!(
                        "expected exactly {expected:?} refused, got {}",
                        describe()
                    ))
                }
            }
        },
    }
}
