//! The gateway's HTTP transport against what clients can do with it that the SDK's own client
//! never does: send a JSON-RPC batch, send a body over the size cap (with and without a
//! length), and close the response stream of a call in flight. The real broker, the real
//! `capgate proxy mcp` process and the official SDK's server as the upstream; the agent side
//! is raw HTTP because these are exactly the messages an SDK client will not produce.

mod common;

use std::time::{Duration, Instant};

use common::mcp::*;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SCOPES: [&str; 2] = [
    "http://railway/volumes:read",
    "http://railway/volumes/vol_1:read",
];

/// The tool map plus a long-running read tool.
fn tools() -> String {
    format!(
        "{RAILWAY_TOOLS}
[[servers.tools]]
name = \"watch_volume\"
resource = \"http://railway/volumes/{{/volume_id}}\"
verb = \"read\"
"
    )
}

const SESSION_VERSION: &str = "2025-11-25";

/// A 2025-era session opened by hand (initialize, then `notifications/initialized`): the
/// session id.
async fn raw_session(url: &str, token: &str) -> String {
    let client = reqwest::Client::new();
    let response = client
        .post(url)
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .body(
            json!({
                "jsonrpc": "2.0", "id": 0, "method": "initialize",
                "params": {
                    "protocolVersion": SESSION_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "raw-agent", "version": "1.0.0"}
                }
            })
            .to_string(),
        )
        .send()
        .await
        .expect("initialize");
    assert_eq!(response.status(), 200);
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("session id")
        .to_owned();
    let _ = response.text().await;
    let initialized = client
        .post(url)
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", SESSION_VERSION)
        .body(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string())
        .send()
        .await
        .expect("initialized");
    assert_eq!(initialized.status(), 202);
    session
}

/// A POST in the session; the response as it is (not read).
async fn session_post(url: &str, token: &str, session: &str, body: String) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", SESSION_VERSION)
        .body(body)
        .send()
        .await
        .expect("send")
}

/// A JSON body, or the first JSON-RPC message of an SSE body.
fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .find_map(|d| serde_json::from_str(d.trim()).ok())
            .unwrap_or(Value::Null)
    })
}

fn call(id: u64, tool: &str, arguments: Value) -> Value {
    json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": arguments}
    })
}

/// Gateway, upstream and a synced token; the upstream's log cleared.
async fn setup(settings: &str) -> (Broker, Railway, GatewayProcess, String) {
    let broker = Broker::start_with_policy(OPS_POLICY).await;
    let railway = Railway::default();
    let railway_url = railway.start().await;
    let gateway = start_gateway_with(&broker.url, &railway_url, settings, &tools()).await;
    let token = token_of(&broker.issue(OPS_KEY, &SCOPES, None).await);
    let agent = connect_when_ready(&gateway.url("railway"), &token).await;
    wait_synced(&agent, "get_volume", json!({"volume_id": "vol_1"})).await;
    agent.cancel().await.ok();
    railway.clear();
    (broker, railway, gateway, token)
}

