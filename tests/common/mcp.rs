//! A real MCP server (the official SDK's, over Streamable HTTP) that records what reaches it,
//! the real `capgate proxy mcp` process in front of it, and SDK clients for agents.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, JsonObject,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ErrorData, RoleClient, RoleServer, ServerHandler, ServiceExt};
use serde_json::{json, Value};

use super::{free_port, repo};

pub const MCP_SECRET: &str = "railway-mcp-secret-91c2";

/// One request as the upstream server saw it.
#[derive(Debug, Clone)]
pub struct UpstreamCall {
    pub method: String,
    pub tool: Option<String>,
    pub arguments: Value,
    pub headers: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    seen: Vec<UpstreamCall>,
    /// Appended to get_volume's description: a server changing a tool under its users.
    get_volume_drift: String,
}

/// A Railway-like MCP server: volumes, backups, and a shell tool nobody mapped.
#[derive(Clone, Default)]
pub struct Railway {
    state: Arc<Mutex<State>>,
    /// stdio mode: each request is also appended here (as JSON lines) with the process's
    /// environment in place of headers, for the test process to read.
    log: Option<std::path::PathBuf>,
}

fn schema(properties: Value) -> Arc<JsonObject> {
    let mut object = JsonObject::new();
    object.insert("type".into(), json!("object"));
    object.insert("properties".into(), properties);
    Arc::new(object)
}

impl Railway {
    pub fn seen(&self) -> Vec<UpstreamCall> {
        self.state.lock().expect("lock").seen.clone()
    }

    pub fn calls(&self) -> Vec<UpstreamCall> {
        self.seen()
            .into_iter()
            .filter(|c| c.method == "tools/call")
            .collect()
    }

    pub fn clear(&self) {
        self.state.lock().expect("lock").seen.clear();
    }

    pub fn drift_get_volume(&self, text: &str) {
        self.state.lock().expect("lock").get_volume_drift = text.to_owned();
    }

    fn tools(&self) -> Vec<Tool> {
        let drift = self.state.lock().expect("lock").get_volume_drift.clone();
        let id = |name: &str| schema(json!({ name: {"type": "string"} }));
        vec![
            Tool::new("list_volumes", "Lists volumes", schema(json!({})))
                .with_annotations(ToolAnnotations::new().read_only(true)),
            Tool::new(
                "get_volume",
                format!("Shows one volume{drift}"),
                id("volume_id"),
            )
            .with_annotations(ToolAnnotations::new().read_only(true)),
            Tool::new(
                "delete_volume",
                "Deletes a volume and its data",
                id("volume_id"),
            )
            .with_annotations(ToolAnnotations::new().destructive(true)),
            Tool::new("delete_backup", "Deletes a backup", id("backup_id"))
                .with_annotations(ToolAnnotations::new().destructive(true)),
            Tool::new("shell", "Runs a command", id("command")),
        ]
    }

