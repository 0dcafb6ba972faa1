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
    runtime.block_on(batches_and_lines_over_the_cap_never_reach_the_server());
    println!("mcp_stdio: 2 passed, 0 failed");
    ExitCode::SUCCESS
}

/// The gateway's configuration for a stdio session in front of this binary as the server.
fn stdio_config(
    broker: &Broker,
    dir: &std::path::Path,
    log: &std::path::Path,
    extra: &str,
) -> PathBuf {
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
{extra}

[[servers]]
name = "railway"
command = ["{me}", "--serve-railway", "{log}"]
credential_env = "CAPGATE_TEST_MCP_SECRET"
credential_child_env = "RAILWAY_API_TOKEN"
{RAILWAY_TOOLS}
"#,
        broker = broker.url,
        policies = repo().join("policies/adapters").display(),
        spool = dir.join("spool.jsonl").display(),
        me = me.display(),
        log = log.display(),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).expect("config");
    path
}

/// `capgate proxy mcp --stdio railway` with the agent's token in its environment.
fn stdio_gateway(config: &std::path::Path, token: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_capgate"));
    command
        .args(["proxy", "mcp", "--stdio", "railway", "--config"])
        .arg(config)
        .env("CAPGATE_TOKEN", token)
        .env("CAPGATE_TEST_MCP_SECRET", MCP_SECRET)
        .env("CAPGATE_TEST_ADAPTER_KEY", ADAPTER_KEY)
        .env("RUST_LOG", "warn");
    command
}

/// Over stdio the agent writes raw lines, so nothing stops it sending a batch or a line of
/// any length: neither is run (a line over `max_message_bytes` is dropped unread), and the
/// session goes on.
async fn batches_and_lines_over_the_cap_never_reach_the_server() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let broker = Broker::start_with_policy(OPS_POLICY).await;
    let token = token_of(
        &broker
            .issue(OPS_KEY, &["http://railway/volumes/vol_1:read"], None)
            .await,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("railway.jsonl");
    let config = stdio_config(&broker, dir.path(), &log, "max_message_bytes = 4096");
    let mut child = stdio_gateway(&config, &token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gateway");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut send = async |line: String| {
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
        stdin.flush().await.expect("flush");
    };
    // The next message with an id (notifications are skipped), within 10 s.
    let mut answer = async || -> serde_json::Value {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
                .await
                .expect("an answer in time")
                .expect("read")
                .expect("a line");
            let message: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
            if message.get("id").is_some() {
                return message;
            }
        }
    };
    let call = |id: u64, tool: &str, arguments: serde_json::Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": tool, "arguments": arguments}})
        .to_string()
    };

    send(
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw-agent", "version": "1.0.0"}}})
        .to_string(),
    )
    .await;
    assert_eq!(answer().await["id"], 0);
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string()).await;
    // Until the gateway has synced, reads are refused (revocation_feed_stale).
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in 1.. {
        send(call(id, "get_volume", json!({"volume_id": "vol_1"}))).await;
        let reply = answer().await;
        assert_eq!(reply["id"], id);
        if reply["result"]["isError"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "never synced: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let batch = format!(
        "[{},{}]",
        call(100, "get_volume", json!({"volume_id": "vol_1"})),
        call(101, "delete_volume", json!({"volume_id": "vol_1"}))
    );
    send(batch).await;
    send(call(150, "list_volumes", json!({}))).await;
    // The SDK's stdio transport answers a batch with an invalid-request error or not at all;
    // either way no element of it is answered (or run), and the session goes on.
    let mut before = Vec::new();
    loop {
        let reply = answer().await;
        if reply["id"] == 150 {
            break;
        }
        before.push(reply);
    }
    assert!(
        before
            .iter()
            .all(|r| r["id"].is_null() && r["error"]["code"] == -32600),
        "{before:?}"
    );
    eprintln!("mcp_stdio: a batch line was answered with {before:?}");
    send(call(
        200,
        "get_volume",
        json!({"volume_id": "vol_1", "note": "x".repeat(8000)}),
    ))
    .await;
    send(call(201, "list_volumes", json!({}))).await;
    let reply = answer().await;
    assert_eq!(
        reply["id"], 201,
        "the oversized line got no answer: {reply}"
    );
    drop(stdin);
    let _ = child.wait().await;

    let calls: Vec<_> = Railway::read_log(&log)
        .into_iter()
        .filter(|c| c.method == "tools/call")
        .collect();
    assert!(
        calls
            .iter()
            .all(|c| c.arguments == json!({"volume_id": "vol_1"})
                && c.tool.as_deref() == Some("get_volume")),
        "only the sync reads reached the server: {calls:?}"
    );
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
    let config = stdio_config(&broker, dir.path(), &log, "");
    let command = stdio_gateway(&config, &token);
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
