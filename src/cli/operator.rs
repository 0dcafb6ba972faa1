//! The operator's commands: approvals, the freeze switch, revocation, and new keys for
//! agents and operators.

use std::process::ExitCode;

use capgate::client::Client;
use capgate::identity::{new_key, AGENT_KEY_PREFIX, OPERATOR_KEY_PREFIX};
use capgate::store::RevocationKind;
use clap::{Args, Subcommand};

use super::common::*;

#[derive(Subcommand)]
pub enum ApprovalsCommand {
    /// Every request with the exact operation (method, path, body digest or SQL).
    List,
    Approve {
        id: String,
    },
    Deny {
        id: String,
    },
    /// Cancel a pending or approved (staged) operation.
    Cancel {
        id: String,
    },
}

#[derive(Args)]
pub struct RevokeArgs {
    #[arg(long, env = "CAPGATE_BROKER", default_value = "http://127.0.0.1:8080")]
    broker: String,
    #[arg(long, env = "CAPGATE_OPERATOR_KEY", hide_env_values = true)]
    operator_key: String,
    #[arg(long, group = "target")]
    agent: Option<String>,
    #[arg(long, group = "target")]
    session: Option<String>,
    /// A biscuit revocation id (hex), as shown by `capgate token inspect`.
    #[arg(long, group = "target")]
    token_id: Option<String>,
    #[arg(long, default_value = "")]
    reason: String,
}

pub async fn approvals(command: ApprovalsCommand, operator: OperatorArgs) -> CliResult {
    let client = Client::new(&operator.broker).map_err(|e| e.to_string())?;
    let key = &operator.operator_key;
    let result = match command {
        ApprovalsCommand::List => {
            let approvals = client.approvals(key).await.map_err(|e| e.to_string())?;
            for a in approvals {
                println!(
                    "{}  {:?}  {} wants {} on {} via {}  approvers: [{}] of {}",
                    a.id,
                    a.status,
                    a.agent,
                    a.operation.verb,
                    a.operation.resource,
                    a.operation.adapter,
                    a.approvers.join(", "),
                    a.required
                );
                for (k, v) in &a.operation.detail {
                    println!("    {k}: {v}");
                }
                if let Some(preview) = &a.preview {
                    println!("    preview: {} (measured by {})", preview.text, preview.by);
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        ApprovalsCommand::Approve { id } => client.decide_approval(key, &id, "approve").await,
        ApprovalsCommand::Deny { id } => client.decide_approval(key, &id, "deny").await,
        ApprovalsCommand::Cancel { id } => client.decide_approval(key, &id, "cancel").await,
    };
    let approval = result.map_err(|e| e.to_string())?;
    println!("approval {} is now {:?}", approval.id, approval.status);
    Ok(ExitCode::SUCCESS)
}

pub async fn freeze(state: String, operator: OperatorArgs) -> CliResult {
    let client = Client::new(&operator.broker).map_err(|e| e.to_string())?;
    let frozen = client
        .set_freeze(&operator.operator_key, state == "on")
        .await
        .map_err(|e| e.to_string())?;
    println!("frozen: {}", frozen.frozen);
    Ok(ExitCode::SUCCESS)
}

pub async fn revoke(args: RevokeArgs) -> CliResult {
    let (kind, value) = match (args.agent, args.session, args.token_id) {
        (Some(agent), None, None) => (RevocationKind::Agent, agent),
        (None, Some(session), None) => (RevocationKind::Session, session),
        (None, None, Some(id)) => (RevocationKind::Token, id),
        _ => return Err("give exactly one of --agent, --session, --token-id".into()),
    };
    let client = Client::new(&args.broker).map_err(|e| e.to_string())?;
    let entry = client
        .revoke(&args.operator_key, kind, &value, &args.reason)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "revoked {} {} (cursor {})",
        entry.kind.as_str(),
        entry.value,
        entry.cursor
    );
    Ok(ExitCode::SUCCESS)
}

pub fn api_key(agent: String) -> CliResult {
    capgate::identity::validate_agent_name(&agent).map_err(|e| e.to_string())?;
    let (key, hash) = new_key(AGENT_KEY_PREFIX);
    println!("# give this key to the agent (shown once):\n# {key}\n[[identity.api_keys]]\nagent = {agent:?}\nsha256 = \"{hash}\"");
    Ok(ExitCode::SUCCESS)
}

pub fn operator_key(name: String) -> CliResult {
    let (key, hash) = new_key(OPERATOR_KEY_PREFIX);
    println!("# give this key to the operator (shown once):\n# {key}\n[[operators]]\nname = {name:?}\nsha256 = \"{hash}\"");
    Ok(ExitCode::SUCCESS)
}
