//! The MCP gateway in stdio mode: the agent launches `capgate proxy mcp --stdio railway`
//! with its token in `CAPGATE_TOKEN`; the gateway starts the real server (the SDK's, over
//! stdio: this same test binary run with `--serve-railway`) with the real credential in its
//! environment and never the token. No libtest harness: the binary is also that server, and
//! a test runner's own output on stdout would break the protocol.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use common::mcp::*;
use common::*;
use rmcp::transport::TokioChildProcess;
use rmcp::ServiceExt;
use serde_json::json;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if args.get(1).map(String::as_str) == Some("--serve-railway") {
        let log = PathBuf::from(args.get(2).expect("log path"));
        runtime.block_on(Railway::serve_stdio(log));
        return ExitCode::SUCCESS;
    }
    runtime.block_on(a_stdio_session_is_decided_like_http_and_the_server_never_sees_the_token());
    println!("mcp_stdio: 1 passed, 0 failed");
    ExitCode::SUCCESS
}

async fn a_stdio_session_is_decided_like_http_and_the_server_never_sees_the_token() {
    let broker = Broker::start_with_policy(OPS_POLICY).await;
    let token = token_of(
        &broker
            .issue(
                OPS_KEY,
                &[
                    "http://railway/volumes:read",
                    "http://railway/volumes/vol_1:read",
                    "http://railway/volumes/vol_1:delete",
                ],
                None,
            )
            .await,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("railway.jsonl");
    let me = std::env::current_exe().expect("test binary");
    let config = format!(
        r#"
broker = "{broker}"
environment = "prod"
name = "railway-proxy"
adapter_policies = "{policies}"
max_staleness = "2s"
adapter_key_env = "CAPGATE_TEST_ADAPTER_KEY"
audit_spool = "{spool}"

[[servers]]
name = "railway"
command = ["{me}", "--serve-railway", "{log}"]
credential_env = "CAPGATE_TEST_MCP_SECRET"
credential_child_env = "RAILWAY_API_TOKEN"
{RAILWAY_TOOLS}
"#,
        broker = broker.url,
        policies = repo().join("policies/adapters").display(),
        spool = dir.path().join("spool.jsonl").display(),
        me = me.display(),
        log = log.display(),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).expect("config");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_capgate"));
    command
        .args(["proxy", "mcp", "--stdio", "railway", "--config"])
        .arg(&path)
        .env("CAPGATE_TOKEN", &token)
        .env("CAPGATE_TEST_MCP_SECRET", MCP_SECRET)
        .env("CAPGATE_TEST_ADAPTER_KEY", ADAPTER_KEY)
        .env("RUST_LOG", "warn");
    let agent =
        ().serve(TokioChildProcess::new(command).expect("spawn gateway"))
            .await
            .expect("stdio session");
    wait_synced(&agent, "get_volume", json!({"volume_id": "vol_1"})).await;

    assert_eq!(
        listed(&agent).await,
        ["delete_volume", "get_volume", "list_volumes"]
    );
    for (tool, arguments, code) in [
        ("get_volume", json!({"volume_id": "vol_2"}), "policy_denied"),
        (
            "delete_volume",
            json!({"volume_id": "vol_1"}),
            "approval_required",
        ),
        (
            "delete_backup",
            json!({"backup_id": "bk_1"}),
            "policy_denied",
        ),
        ("shell", json!({"command": "id"}), "tool_unmapped"),
    ] {
        let (is_error, text) = call(&agent, tool, arguments).await;
        assert!(is_error, "{tool}: {text}");
        assert!(
            text.starts_with(&format!("capgate denied this call ({code})")),
            "{tool}: {text}"
        );
    }
    let _ = agent.cancel().await;

    let seen = Railway::read_log(&log);
    let calls: Vec<_> = seen.iter().filter(|c| c.method == "tools/call").collect();
    assert!(
        calls.iter().all(|c| c.tool.as_deref() == Some("get_volume")
            && c.arguments == json!({"volume_id": "vol_1"})),
        "only the allowed read reached the server: {calls:?}"
    );
    assert!(!calls.is_empty());
    for request in &seen {
        let env = &request.headers;
        assert!(
            env.iter()
                .any(|(k, v)| k == "RAILWAY_API_TOKEN" && v == MCP_SECRET),
            "the server got the real credential"
        );
        assert!(
            env.iter()
                .all(|(k, v)| !k.starts_with("CAPGATE_") && !v.contains(&token[..40])),
            "the server process never sees the token"
        );
    }
}
