//! A recording GraphQL upstream that answers like Railway's `/graphql/v2` for the lookups the
//! adapter makes (volumes, volume instances, services, environments, projects), and the real
//! `capgate proxy http` process configured with `examples/railway-graphql.toml`'s endpoint.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::to_bytes;
use axum::extract::Request;
use serde_json::{json, Value};

use super::proxy::{ProxyProcess, Seen, UPSTREAM_SECRET};
use super::{free_port, repo};

/// Railway's schema and the CLI's documents: `CAPGATE_RAILWAY_DATA`, else
/// `../shared/data/railway` beside the repository. `None` (said loudly) when absent outside
/// CI; under `CI=true` an absence fails the test.
pub fn railway_data() -> Option<PathBuf> {
    let dir = std::env::var_os("CAPGATE_RAILWAY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/data/railway"));
    if dir.join("schema.json").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "Railway data missing at {}: CI must have it (set CAPGATE_RAILWAY_DATA)",
        dir.display()
    );
    eprintln!(
        "\n!!! SKIPPED: Railway data missing at {} (set CAPGATE_RAILWAY_DATA) !!!\n",
        dir.display()
    );
    None
}

/// What the fake provider knows: volumes and where their instances live.
pub const VOLUMES: &[(&str, &[&str])] = &[
    ("vol_staging", &["env-staging-id"]),
    ("vol_staging2", &["env-staging-id"]),
    ("vol_prod", &["env-production-id"]),
    // The incident's volume: the agent took it for staging; it lives in production too.
    ("vol_shared", &["env-staging-id", "env-production-id"]),
    ("vol_elsewhere", &["env-nobody-mapped"]),
];

#[derive(Clone, Default)]
pub struct GraphqlUpstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    lookups: Arc<Mutex<Vec<Value>>>,
}

fn environment_of(id: &str) -> &'static str {
    if id.contains("prod") {
        "env-production-id"
    } else if id.contains("staging") {
        "env-staging-id"
    } else {
        "env-nobody-mapped"
    }
}

/// The answer to one of the adapter's own lookups, or `None` for agent traffic.
fn lookup_answer(query: &str, variables: &Value) -> Option<Value> {
    let id = variables["id"].as_str().unwrap_or_default();
    let edges = |ids: &[&str]| json!({"edges": ids.iter().map(|e| json!({"node": {"environmentId": e}})).collect::<Vec<_>>()});
    if query.contains("CapgateVolumeEnvironments") {
        let volumes: Vec<Value> = VOLUMES
            .iter()
            .map(|(id, envs)| json!({"node": {"id": id, "volumeInstances": edges(envs)}}))
            .collect();
        return Some(json!({"data": {"project": {"volumes": {"edges": volumes}}}}));
    }
    if query.contains("CapgateVolumeInstanceEnvironment") {
        return Some(json!({"data": {"volumeInstance": {"environmentId": environment_of(id)}}}));
    }
    if query.contains("CapgateServiceEnvironments") {
        return Some(
            json!({"data": {"service": {"serviceInstances": edges(&[environment_of(id)])}}}),
        );
    }
    if query.contains("CapgateEnvironment") {
        return Some(json!({"data": {"environment": {"id": id}}}));
    }
    if query.contains("CapgateProjectEnvironments") {
        return Some(json!({"data": {"project": {"environments": {"edges": [
            {"node": {"id": "env-staging-id"}}, {"node": {"id": "env-production-id"}}]}}}}));
    }
    None
}

impl GraphqlUpstream {
    pub async fn start() -> (GraphqlUpstream, u16) {
        let upstream = GraphqlUpstream::default();
        let state = upstream.clone();
        let app = axum::Router::new().fallback(move |request: Request| {
            let state = state.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = to_bytes(body, 64 << 20).await.unwrap_or_default();
                let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let query = parsed["query"].as_str().unwrap_or_default();
                if let Some(answer) = lookup_answer(query, &parsed["variables"]) {
                    state.lookups.lock().expect("lock").push(json!({
                        "query": query,
                        "variables": parsed["variables"],
                        "authorization": parts.headers.get("authorization")
                            .and_then(|v| v.to_str().ok()),
                    }));
                    return axum::Json(answer);
                }
                state.seen.lock().expect("lock").push(Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.to_string(),
                    headers: parts
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                        .collect(),
                    body_len: body.len(),
                    body: body.to_vec(),
                });
                axum::Json(json!({"data": {"upstream": "ok"}}))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (upstream, port)
    }

    /// Agent traffic that reached the upstream (the adapter's own lookups excluded).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// The adapter's own environment lookups.
    pub fn lookups(&self) -> Vec<Value> {
        self.lookups.lock().expect("lock").clone()
    }

    pub fn clear(&self) {
        self.seen.lock().expect("lock").clear();
        self.lookups.lock().expect("lock").clear();
    }
}

/// The `[[graphql]]` part of `examples/railway-graphql.toml`, pointed at `data`'s schema;
/// `edit` may change it (introspection, limits).
pub fn example_endpoint(data: &std::path::Path, edit: impl Fn(String) -> String) -> String {
    let text = std::fs::read_to_string(repo().join("examples/railway-graphql.toml"))
        .expect("example config");
    let start = text
        .find("[[graphql]]")
        .expect("[[graphql]] in the example");
    let endpoint = text[start..].replace(
        "schema = \"../../shared/data/railway/schema.json\"",
        &format!("schema = \"{}\"", data.join("schema.json").display()),
    );
    edit(endpoint)
}

/// The real proxy binary serving the example's GraphQL endpoint in front of `upstream_port`.
pub async fn start_graphql_proxy(
    broker_url: &str,
    upstream_port: u16,
    endpoint: &str,
) -> ProxyProcess {
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
routes = []

[upstream]
url = "http://127.0.0.1:{upstream_port}"
credential_env = "CAPGATE_TEST_UPSTREAM_TOKEN"
credential_prefix = "Bearer "

{endpoint}
"#,
        policies = repo().join("policies/adapters").display(),
        spool = dir.path().join("spool.jsonl").display(),
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("config");
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["proxy", "http", "--config"])
        .arg(&path)
        .env("CAPGATE_TEST_UPSTREAM_TOKEN", UPSTREAM_SECRET)
        .env("CAPGATE_TEST_ADAPTER_KEY", super::ADAPTER_KEY)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn proxy");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "proxy exited {status}: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if reqwest::get(format!("http://127.0.0.1:{port}/graphql/v2"))
            .await
            .is_ok()
        {
            return ProxyProcess::from_parts(port, child, dir);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("proxy did not start");
}
