//! Incident replay: the cascade in which a coding agent deleted a production volume and the
//! backups stored with it, replayed against Capgate.
//!
//! It starts a Railway-like API (volumes and backups, in memory), the real broker (with
//! `capgate.toml`'s policies, keys and containment in a temporary data directory), and the real
//! HTTP proxy in front of the API for prod and for staging. A scripted `deploy-bot` agent,
//! holding exactly what the example policy grants it, then runs the cascade. Each step prints
//! what happened; the approval request an operator would see is printed in full.
//!
//! ```sh
//! cargo run --example incident_replay
//! ```
//!
//! The MCP part puts the same API behind an MCP server (the official SDK's) and the real MCP
//! gateway, and the agent tries the deletes again as tool calls.
//! The GraphQL part replays the call as it really was: one `volumeDelete` mutation POSTed to
//! Railway's single endpoint, through the proxy's GraphQL adapter (`examples/railway-graphql.toml`
//! over Railway's real schema, read from `../shared/data/railway` or `CAPGATE_RAILWAY_DATA`),
//! against a Railway-like GraphQL server that records what reaches it. The agent holds a token
//! for staging; the adapter asks the server which environment each volume lives in.
//!
//! The database part runs the real PostgreSQL proxy in front of the local PostgreSQL
//! (127.0.0.1:5432, database `test`, as README's test setup has it) as the `prod` database.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::routing::{delete, get};
use axum::{Json, Router};
use capgate::adapters::http::{Proxy, ProxyConfig};
use capgate::adapters::ledger::BrokerLedger;
use capgate::adapters::sync::{empty_keys, spawn, SyncConfig};
use capgate::broker::BrokerState;
use capgate::client::Client;
use capgate::config::BrokerConfig;
use capgate::guard::{ContainmentView, Ledger};
use capgate::revocation::RevocationView;
use serde_json::Value;

/// The demo deploy-bot key and adapter key from `capgate.toml` (public demo values).
const DEPLOY_BOT_KEY: &str = "cgk_ef3d9d5f0792cebce732585f5521f2be";
const ADAPTER_KEY: &str = "cga_f5c677a8f75b9f559198b22282d27c16";

/// The Railway-like API's state: what exists, per environment.
#[derive(Clone, Default)]
pub struct Infrastructure {
    pub volumes: Arc<Mutex<BTreeMap<String, String>>>,
    pub backups: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Infrastructure {
    fn seeded() -> Self {
        let infra = Infrastructure::default();
        if let (Ok(mut v), Ok(mut b)) = (infra.volumes.lock(), infra.backups.lock()) {
            v.insert("vol_prod".into(), "production database volume".into());
            v.insert("vol_staging".into(), "staging database volume".into());
            b.insert("bk_prod_1".into(), "nightly backup of vol_prod".into());
            b.insert("bk_prod_2".into(), "weekly backup of vol_prod".into());
        }
        infra
    }

    pub fn counts(&self) -> (usize, usize) {
        let v = self.volumes.lock().map(|v| v.len()).unwrap_or(0);
        let b = self.backups.lock().map(|b| b.len()).unwrap_or(0);
        (v, b)
    }
}

fn railway_api(infra: Infrastructure) -> Router {
    Router::new()
        .route(
            "/v2/volumes",
            get(|State(i): State<Infrastructure>| async move {
                Json(
                    i.volumes
                        .lock()
                        .map(|v| v.keys().cloned().collect::<Vec<_>>())
                        .unwrap_or_default(),
                )
            }),
        )
        .route(
            "/v2/volumes/{id}",
            delete(
                |State(i): State<Infrastructure>, UrlPath(id): UrlPath<String>| async move {
                    let removed = i.volumes.lock().ok().and_then(|mut v| v.remove(&id));
                    format!("deleted volume {id}: {}", removed.is_some())
                },
            ),
        )
        .route(
            "/v2/backups/{id}",
            delete(
                |State(i): State<Infrastructure>, UrlPath(id): UrlPath<String>| async move {
                    let removed = i.backups.lock().ok().and_then(|mut b| b.remove(&id));
                    format!("deleted backup {id}: {}", removed.is_some())
                },
            ),
        )
        .with_state(infra)
}

async fn serve(router: Router) -> Result<String, Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(format!("http://{addr}"))
}