#[tokio::test]
async fn a_json_rpc_batch_is_refused_whole_and_none_of_it_reaches_the_server() {
    let (_broker, railway, gateway, token) = setup("").await;
    let url = gateway.url("railway");
    let session = raw_session(&url, &token).await;
    railway.clear();

    // An allowed read beside a destructive call: neither may run, whatever each would get.
    let batch = json!([
        call(1, "get_volume", json!({"volume_id": "vol_1"})),
        call(2, "delete_volume", json!({"volume_id": "vol_1"})),
    ])
    .to_string();
    let response = session_post(&url, &token, &session, batch.clone()).await;
    assert_eq!(response.status(), 400);
    let reply = json_of(&response.text().await.unwrap_or_default());
    assert_eq!(reply["error"]["code"], -32600, "{reply}");
    assert_eq!(reply["error"]["data"]["code"], "batch_refused", "{reply}");
    assert_eq!(reply["id"], Value::Null, "{reply}");

    // Stateless (2026-07-28) requests are no different, and leading whitespace changes nothing.
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&token)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "2026-07-28")
        .body(format!(" \r\n\t{batch}"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    let reply = json_of(&response.text().await.unwrap_or_default());
    assert_eq!(reply["error"]["data"]["code"], "batch_refused", "{reply}");

    assert!(
        railway.seen().is_empty(),
        "nothing of a batch reaches the server: {:?}",
        railway.seen()
    );
}

#[tokio::test]
async fn a_body_over_the_cap_is_refused_before_it_reaches_the_server() {
    let (_broker, railway, gateway, token) = setup("max_message_bytes = 4096").await;
    let url = gateway.url("railway");
    let session = raw_session(&url, &token).await;
    railway.clear();

    // Under the cap: an ordinary allowed call, to show the cap is not refusing everything.
    let small = call(
        1,
        "get_volume",
        json!({"volume_id": "vol_1", "note": "x".repeat(1000)}),
    );
    let response = session_post(&url, &token, &session, small.to_string()).await;
    assert_eq!(response.status(), 200);
    let reply = json_of(&response.text().await.unwrap_or_default());
    assert_eq!(reply["result"]["isError"], false, "{reply}");
    assert_eq!(railway.calls().len(), 1);
    railway.clear();

    // Over it, with a Content-Length: refused on the length, as problem+json.
    let big = call(
        2,
        "get_volume",
        json!({"volume_id": "vol_1", "note": "x".repeat(8000)}),
    );
    let response = session_post(&url, &token, &session, big.to_string()).await;
    assert_eq!(response.status(), 413);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let problem: Value = response.json().await.expect("problem json");
    assert_eq!(problem["code"], "message_too_large", "{problem}");

    // Over it without a length (chunked): refused once the cap is crossed.
    let port = gateway.port;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let head = format!(
        "POST /mcp/railway HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
         accept: application/json, text/event-stream\r\ncontent-type: application/json\r\n\
         mcp-session-id: {session}\r\nmcp-protocol-version: {SESSION_VERSION}\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let body = big.to_string();
    for chunk in body.as_bytes().chunks(1000) {
        let framed = [
            format!("{:x}\r\n", chunk.len()).as_bytes(),
            chunk,
            b"\r\n".as_slice(),
        ]
        .concat();
        if stream.write_all(&framed).await.is_err() {
            break; // the gateway answered and closed: fine
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"message_too_large\""), "{answer}");

    assert!(
        railway.seen().is_empty(),
        "nothing over the cap reaches the server: {:?}",
        railway.seen()
    );
}

/// Waits until the upstream has recorded `method` (at most 10 s); what it recorded.
async fn upstream_saw(railway: &Railway, method: &str) -> Option<UpstreamCall> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(seen) = railway.seen().into_iter().find(|c| c.method == method) {
            return Some(seen);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `request` (a `watch_volume` call) and reads its answer in a task, waits until the
/// upstream runs the call, then drops the task (its response stream and connection close,
/// whether or not the answer's headers had arrived) and checks what the upstream saw.
async fn closing_the_stream_cancels_the_upstream_call(
    railway: &Railway,
    era: &str,
    request: reqwest::RequestBuilder,
) {
    let agent = tokio::spawn(async move {
        let response = request.send().await.expect("send");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        (status, text)
    });
    let started = upstream_saw(railway, "tools/call").await;
    assert!(
        !agent.is_finished(),
        "{era}: the call was answered: {:?}",
        agent.await
    );
    let started = started.unwrap_or_else(|| panic!("{era}: the call never reached the upstream"));
    assert_eq!(started.tool.as_deref(), Some("watch_volume"));
    // The agent goes away mid-call.
    agent.abort();
    let _ = agent.await;
    let cancelled = upstream_saw(railway, "notifications/cancelled").await;
    let ended = upstream_saw(railway, "watch_volume cancelled").await;
    assert!(
        cancelled.is_some(),
        "{era}: the upstream never got notifications/cancelled: {:?}",
        railway.seen()
    );
    let ended = ended.unwrap_or_else(|| {
        panic!(
            "{era}: the upstream's call was not cancelled: {:?}",
            railway.seen()
        )
    });
    assert_eq!(
        cancelled.and_then(|c| c.tool),
        ended.tool,
        "{era}: the cancellation names the upstream request that was running"
    );
    assert!(
        !railway
            .seen()
            .iter()
            .any(|c| c.method == "watch_volume finished"),
        "{era}"
    );
}

#[tokio::test]
async fn a_session_client_closing_its_stream_mid_call_cancels_the_upstream_call() {
    let (_broker, railway, gateway, token) = setup("").await;
    let url = gateway.url("railway");
    // 2025 era: the POST's SSE stream inside a session.
    let session = raw_session(&url, &token).await;
    railway.clear();
    let request = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&token)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", SESSION_VERSION)
        .body(call(5, "watch_volume", json!({"volume_id": "vol_1"})).to_string());
    closing_the_stream_cancels_the_upstream_call(&railway, "session (2025-11-25)", request).await;
}

#[tokio::test]
async fn a_stateless_client_closing_its_stream_mid_call_cancels_the_upstream_call() {
    let (_broker, railway, gateway, token) = setup("").await;
    // 2026-07-28: one self-contained POST.
    let mut body = call(6, "watch_volume", json!({"volume_id": "vol_1"}));
    body["params"]["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}
    });
    let request = reqwest::Client::new()
        .post(gateway.url("railway"))
        .bearer_auth(&token)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "watch_volume")
        .body(body.to_string());
    closing_the_stream_cancels_the_upstream_call(&railway, "stateless (2026-07-28)", request).await;
}
