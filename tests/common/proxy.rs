//! A recording upstream HTTP server and the real `capgate proxy http` process, for tests.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::to_bytes;
use axum::extract::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{free_port, repo};

pub const UPSTREAM_SECRET: &str = "upstream-secret-7f3a";

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// The body as received, when it arrived whole (empty when it did not).
    pub body: Vec<u8>,
}

#[derive(Clone, Default)]
pub struct Upstream {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start() -> (Upstream, u16) {
        let upstream = Upstream::default();
        let seen = upstream.seen.clone();
        let app = axum::Router::new().fallback(move |request: Request| {
            let seen = seen.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = to_bytes(body, 64 << 20).await.unwrap_or_default();
                seen.lock().expect("lock").push(Seen {
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
                format!("upstream saw {} {}", parts.method, parts.uri)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (upstream, port)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn clear(&self) {
        self.seen.lock().expect("lock").clear();
    }
}

pub struct ProxyProcess {
    pub url: String,
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// A proxy process started by another part of the harness.
    pub fn from_parts(port: u16, child: Child, dir: tempfile::TempDir) -> Self {
        ProxyProcess {
            url: format!("http://127.0.0.1:{port}"),
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn start_proxy(broker_url: &str, upstream_port: u16, environment: &str) -> ProxyProcess {
    start_proxy_with_env(broker_url, upstream_port, environment, &[]).await
}

/// As `start_proxy`, with extra or overriding environment variables for the process.
pub async fn start_proxy_with_env(
    broker_url: &str,
    upstream_port: u16,
    environment: &str,
    env: &[(&str, &str)],
) -> ProxyProcess {
    start_proxy_configured(broker_url, upstream_port, environment, env, "").await
}

/// As `start_proxy_with_env`, with extra TOML lines for the `[upstream]` table.
pub async fn start_proxy_configured(
    broker_url: &str,
    upstream_port: u16,
    environment: &str,
    env: &[(&str, &str)],
    upstream_extra: &str,
) -> ProxyProcess {
    start_proxy_full(
        broker_url,
        upstream_port,
        environment,
        env,
        upstream_extra,
        "",
    )
    .await
}

/// As `start_proxy_configured`, with extra top-level TOML lines (`metrics_listen`, say).
pub async fn start_proxy_full(
    broker_url: &str,
    upstream_port: u16,
    environment: &str,
    env: &[(&str, &str)],
    upstream_extra: &str,
    top_extra: &str,
) -> ProxyProcess {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = format!(
        r#"
listen = "127.0.0.1:{port}"
broker = "{broker_url}"
environment = "{environment}"
name = "railway-proxy"
adapter_policies = "{policies}"
max_staleness = "2s"
adapter_key_env = "CAPGATE_TEST_ADAPTER_KEY"
audit_spool = "{spool}"
{top_extra}

[upstream]
url = "http://127.0.0.1:{upstream_port}"
credential_env = "CAPGATE_TEST_UPSTREAM_TOKEN"
credential_prefix = "Bearer "
{upstream_extra}

[[routes]]
method = "GET"
path = "/v2/volumes"
resource = "http://railway/volumes"
verb = "read"

[[routes]]
method = "GET"
path = "/v2/volumes/{{id}}"
resource = "http://railway/volumes/{{id}}"
verb = "read"

[[routes]]
method = "POST"
path = "/v2/volumes/{{id}}/data"
resource = "http://railway/volumes/{{id}}"
verb = "write"

[[routes]]
method = "DELETE"
path = "/v2/volumes/{{id}}"
resource = "http://railway/volumes/{{id}}"
verb = "delete"

[[routes]]
method = "GET"
path = "/v2/backups/{{id}}"
resource = "http://railway/backups/{{id}}"
verb = "read"

[[routes]]
method = "PUT"
path = "/v2/staging-volumes/{{id}}"
resource = "http://railway-staging/volumes/{{id}}"
verb = "write"

[[routes]]
method = "GET"
path = "/v2/experimental/{{id}}"
resource = "http://railway/experimental/{{id}}"
verb = "read"
mode = "shadow"
"#,
        policies = repo().join("policies/adapters").display(),
        spool = dir.path().join("spool.jsonl").display(),
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("config");
    let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["proxy", "http", "--config"])
        .arg(&path)
        .env("CAPGATE_TEST_UPSTREAM_TOKEN", UPSTREAM_SECRET)
        .env("CAPGATE_TEST_ADAPTER_KEY", super::ADAPTER_KEY)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn proxy");
    let proxy = ProxyProcess {
        url: format!("http://127.0.0.1:{port}"),
        port,
        child,
        _dir: dir,
    };
    // Ready once it answers (a 401 for no token is an answer).
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if reqwest::get(format!("{}/v2/volumes", proxy.url))
            .await
            .is_ok()
        {
            return proxy;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("proxy did not start");
}

pub async fn call(
    proxy: &ProxyProcess,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut request = reqwest::Client::new().request(
        method.parse().expect("method"),
        format!("{}{path}", proxy.url),
    );
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Sends bytes exactly as written (clients normalise paths; attackers do not).
pub async fn raw(port: u16, request: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Waits until the proxy has synced keys, so tests start from a ready adapter.
pub async fn wait_allowed(proxy: &ProxyProcess, path: &str, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = call(proxy, "GET", path, Some(token)).await;
        if last.0 == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "proxy never allowed {path}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
