//! `capgate policy`: check, test and explain policies.

use std::path::PathBuf;
use std::process::ExitCode;

use capgate::guard::Request;
use capgate::policy::{run_cases, CaseOutcome, GrantEvaluator, PolicySet};
use capgate::scope::{ResourcePattern, Verb};
use clap::Subcommand;

use super::audit::read_audit_file;
use super::common::*;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Parse every grant and adapter policy; exit non-zero on any error.
    Check(ConfigArg),
    /// Run the cases in policies/tests/ and exit non-zero on any mismatch.
    Test {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        cases: Option<PathBuf>,
    },
    /// Re-evaluate recorded decisions against candidate adapter policies; list what flips.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        audit: PathBuf,
        #[arg(long)]
        policies: PathBuf,
    },
    /// Explain offline whether a token may do VERB on RESOURCE, and why.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        resource: ResourcePattern,
        #[arg(long)]
        verb: Verb,
    },
}

pub async fn policy_command(command: PolicyCommand) -> CliResult {
    match command {
        PolicyCommand::Check(args) => {
            let config = load_config(&args)?;
            for dir in [&config.policies, &config.adapter_policies] {
                let set = PolicySet::load_dir(dir).map_err(|e| e.to_string())?;
                for file in set.files() {
                    println!("ok  {}", file.path.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test { config, cases } => {
            let config = load_config(&config)?;
            let cases = cases.unwrap_or_else(|| config.policies.join("tests"));
            let policy = PolicySet::load_dir(&config.policies).map_err(|e| e.to_string())?;
            let evaluator = GrantEvaluator::new(policy, config.grant_settings());
            let reports = run_cases(&cases, &evaluator)?;
            let mut failed = 0;
            for report in &reports {
                match &report.outcome {
                    CaseOutcome::Pass => {
                        println!("PASS {}: {}", report.file.display(), report.name)
                    }
                    CaseOutcome::Fail(why) => {
                        failed += 1;
                        println!(
                            "FAIL {}: {}\n     {why}",
                            report.file.display(),
                            report.name
                        );
                    }
                }
            }
            println!("{} passed, {} failed", reports.len() - failed, failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PolicyCommand::Replay {
            config,
            audit,
            policies,
        } => {
            let config = load_config(&config)?;
            let records = read_audit_file(&audit)?;
            let policy = PolicySet::load_dir(&policies).map_err(|e| e.to_string())?;
            let report = capgate::containment::replay::replay(&records, &policy, &config.datalog)
                .map_err(|e| e.to_string())?;
            for change in &report.changes {
                println!(
                    "record {} decision {}: {} {} {} was {}, would be {}",
                    change.seq,
                    change.decision_id,
                    change.agent.as_deref().unwrap_or("?"),
                    change.verb,
                    change.resource,
                    if change.recorded_allowed {
                        "allowed"
                    } else {
                        "denied"
                    },
                    if change.replayed_allowed {
                        "allowed"
                    } else {
                        "denied"
                    },
                );
            }
            println!(
                "{} decisions replayed, {} skipped, {} would change",
                report.replayed,
                report.skipped,
                report.changes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain {
            config,
            token,
            resource,
            verb,
        } => {
            let config = load_config(&config)?;
            let token = token_arg(token)?;
            let environment = config
                .environment_of(&resource)
                .ok_or("resource belongs to no configured environment")?
                .to_owned();
            let guard = offline_guard(&config).await?;
            let decision = guard.decide(
                &token,
                &Request {
                    resource: resource.to_string(),
                    verb,
                    environment,
                    attributes: vec![],
                },
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&decision).map_err(|e| e.to_string())?
            );
            Ok(if decision.is_allow() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