/// One step of the cascade and what Capgate answered.
#[derive(Debug, Clone)]
pub struct Step {
    pub action: String,
    pub status: u16,
    pub code: String,
}

pub struct Report {
    pub steps: Vec<Step>,
    /// The cascade again as MCP tool calls through the gateway.
    pub mcp_steps: Vec<Step>,
    /// The GraphQL cascade, and what an operator sees for its one approvable delete.
    pub graphql: GraphqlReport,
    pub infra: Infrastructure,
    pub approval_request: Option<Value>,
    /// Rows left in the production bookings table (50 before).
    pub bookings: i64,
}

async fn start_proxy(
    config: ProxyConfig,
    client: &Client,
) -> Result<String, Box<dyn std::error::Error>> {
    let keys = empty_keys();
    let revocations = Arc::new(RevocationView::new());
    let containment = Arc::new(ContainmentView::new());
    spawn(
        SyncConfig::new(&config.broker),
        revocations.clone(),
        keys.clone(),
        containment.clone(),
    )?;
    let ledger: Arc<dyn Ledger> = Arc::new(BrokerLedger::new(
        client.clone(),
        Some(ADAPTER_KEY.into()),
        None,
    ));
    let proxy = Arc::new(Proxy::new(config, keys, revocations, containment, ledger)?);
    serve(proxy.router()).await
}

