//! The MCP gateway against the same MCP server called directly, on loopback, with the
//! official SDK as client and server on both paths: `tools/call` latency p50/p99 (sequential
//! calls in one session) and throughput (concurrent sessions), printed as ratios to direct.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use capgate::adapters::mcp::{Gateway, McpConfig, ServerConfig, ToolConfig};
use capgate::adapters::Mode;
use capgate::config::RunLimits;
use capgate::guard::{ContainmentView, Ledger};
use capgate::revocation::RevocationView;
use capgate::scope::Verb;
use capgate::token::{encode, mint, random_id, GrantedRight, Keyring, TokenSpec};
use capgate_test_support::NoBroker;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, JsonObject,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig as Info, Tool,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ErrorData, RoleClient, RoleServer, ServerHandler, ServiceExt};
use serde_json::json;

#[derive(Clone)]
struct Volumes;

impl ServerHandler for Volumes {
    fn get_info(&self) -> Info {
        Info::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let mut schema = JsonObject::new();
        schema.insert("type".into(), json!("object"));
        Ok(ListToolsResult::with_all_items(vec![Tool::new(
            "get_volume",
            "Shows one volume",
            Arc::new(schema),
        )]))
    }

    async fn call_tool(
        &self,
        _: CallToolRequestParams,
        _: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        Ok(CallToolResult::success(vec![ContentBlock::text("ok")]).into())
    }
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

type Agent = RunningService<RoleClient, ()>;

async fn connect(url: &str, token: Option<&str>) -> Agent {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url);
    if let Some(token) = token {
        config = config.auth_header(token.to_owned());
    }
    ().serve(StreamableHttpClientTransport::from_config(config))
        .await
        .expect("session")
}

async fn call(agent: &Agent) {
    let mut arguments = JsonObject::new();
    arguments.insert("volume_id".into(), json!("vol_1"));
    let result = agent
        .call_tool(CallToolRequestParams::new("get_volume").with_arguments(arguments))
        .await
        .expect("call");
    assert_ne!(result.is_error, Some(true), "{result:?}");
}

async fn latencies(agent: &Agent, n: usize) -> (Duration, Duration) {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        call(agent).await;
        samples.push(start.elapsed());
    }
    samples.sort();
    (samples[n / 2], samples[n * 99 / 100])
}

async fn throughput(url: &str, token: Option<&str>, sessions: usize, window: Duration) -> f64 {
    let mut agents = Vec::new();
    for _ in 0..sessions {
        agents.push(Arc::new(connect(url, token).await));
    }
    let start = Instant::now();
    let tasks: Vec<_> = agents
        .into_iter()
        .map(|agent| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while start.elapsed() < window {
                    call(&agent).await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (keyring, _) = Keyring::open_or_create(dir.path()).expect("keys");
    let now = SystemTime::now();
    let token = encode(
        &mint(
            &TokenSpec {
                row_budget: None,
                use_budget: None,
                agent: "bench".into(),
                session_id: random_id(),
                rights: vec![GrantedRight {
                    resource: "http://railway/volumes/".parse().expect("r"),
                    verb: Verb::Read,
                    environment: "prod".into(),
                }],
                issued_at: now,
                expires_at: now + Duration::from_secs(3600),
            },
            keyring.active_key_id(),
            keyring.signing_key(),
        )
        .expect("mint"),
    )
    .expect("encode");

    let service: StreamableHttpService<Volumes, LocalSessionManager> = StreamableHttpService::new(
        || Ok(Volumes),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let upstream = format!(
        "{}/mcp",
        serve(axum::Router::new().nest_service("/mcp", service)).await
    );
    let config = McpConfig {
        listen: None,
        broker: "http://127.0.0.1:1".into(),
        environment: "prod".into(),
        name: "bench".into(),
        mode: Mode::Enforce,
        adapter_policies: Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/adapters"),
        max_staleness: Duration::from_secs(7200),
        max_token_bytes: 16 * 1024,
        datalog: RunLimits::default(),
        adapter_key_env: None,
        audit_spool: dir.path().join("spool.jsonl"),
        pin_file: dir.path().join("pins.json"),
        max_message_bytes: 1 << 20,
        allowed_hosts: vec!["127.0.0.1".into()],
        approval_url: None,
        servers: vec![ServerConfig {
            name: "railway".into(),
            url: Some(upstream.clone()),
            command: None,
            credential_env: None,
            credential_header: "authorization".into(),
            credential_prefix: "Bearer ".into(),
            credential_child_env: None,
            tools: vec![ToolConfig {
                name: "get_volume".into(),
                resource: "http://railway/volumes/{/volume_id}".into(),
                verb: Verb::Read,
                digest: None,
            }],
            resources: Vec::new(),
            prompts: Vec::new(),
        }],
    };
    let view = Arc::new(RevocationView::new());
    view.apply(&[], Instant::now() + Duration::from_secs(3600));
    let keys = Arc::new(RwLock::new(Arc::new(
        keyring.public_keys().expect("public"),
    )));
    let ledger: Arc<dyn Ledger> = Arc::new(NoBroker);
    let gateway = Arc::new(
        Gateway::new(config, keys, view, Arc::new(ContainmentView::new()), ledger)
            .expect("gateway"),
    );
    let gateway_url = format!(
        "{}/mcp/railway",
        serve(capgate::adapters::mcp::transport::router(
            gateway,
            tokio_util::sync::CancellationToken::new()
        ))
        .await
    );

    let direct = connect(&upstream, None).await;
    let gated = connect(&gateway_url, Some(&token)).await;
    latencies(&direct, 200).await;
    latencies(&gated, 200).await;
    let (d50, d99) = latencies(&direct, 2000).await;
    let (g50, g99) = latencies(&gated, 2000).await;
    let window = Duration::from_secs(3);
    let direct_rps = throughput(&upstream, None, 8, window).await;
    let gated_rps = throughput(&gateway_url, Some(&token), 8, window).await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "tools/call latency direct:  p50 {:.3} ms  p99 {:.3} ms",
        ms(d50),
        ms(d99)
    );
    println!(
        "tools/call latency gateway: p50 {:.3} ms  p99 {:.3} ms",
        ms(g50),
        ms(g99)
    );
    println!(
        "p50 added by the gateway: {:.3} ms, p50 ratio {:.2}x, p99 ratio {:.2}x",
        ms(g50) - ms(d50),
        ms(g50) / ms(d50),
        ms(g99) / ms(d99)
    );
    println!(
        "throughput (8 sessions): direct {:.0} calls/s, gateway {:.0} calls/s: {:.0}% of direct",
        direct_rps,
        gated_rps,
        100.0 * gated_rps / direct_rps
    );
    println!(
        "(client, gateway and server share {} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
}