    fn record(
        &self,
        method: &str,
        tool: Option<String>,
        arguments: Value,
        context: &RequestContext<RoleServer>,
    ) {
        let headers = context
            .extensions
            .get::<http::request::Parts>()
            .map(|parts| {
                parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(log) = &self.log {
            let env: Vec<(String, String)> = std::env::vars().collect();
            let line =
                json!({"method": method, "tool": tool, "arguments": arguments, "headers": env});
            use std::io::Write;
            if let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = writeln!(file, "{line}");
            }
        }
        self.state.lock().expect("lock").seen.push(UpstreamCall {
            method: method.into(),
            tool,
            arguments,
            headers,
        });
    }

    /// Serves one session on stdin/stdout (the gateway's child process), logging to `log`.
    pub async fn serve_stdio(log: std::path::PathBuf) {
        let server = Railway {
            log: Some(log),
            ..Railway::default()
        };
        if let Ok(running) = server.serve(rmcp::transport::stdio()).await {
            let _ = running.waiting().await;
        }
    }

    /// What a stdio server logged.
    pub fn read_log(log: &std::path::Path) -> Vec<UpstreamCall> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .map(|v| UpstreamCall {
                method: v["method"].as_str().unwrap_or_default().to_owned(),
                tool: v["tool"].as_str().map(str::to_owned),
                arguments: v["arguments"].clone(),
                headers: v["headers"]
                    .as_array()
                    .map(|pairs| {
                        pairs
                            .iter()
                            .map(|p| {
                                (
                                    p[0].as_str().unwrap_or_default().to_owned(),
                                    p[1].as_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Serves over Streamable HTTP on a free port; returns the endpoint URL.
    pub async fn start(&self) -> String {
        let server = self.clone();
        let service: StreamableHttpService<Railway, LocalSessionManager> =
            StreamableHttpService::new(
                move || Ok(server.clone()),
                Arc::new(LocalSessionManager::default()),
                StreamableHttpServerConfig::default(),
            );
        let router = axum::Router::new().nest_service("/mcp", service);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://127.0.0.1:{port}/mcp")
    }
}

impl ServerHandler for Railway {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        self.record("tools/list", None, Value::Null, &context);
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let arguments = Value::Object(request.arguments.clone().unwrap_or_default());
        self.record(
            "tools/call",
            Some(request.name.to_string()),
            arguments.clone(),
            &context,
        );
        Ok(CallToolResult::success(vec![ContentBlock::text(format!(
            "railway did {} {arguments}",
            request.name
        ))])
        .into())
    }
}

/// The gateway's tool map for the Railway server, in prod.
pub const RAILWAY_TOOLS: &str = r#"
[[servers.tools]]
name = "list_volumes"
resource = "http://railway/volumes"
verb = "read"

[[servers.tools]]
name = "get_volume"
resource = "http://railway/volumes/{/volume_id}"
verb = "read"

[[servers.tools]]
name = "delete_volume"
resource = "http://railway/volumes/{/volume_id}"
verb = "delete"

[[servers.tools]]
name = "delete_backup"
resource = "http://railway/backups/{/backup_id}"
verb = "delete"
"#;

pub struct GatewayProcess {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// The agent-facing endpoint of one upstream server.
    pub fn url(&self, server: &str) -> String {
        format!("http://127.0.0.1:{}/mcp/{server}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `capgate proxy mcp` in front of `railway_url` as server `railway`.
pub async fn start_gateway(broker_url: &str, railway_url: &str, tools: &str) -> GatewayProcess {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = format!(
        r#"
listen = "127.0.0.1:{port}"
broker = "{broker_url}"
environment = "prod"
name = "railway-proxy"
adapter_policies = "{policies}"
max_staleness = "2s"
adapter_key_env = "CAPGATE_TEST_ADAPTER_KEY"
audit_spool = "{spool}"

[[servers]]
name = "railway"
url = "{railway_url}"
credential_env = "CAPGATE_TEST_MCP_SECRET"
{tools}
"#,
        policies = repo().join("policies/adapters").display(),
        spool = dir.path().join("spool.jsonl").display(),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).expect("config");
    let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["proxy", "mcp", "--config"])
        .arg(&path)
        .env("CAPGATE_TEST_MCP_SECRET", MCP_SECRET)
        .env("CAPGATE_TEST_ADAPTER_KEY", super::ADAPTER_KEY)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn gateway");
    let gateway = GatewayProcess { port, child, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return gateway;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway did not start; log:\n{}", gateway.log());
}

pub type Agent = RunningService<RoleClient, ()>;

/// An SDK client (2025 era: initialize, session) sending `token` as its bearer credential.
pub async fn connect(url: &str, token: Option<&str>) -> Result<Agent, String> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url);
    if let Some(token) = token {
        config = config.auth_header(token.to_owned());
    }
    ().serve(StreamableHttpClientTransport::from_config(config))
        .await
        .map_err(|e| e.to_string())
}

/// Connects once the gateway has synced keys (until then every request is refused).
pub async fn connect_when_ready(url: &str, token: &str) -> Agent {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match connect(url, Some(token)).await {
            Ok(agent) => return agent,
            Err(e) => assert!(Instant::now() < deadline, "never connected: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Calls a tool; returns (is_error, text of the first content block).
pub async fn call(agent: &Agent, tool: &str, arguments: Value) -> (bool, String) {
    let Value::Object(arguments) = arguments else {
        panic!("arguments must be an object")
    };
    let result = agent
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
        .await
        .expect("tools/call answered");
    let text = result
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .unwrap_or_default();
    (result.is_error == Some(true), text)
}

/// The names `tools/list` shows this agent, sorted.
pub async fn listed(agent: &Agent) -> Vec<String> {
    let mut names: Vec<String> = agent
        .list_all_tools()
        .await
        .expect("tools/list answered")
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    names
}

/// Waits until the gateway has synced keys and revocations (the first calls are denied
/// with `revocation_feed_stale` until then).
pub async fn wait_synced(agent: &Agent, tool: &str, arguments: Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (is_error, text) = call(agent, tool, arguments.clone()).await;
        if !is_error {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gateway never allowed {tool}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