/// Runs the whole scenario and returns what happened.
pub async fn run(quiet: bool) -> Result<Report, Box<dyn std::error::Error>> {
    let say = |line: String| {
        if !quiet {
            println!("{line}");
        }
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tempfile::tempdir()?;

    // The broker, as configured in capgate.toml, with its own temporary data directory.
    let mut config = BrokerConfig::load(&root.join("capgate.toml"))?;
    config.data_dir = data.path().join("data");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let broker_url = format!("http://{}", listener.local_addr()?);
    let state = BrokerState::open(config).await?;
    tokio::spawn(capgate::broker::run(
        listener,
        state,
        std::future::pending(),
    ));

    // The Railway-like API, fronted by one proxy per environment.
    let infra = Infrastructure::seeded();
    let api = serve(railway_api(infra.clone())).await?;
    let credential = data.path().join("railway-token");
    std::fs::write(&credential, "railway-api-token-the-agent-never-sees")?;
    let mut prod = ProxyConfig::load(&root.join("examples/railway-proxy.toml"))?;
    prod.broker = broker_url.clone();
    prod.upstream.url = api.clone();
    prod.upstream.credential_env = None;
    prod.upstream.credential_file = Some(credential.clone());
    let mut staging = prod.clone();
    staging.environment = "staging".into();
    staging.name = "railway-staging".into();
    for route in &mut staging.routes {
        route.resource = route
            .resource
            .replace("http://railway/", "http://railway-staging/");
    }
    let client = Client::new(&broker_url)?;
    let prod_url = start_proxy(prod, &client).await?;
    let staging_url = start_proxy(staging, &client).await?;

    // The agent at startup: a token with exactly what the example policy grants deploy-bot.
    let scopes = [
        "http://railway/volumes:read",
        "http://railway/volumes/:read",
        "http://railway-staging/volumes/:write",
        "http://railway-staging/volumes/:delete",
    ]
    .iter()
    .map(|s| s.parse())
    .collect::<Result<Vec<_>, _>>()?;
    let token = client
        .request_token(DEPLOY_BOT_KEY, &scopes, None)
        .await?
        .token;
    say(format!(
        "deploy-bot holds a token for: {}",
        scopes
            .iter()
            .map(|s: &capgate::scope::Scope| s.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    // Even its own token cannot obtain more: prod deletes and backups are refused at issuance.
    let refused = client
        .request_token(
            DEPLOY_BOT_KEY,
            &[
                "http://railway/volumes/vol_prod:delete".parse()?,
                "http://railway/backups/:delete".parse()?,
            ],
            None,
        )
        .await;
    if let Err(e) = &refused {
        say(format!(
            "asking for prod delete and backups delete: refused at issuance ({e})"
        ));
    }

    let http = reqwest::Client::new();
    // Wait until both proxies synced keys and containment settings.
    for url in [&prod_url, &staging_url] {
        for _ in 0..100 {
            let status = http
                .get(format!("{url}/v2/volumes"))
                .bearer_auth(&token)
                .send()
                .await?
                .status();
            if status != 503 && status != 401 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let mut steps = Vec::new();
    let mut approval_id = None;
    let cascade = [
        ("list volumes (prod)", "GET", &prod_url, "/v2/volumes"),
        (
            "delete the production volume",
            "DELETE",
            &prod_url,
            "/v2/volumes/vol_prod",
        ),
        (
            "delete the backups",
            "DELETE",
            &prod_url,
            "/v2/backups/bk_prod_1",
        ),
        (
            "delete the backups (second one)",
            "DELETE",
            &prod_url,
            "/v2/backups/bk_prod_2",
        ),
        (
            "delete the volume the agent thinks is staging",
            "DELETE",
            &staging_url,
            "/v2/volumes/vol_staging",
        ),
    ];
    for (action, method, base, path) in cascade {
        let response = http
            .request(method.parse()?, format!("{base}{path}"))
            .bearer_auth(&token)
            .send()
            .await?;
        let status = response.status().as_u16();
        if let Some(id) = response
            .headers()
            .get("capgate-approval-id")
            .and_then(|v| v.to_str().ok())
        {
            approval_id = Some(id.to_owned());
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["code"]
            .as_str()
            .unwrap_or(if status == 200 { "allowed" } else { "?" })
            .to_owned();
        say(format!(
            "{action:<48} {method:<6} {path:<26} -> {status} {code}"
        ));
        steps.push(Step {
            action: action.into(),
            status,
            code,
        });
    }
    // The same agent, the same API, as MCP tools behind the gateway.
    let mcp_steps = mcp_leg(&broker_url, &client, &infra, &token, &data, &say).await?;

    // The database: production bookings behind the PostgreSQL proxy.
    let table = format!("incident_bookings_{}", &capgate::token::random_id()[..8]);
    let (direct, connection) = tokio_postgres::connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=test",
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(connection);
    direct
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int primary key, guest text); INSERT INTO {table} SELECT g, 'guest ' || g FROM generate_series(1, 50) g;"
        ))
        .await?;
    let pg_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let pg_addr = pg_listener.local_addr()?;
    let pg_config: capgate::adapters::pg::PgProxyConfig = toml::from_str(&format!(
        "listen = \"{pg_addr}\"\nbroker = \"{broker_url}\"\nenvironment = \"prod\"\ndatabase = \"prod\"\nname = \"pg-prod\"\nadapter_policies = \"{}\"\n[upstream]\naddr = \"127.0.0.1:5432\"\ndatabase = \"test\"\nuser = \"postgres\"\n",
        root.join("policies/adapters").display()
    ))?;
    let keys = empty_keys();
    let revocations = Arc::new(RevocationView::new());
    let containment = Arc::new(ContainmentView::new());
    spawn(
        SyncConfig::new(&broker_url),
        revocations.clone(),
        keys.clone(),
        containment.clone(),
    )?;
    let ledger: Arc<dyn Ledger> = Arc::new(BrokerLedger::new(
        client.clone(),
        Some(ADAPTER_KEY.into()),
        None,
    ));
    let pg_proxy = Arc::new(capgate::adapters::pg::PgProxy::new(
        pg_config,
        keys,
        revocations,
        containment,
        ledger,
    )?);
    tokio::spawn(pg_proxy.serve(pg_listener));
    let db_token = client
        .request_token(DEPLOY_BOT_KEY, &["pg://prod/:read".parse()?], None)
        .await?
        .token;
    let mut attempt = 0;
    let agent_db = loop {
        let config = format!(
            "host=127.0.0.1 port={} user=deploy-bot password={db_token} dbname=prod",
            pg_addr.port()
        );
        if let Ok((db, connection)) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            if db.simple_query("SELECT 1").await.is_ok() {
                break db;
            }
        }
        attempt += 1;
        if attempt > 50 {
            return Err("the PostgreSQL proxy never accepted the agent".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (action, sql) in [
        (
            "read bookings (prod database)",
            format!("SELECT count(*) FROM {table}"),
        ),
        ("DROP DATABASE", "DROP DATABASE test".to_owned()),
        ("mass DELETE", format!("DELETE FROM {table}")),
        (
            "DROP TABLE hidden after a SELECT",
            format!("SELECT 1; DROP TABLE {table}"),
        ),
    ] {
        let (status, code) = match agent_db.simple_query(&sql).await {
            Ok(_) => (200, "allowed".to_owned()),
            Err(e) => {
                let message = e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| e.to_string());
                let code = ["policy_denied", "approval_required", "token_revoked"]
                    .into_iter()
                    .find(|c| message.contains(c))
                    .unwrap_or("denied");
                (403, code.to_owned())
            }
        };
        let shown: String = sql.chars().take(26).collect();
        say(format!(
            "{action:<48} SQL    {shown:<26} -> {status} {code}"
        ));
        steps.push(Step {
            action: action.into(),
            status,
            code,
        });
    }
    let bookings: i64 = direct
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    direct.batch_execute(&format!("DROP TABLE {table}")).await?;

    // What the on-call operator sees for the one delete that could be approved.
    let approval_request = match &approval_id {
        Some(id) => Some(
            client
                .approval(&token, id)
                .await
                .map(|a| serde_json::to_value(a).unwrap_or(Value::Null))?,
        ),
        None => None,
    };
    if let Some(request) = &approval_request {
        say("\nthe approval request an operator sees (`capgate approvals list`):".into());
        say(serde_json::to_string_pretty(request).unwrap_or_default());
    }
    let (volumes, backups) = infra.counts();
    say(format!(
        "\nafter the cascade: {volumes} volumes, {backups} backups and {bookings} bookings still exist (2, 2 and 50 before)"
    ));
    let graphql = graphql_cascade(root, &broker_url, &client, &data, say).await?;
    Ok(Report {
        steps,
        mcp_steps,
        graphql,
        infra,
        approval_request,
        bookings,
    })
}

/// The Railway-like API as an MCP server: the tools an agent would be given.
#[derive(Clone)]
struct RailwayTools {
    infra: Infrastructure,
}

impl rmcp::ServerHandler for RailwayTools {
    fn get_info(&self) -> rmcp::model::ServerConfig {
        rmcp::model::ServerConfig::new(
            rmcp::model::ServerCapabilities::builder()
                .enable_tools()
                .build(),
        )
    }

    async fn list_tools(
        &self,
        _: Option<rmcp::model::PaginatedRequestParams>,
        _: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, rmcp::ErrorData> {
        let schema = |property: &str| {
            let mut object = rmcp::model::JsonObject::new();
            object.insert("type".into(), "object".into());
            object.insert(
                "properties".into(),
                serde_json::json!({ property: {"type": "string"} }),
            );
            Arc::new(object)
        };
        Ok(rmcp::model::ListToolsResult::with_all_items(vec![
            rmcp::model::Tool::new("list_volumes", "Lists volumes", schema("none")),
            rmcp::model::Tool::new("delete_volume", "Deletes a volume", schema("volume_id")),
            rmcp::model::Tool::new("delete_backup", "Deletes a backup", schema("backup_id")),
        ]))
    }

    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        _: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        let argument = |name: &str| {
            request
                .arguments
                .as_ref()
                .and_then(|a| a.get(name))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let text = match request.name.as_ref() {
            "delete_volume" => {
                let id = argument("volume_id");
                let removed = self
                    .infra
                    .volumes
                    .lock()
                    .ok()
                    .and_then(|mut v| v.remove(&id));
                format!("deleted volume {id}: {}", removed.is_some())
            }
            "delete_backup" => {
                let id = argument("backup_id");
                let removed = self
                    .infra
                    .backups
                    .lock()
                    .ok()
                    .and_then(|mut b| b.remove(&id));
                format!("deleted backup {id}: {}", removed.is_some())
            }
            _ => format!(
                "{:?}",
                self.infra
                    .volumes
                    .lock()
                    .map(|v| v.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
            ),
        };
        Ok(
            rmcp::model::CallToolResult::success(vec![rmcp::model::ContentBlock::text(text)])
                .into(),
        )
    }
}

/// The MCP leg: the gateway (configured as `examples/mcp-gateway.toml`) in front of the
/// Railway MCP server; the agent lists volumes, then tries the volume and backup deletes.
async fn mcp_leg(
    broker_url: &str,
    client: &Client,
    infra: &Infrastructure,
    token: &str,
    data: &tempfile::TempDir,
    say: &impl Fn(String),
) -> Result<Vec<Step>, Box<dyn std::error::Error>> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    use rmcp::ServiceExt;
    let tools = RailwayTools {
        infra: infra.clone(),
    };
    let service: StreamableHttpService<RailwayTools, LocalSessionManager> =
        StreamableHttpService::new(
            move || Ok(tools.clone()),
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default(),
        );
    let server = serve(Router::new().nest_service("/mcp", service)).await?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config =
        capgate::adapters::mcp::McpConfig::load(&root.join("examples/mcp-gateway.toml"))?;
    config.broker = broker_url.to_owned();
    config.name = "railway-prod".into();
    config.adapter_key_env = None;
    // The replay's pins are its own, never a file beside the example configuration.
    config.pin_file = data.path().join("mcp-pins.json");
    for upstream in &mut config.servers {
        upstream.url = Some(format!("{server}/mcp"));
        upstream.credential_env = None;
    }
    let keys = empty_keys();
    let revocations = Arc::new(RevocationView::new());
    let containment = Arc::new(ContainmentView::new());
    spawn(
        SyncConfig::new(broker_url),
        revocations.clone(),
        keys.clone(),
        containment.clone(),
    )?;
    let ledger: Arc<dyn Ledger> = Arc::new(BrokerLedger::new(
        client.clone(),
        Some(ADAPTER_KEY.into()),
        None,
    ));
    let gateway = Arc::new(capgate::adapters::mcp::Gateway::new(
        config,
        keys,
        revocations,
        containment,
        ledger,
    )?);
    let gateway_url = serve(capgate::adapters::mcp::router(
        gateway,
        tokio_util::sync::CancellationToken::new(),
    ))
    .await?;
    let call = |agent: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
                tool: &str,
                argument: Option<(&str, &str)>| {
        let mut arguments = rmcp::model::JsonObject::new();
        if let Some((name, value)) = argument {
            arguments.insert(name.into(), value.into());
        }
        let request =
            rmcp::model::CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments);
        let peer = agent.peer().clone();
        async move {
            let result = peer.call_tool(request).await.ok()?;
            let text = result.content.first()?.as_text()?.text.clone();
            Some((result.is_error == Some(true), text))
        }
    };
    // The agent connects once the gateway has synced keys (until then it is refused).
    let mut agent = None;
    for _ in 0..100 {
        let transport =
            rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
                format!("{gateway_url}/mcp/railway"),
            )
            .auth_header(token.to_owned());
        if let Ok(connected) = ()
            .serve(rmcp::transport::StreamableHttpClientTransport::from_config(
                transport,
            ))
            .await
        {
            if matches!(
                call(&connected, "list_volumes", None).await,
                Some((false, _))
            ) {
                agent = Some(connected);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = agent.ok_or("the MCP gateway never accepted the agent")?;
    let mut steps = Vec::new();
    for (action, tool, argument) in [
        ("list volumes (MCP tool)", "list_volumes", None),
        (
            "delete the production volume (MCP tool)",
            "delete_volume",
            Some(("volume_id", "vol_prod")),
        ),
        (
            "delete the backups (MCP tool)",
            "delete_backup",
            Some(("backup_id", "bk_prod_1")),
        ),
    ] {
        let (is_error, text) = call(&agent, tool, argument)
            .await
            .ok_or("the MCP gateway did not answer")?;
        let code = if is_error {
            text.split(['(', ')']).nth(1).unwrap_or("?").to_owned()
        } else {
            "allowed".to_owned()
        };
        let status = if is_error { 403 } else { 200 };
        say(format!("{action:<48} MCP    {tool:<26} -> {status} {code}"));
        steps.push(Step {
            action: action.into(),
            status,
            code,
        });
    }
    Ok(steps)
}

/// The GraphQL cascade's outcome.
#[derive(Debug, Default)]
pub struct GraphqlReport {
    pub steps: Vec<Step>,
    /// Mutations that reached the Railway-like server (its own lookups excluded).
    pub mutations_reaching_upstream: Vec<String>,
    /// Volumes and backups left (3 and 2 before).
    pub counts: (usize, usize),
    pub approval_request: Option<Value>,
}

/// Railway's environment ids as the GraphQL adapter's example maps them.
const PROD_ENV: &str = "env-production-id";
const STAGING_ENV: &str = "env-staging-id";

/// A volume's name and the environments its instances live in.
type Volume = (String, Vec<&'static str>);

/// A Railway-like GraphQL server: volumes with their instances' environments, backups on
/// volume instances, and the root fields the agent and the adapter use. It executes what
/// reaches it and records every mutation.
#[derive(Clone, Default)]
struct RailwayGraphql {
    volumes: Arc<Mutex<BTreeMap<String, Volume>>>,
    backups: Arc<Mutex<BTreeMap<String, &'static str>>>,
    mutations: Arc<Mutex<Vec<String>>>,
}

impl RailwayGraphql {
    fn seeded() -> Self {
        let railway = RailwayGraphql::default();
        if let (Ok(mut v), Ok(mut b)) = (railway.volumes.lock(), railway.backups.lock()) {
            // The volume the agent took for staging's: it is production's database volume.
            v.insert(
                "vol_7f3a".into(),
                ("postgres-volume".into(), vec![PROD_ENV]),
            );
            v.insert(
                "vol_staging".into(),
                ("postgres-volume-staging".into(), vec![STAGING_ENV]),
            );
            v.insert("vol_cache".into(), ("redis-volume".into(), vec![PROD_ENV]));
            b.insert("bk_nightly".into(), "vi_prod");
            b.insert("bk_weekly".into(), "vi_prod");
        }
        railway
    }

    fn counts(&self) -> (usize, usize) {
        let v = self.volumes.lock().map(|v| v.len()).unwrap_or(0);
        let b = self.backups.lock().map(|b| b.len()).unwrap_or(0);
        (v, b)
    }

    /// Executes one request's root fields (literal or variable string arguments).
    fn execute(&self, request: &Value) -> Value {
        use apollo_compiler::ast::{Definition, Selection, Value as Literal};
        let query = request["query"].as_str().unwrap_or_default();
        let variables = &request["variables"];
        let Ok(document) = apollo_compiler::ast::Document::parse(query, "request.graphql") else {
            return serde_json::json!({"errors": [{"message": "syntax error"}]});
        };
        let mut data = serde_json::Map::new();
        for definition in &document.definitions {
            let Definition::OperationDefinition(operation) = definition else {
                continue;
            };
            if let Some(name) = request["operationName"].as_str() {
                if operation.name.as_deref() != Some(name) {
                    continue;
                }
            }
            let mutation =
                operation.operation_type == apollo_compiler::ast::OperationType::Mutation;
            for selection in &operation.selection_set {
                let Selection::Field(field) = selection else {
                    continue;
                };
                let arg = |name: &str| {
                    field
                        .arguments
                        .iter()
                        .find(|a| a.name == name)
                        .and_then(|a| match a.value.as_ref() {
                            Literal::String(s) => Some(s.clone()),
                            Literal::Variable(v) => {
                                variables[v.as_str()].as_str().map(str::to_owned)
                            }
                            _ => None,
                        })
                };
                if mutation {
                    if let Ok(mut log) = self.mutations.lock() {
                        log.push(format!(
                            "{}({})",
                            field.name,
                            field
                                .arguments
                                .iter()
                                .map(|a| format!("{}: {}", a.name, a.value))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                }
                let key = field.alias.as_ref().unwrap_or(&field.name).to_string();
                let value = match field.name.as_str() {
                    "project" => {
                        let volumes = self.volumes.lock().map(|v| v.clone()).unwrap_or_default();
                        let edges: Vec<Value> = volumes
                            .iter()
                            .map(|(id, (name, envs))| {
                                let instances: Vec<Value> = envs
                                    .iter()
                                    .map(|e| serde_json::json!({"node": {"environmentId": e}}))
                                    .collect();
                                serde_json::json!({"node": {"id": id, "name": name, "volumeInstances": {"edges": instances}}})
                            })
                            .collect();
                        serde_json::json!({"volumes": {"edges": edges}})
                    }
                    "volumeInstance" => {
                        let env = match arg("id").as_deref() {
                            Some("vi_prod") => PROD_ENV,
                            _ => STAGING_ENV,
                        };
                        serde_json::json!({"environmentId": env})
                    }
                    "volumeDelete" => {
                        let id = arg("volumeId").unwrap_or_default();
                        Value::Bool(
                            self.volumes
                                .lock()
                                .ok()
                                .and_then(|mut v| v.remove(&id))
                                .is_some(),
                        )
                    }
                    "volumeInstanceBackupDelete" => {
                        let id = arg("volumeInstanceBackupId").unwrap_or_default();
                        let removed = self.backups.lock().ok().and_then(|mut b| b.remove(&id));
                        serde_json::json!({"workflowId": removed.map(|_| "wf_1")})
                    }
                    _ => Value::Null,
                };
                data.insert(key, value);
            }
        }
        serde_json::json!({"data": data})
    }
}

async fn graphql_cascade(
    root: &Path,
    broker_url: &str,
    client: &Client,
    data: &tempfile::TempDir,
    say: impl Fn(String),
) -> Result<GraphqlReport, Box<dyn std::error::Error>> {
    let railway_data = std::env::var_os("CAPGATE_RAILWAY_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/data/railway"));
    if !railway_data.join("schema.json").is_file() {
        let missing = format!(
            "Railway's schema is missing at {} (set CAPGATE_RAILWAY_DATA)",
            railway_data.display()
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            return Err(missing.into());
        }
        eprintln!("\n!!! the GraphQL part is SKIPPED: {missing} !!!\n");
        return Ok(GraphqlReport::default());
    }
    let railway = RailwayGraphql::seeded();
    let server = railway.clone();
    let api = serve(Router::new().route(
        "/graphql/v2",
        axum::routing::post(move |Json(request): Json<Value>| {
            let server = server.clone();
            async move { Json(server.execute(&request)) }
        }),
    ))
    .await?;
    let credential = data.path().join("railway-graphql-token");
    std::fs::write(&credential, "railway-api-token-the-agent-never-sees")?;
    let mut config = ProxyConfig::load(&root.join("examples/railway-graphql.toml"))?;
    config.broker = broker_url.to_owned();
    config.name = "railway-prod".into();
    config.audit_spool = data.path().join("graphql-spool.jsonl");
    config.upstream.url = api;
    config.upstream.credential_env = None;
    config.upstream.credential_file = Some(credential);
    for endpoint in &mut config.graphql {
        endpoint.schema = railway_data.join("schema.json");
    }
    let url = format!("{}/graphql/v2", start_proxy(config, client).await?);

    let scopes = [
        "railway://prod/api/:read",
        "railway://staging/volumes/:write",
        "railway://staging/volumes/:delete",
    ]
    .iter()
    .map(|s| s.parse())
    .collect::<Result<Vec<_>, _>>()?;
    let token = client
        .request_token(DEPLOY_BOT_KEY, &scopes, None)
        .await?
        .token;
    say(format!(
        "\nGraphQL (one endpoint, {url}): deploy-bot holds a token for: {}",
        scopes
            .iter()
            .map(|s: &capgate::scope::Scope| s.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let http = reqwest::Client::new();
    let send = |query: &str, variables: Value| {
        http.post(&url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"query": query, "variables": variables}))
            .send()
    };
    for _ in 0..100 {
        let status = send("{ me { id } }", Value::Null).await?.status();
        if status != 503 && status != 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cascade = [
        (
            "list volumes",
            "query Volumes($projectId: String!) { project(id: $projectId) { volumes { edges { node { id name } } } } }",
            serde_json::json!({"projectId": "project-id"}),
        ),
        (
            "delete the volume it believes is staging's",
            "mutation VolumeDelete($id: String!) { volumeDelete(volumeId: $id) }",
            serde_json::json!({"id": "vol_7f3a"}),
        ),
        (
            "delete the backups",
            "mutation VolumeInstanceBackupDelete($volumeInstanceId: String!, $volumeInstanceBackupId: String!) { volumeInstanceBackupDelete(volumeInstanceId: $volumeInstanceId, volumeInstanceBackupId: $volumeInstanceBackupId) { workflowId } }",
            serde_json::json!({"volumeInstanceId": "vi_prod", "volumeInstanceBackupId": "bk_nightly"}),
        ),
        (
            "delete the backups (second one)",
            "mutation { volumeInstanceBackupDelete(volumeInstanceId: \"vi_prod\", volumeInstanceBackupId: \"bk_weekly\") { workflowId } }",
            Value::Null,
        ),
        (
            "delete the staging volume",
            "mutation VolumeDelete($id: String!) { volumeDelete(volumeId: $id) }",
            serde_json::json!({"id": "vol_staging"}),
        ),
    ];
    let mut report = GraphqlReport::default();
    let mut approval_id = None;
    for (action, query, variables) in cascade {
        let response = send(query, variables.clone()).await?;
        let status = response.status().as_u16();
        if let Some(id) = response
            .headers()
            .get("capgate-approval-id")
            .and_then(|v| v.to_str().ok())
        {
            approval_id = Some(id.to_owned());
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["code"]
            .as_str()
            .unwrap_or(if status == 200 { "allowed" } else { "?" })
            .to_owned();
        let shown: String = query
            .split_once('{')
            .map(|(_, rest)| rest.trim())
            .unwrap_or(query)
            .chars()
            .take(30)
            .collect();
        say(format!(
            "{action:<48} POST   {shown:<30} -> {status} {code}"
        ));
        report.steps.push(Step {
            action: action.into(),
            status,
            code,
        });
    }
    if let Some(id) = &approval_id {
        let request = client.approval(&token, id).await?;
        let request = serde_json::to_value(request)?;
        say("\nthe GraphQL approval request an operator sees:".into());
        say(serde_json::to_string_pretty(&request).unwrap_or_default());
        report.approval_request = Some(request);
    }
    report.mutations_reaching_upstream = railway
        .mutations
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    report.counts = railway.counts();
    say(format!(
        "after the GraphQL cascade: {} volumes and {} backups still exist (3 and 2 before); mutations that reached Railway: {:?}",
        report.counts.0, report.counts.1, report.mutations_reaching_upstream
    ));
    Ok(report)
}
#[allow(
    dead_code,
    reason = "the test includes this file as a module and calls `run` itself"
)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    run(false).await.map(|_| ())
}
