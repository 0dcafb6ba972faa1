//! Test harness: starts the real `capgate serve` binary on a free port with its own data
//! directory, real policies from the repository, test API keys and JWT issuers.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod graphql;
pub mod mcp;
pub mod metrics;
pub mod pg;
pub mod proxy;

pub const DEPLOY_BOT_KEY: &str = "cgk_test_deploy_bot_0123456789abcdef";
pub const READER_KEY: &str = "cgk_test_reporting_bot_0123456789ab";
pub const OPERATOR_KEY: &str = "cgo_test_operator_0123456789abcdef0";
pub const OPERATOR_BOB_KEY: &str = "cgo_test_operator_bob_0123456789abc";
/// Granted anything by `OPS_POLICY` (adapter tests need deletes and writes in prod).
pub const OPS_KEY: &str = "cgk_test_ops_bot_0123456789abcdef012";
/// The proxies' key for appending decisions to the audit trail.
pub const ADAPTER_KEY: &str = "cga_test_adapter_0123456789abcdef01";
pub const OPS_POLICY: &str = "grant($r, $v) <- agent(\"ops-bot\"), requested($r, $v);\n";
pub const JWT_ISSUER: &str = "https://idp.capgate.test";
pub const PEM_ISSUER: &str = "https://pem-idp.capgate.test";
pub const AUDIENCE: &str = "capgate";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/jwt").join(name)
}

/// A small deterministic generator (xorshift64) for fuzz-style tests: the same seed gives the
/// same inputs on every run, so a failure can be replayed.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn sha256(s: &str) -> String {
    capgate::identity::sha256_hex(s)
}

/// The broker configuration used by integration tests.
pub fn config_text(port: u16, data_dir: &Path, policies: &Path) -> String {
    format!(
        r#"
listen = "127.0.0.1:{port}"
data_dir = "{data}"
policies = "{policies}"
adapter_policies = "{adapters}"

[tokens]
default_ttl = "10m"
max_ttl = "1h"

[[environments]]
name = "staging"
# `pg://staging`: the database itself (DDL, calls of functions not known to be pure).
resources = ["pg://staging", "pg://staging/", "http://railway-staging/", "railway://staging/"]

[[environments]]
name = "prod"
resources = ["pg://prod/", "http://railway/", "railway://prod/"]

[[identity.api_keys]]
agent = "deploy-bot"
sha256 = "{deploy}"

[[identity.api_keys]]
agent = "reporting-bot"
sha256 = "{reader}"

[[identity.api_keys]]
agent = "ops-bot"
sha256 = "{ops}"

[[operators]]
name = "alice"
sha256 = "{operator}"

[[operators]]
name = "bob"
sha256 = "{operator_bob}"

[[adapters]]
name = "railway-proxy"
sha256 = "{adapter}"

[[identity.jwt]]
issuer = "{issuer}"
audience = "{aud}"
keys = "{jwks}"

[[identity.jwt]]
issuer = "{pem_issuer}"
audience = "{aud}"
keys = "{pem}"
algorithm = "RS256"
"#,
        data = data_dir.display(),
        policies = policies.display(),
        adapters = repo().join("policies/adapters").display(),
        deploy = sha256(DEPLOY_BOT_KEY),
        reader = sha256(READER_KEY),
        operator = sha256(OPERATOR_KEY),
        ops = sha256(OPS_KEY),
        operator_bob = sha256(OPERATOR_BOB_KEY),
        adapter = sha256(ADAPTER_KEY),
        issuer = JWT_ISSUER,
        pem_issuer = PEM_ISSUER,
        aud = AUDIENCE,
        jwks = fixture("jwks.json").display(),
        pem = fixture("rsa.pub.pem").display(),
    )
}

pub struct Broker {
    pub url: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    log: PathBuf,
}

impl Broker {
    pub async fn start() -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir).await
    }

    /// The repository's grant policies plus `extra` (e.g. [`OPS_POLICY`]).
    pub async fn start_with_policy(extra: &str) -> Broker {
        Self::start_custom(extra, "").await
    }

    /// Extra grant policy text and extra configuration (a `[containment]` table, say).
    pub async fn start_custom(extra_policy: &str, extra_config: &str) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let policies = Self::policies_with(dir.path(), extra_policy);
        Self::start_with(dir, Some(policies), extra_config, None).await
    }

    pub fn policies_with(dir: &Path, extra: &str) -> PathBuf {
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).expect("mkdir");
        for entry in std::fs::read_dir(repo().join("policies")).expect("policies") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "dl") {
                std::fs::copy(&path, policies.join(path.file_name().expect("name"))).expect("copy");
            }
        }
        std::fs::write(policies.join("zz-test.dl"), extra).expect("write");
        policies
    }

    /// Starts a broker whose state lives in `dir` (reused across restarts).
    pub async fn start_in(dir: tempfile::TempDir) -> Broker {
        Self::start_at(dir, None).await
    }

    async fn start_at(dir: tempfile::TempDir, policies: Option<PathBuf>) -> Broker {
        Self::start_with(dir, policies, "", None).await
    }

    /// Starts a broker with `extra` appended to its configuration (a `[store]` table, say)
    /// and, if given, a copy of another broker's root keys (brokers sharing a Redis must sign
    /// with the same keys, loaded from their own files).
    pub async fn start_with(
        dir: tempfile::TempDir,
        policies: Option<PathBuf>,
        extra: &str,
        keys_from: Option<&Broker>,
    ) -> Broker {
        let port = free_port();
        let config = dir.path().join("capgate.toml");
        let policies = policies.unwrap_or_else(|| repo().join("policies"));
        let text = format!(
            "{}\n{extra}\n",
            config_text(port, &dir.path().join("data"), &policies)
        );
        std::fs::write(&config, text).expect("write config");
        if let Some(source) = keys_from {
            let from = source.dir.path().join("data/keys");
            let to = dir.path().join("data/keys");
            std::fs::create_dir_all(&to).expect("keys dir");
            for entry in std::fs::read_dir(&from).expect("source keys") {
                let path = entry.expect("entry").path();
                std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy key");
            }
        }
        Self::launch(dir, port, "broker").await
    }

    /// Extra configuration (a `[connections]` table, say), with the broker's process held to
    /// `nofile` open files by `prlimit` (a flood test's file limit).
    pub async fn start_under_file_limit(extra_config: &str, nofile: u64) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let policies = repo().join("policies");
        let text = format!(
            "{}\n{extra_config}\n",
            config_text(port, &dir.path().join("data"), &policies)
        );
        std::fs::write(dir.path().join("capgate.toml"), text).expect("write config");
        Self::launch_with(dir, port, "limited", Some(nofile)).await
    }

    /// Starts a killed broker again from its own directory and configuration, on its old
    /// port, as a supervisor would: adapters configured with its address find it again.
    pub async fn restart(dir: tempfile::TempDir, port: u16) -> Broker {
        Self::launch(dir, port, "restarted").await
    }

    /// Runs `capgate serve` on the configuration in `dir` and waits until it is healthy.
    async fn launch(dir: tempfile::TempDir, port: u16, log_name: &str) -> Broker {
        Self::launch_with(dir, port, log_name, None).await
    }

    async fn launch_with(
        dir: tempfile::TempDir,
        port: u16,
        log_name: &str,
        nofile: Option<u64>,
    ) -> Broker {
        let config = dir.path().join("capgate.toml");
        let log = dir.path().join(format!("{log_name}-{port}.log"));
        let child = spawn_serve_under(&config, &log, nofile);
        let broker = Broker {
            url: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            child: Some(child),
            log,
        };
        broker.wait_healthy().await;
        broker
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("capgate.toml")
    }

    async fn wait_healthy(&self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = client.get(format!("{}/v1/health", self.url)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "broker did not become healthy; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Kills the process (SIGKILL: no graceful shutdown) and keeps the data directory.
    pub fn kill(mut self) -> tempfile::TempDir {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let dir = tempfile::tempdir().expect("placeholder");
        std::mem::replace(&mut self.dir, dir)
    }

    pub async fn post_json(&self, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .json(&body);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.expect("request");
        decode(response).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("request");
        decode(response).await
    }

    /// Issues a token with the given credential and `resource:verb` scopes; panics on refusal.
    pub async fn issue(&self, credential: &str, scopes: &[&str], ttl: Option<u64>) -> Value {
        let (status, body) = self.request_token(credential, scopes, ttl).await;
        assert_eq!(status, 201, "token refused: {body}");
        body
    }

    pub async fn request_token(
        &self,
        credential: &str,
        scopes: &[&str],
        ttl: Option<u64>,
    ) -> (u16, Value) {
        let mut body = json!({ "authorization_details": details(scopes) });
        if let Some(ttl) = ttl {
            body["ttl_seconds"] = json!(ttl);
        }
        self.post_json("/v1/tokens", Some(credential), body).await
    }

    pub async fn dry_run(&self, token: &str, resource: &str, verb: &str) -> Value {
        let (status, body) = self
            .post_json(
                "/v1/authorize",
                None,
                json!({"token": token, "resource": resource, "verb": verb}),
            )
            .await;
        assert_eq!(status, 200, "dry run failed: {body}");
        body
    }

    pub async fn post_as(&self, path: &str, bearer: &str) -> (u16, Value) {
        self.post_json(path, Some(bearer), json!({})).await
    }

    pub async fn get_as(&self, path: &str, bearer: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .bearer_auth(bearer)
            .send()
            .await
            .expect("request");
        decode(response).await
    }

    pub async fn revoke(&self, kind: &str, value: &str) -> (u16, Value) {
        self.post_json(
            "/v1/revocations",
            Some(OPERATOR_KEY),
            json!({"kind": kind, "value": value, "reason": "test"}),
        )
        .await
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn spawn_serve(config: &Path, log: &Path) -> Child {
    spawn_serve_under(config, log, None)
}

/// `capgate serve`, under `prlimit --nofile=N:N` when a file limit is given.
pub fn spawn_serve_under(config: &Path, log: &Path, nofile: Option<u64>) -> Child {
    let log_file = std::fs::File::create(log).expect("log file");
    under_file_limit(env!("CARGO_BIN_EXE_capgate"), nofile)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn capgate serve")
}

/// Starts `capgate serve` on `config` with `flags` and returns its output if it exits
/// within a few seconds (a refusal), or `None` if it is still running (then it is killed).
pub fn serve_refusal(config: &Path, flags: &[&str]) -> Option<std::process::Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["serve", "--config"])
        .arg(config)
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return Some(child.wait_with_output().expect("output"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A command for `program`, run under `prlimit --nofile=N:N` (util-linux) when `nofile` is
/// given: the limit is set before the program starts, without unsafe code in the test.
pub fn under_file_limit(program: &str, nofile: Option<u64>) -> Command {
    match nofile {
        Some(n) => {
            let mut command = Command::new("prlimit");
            command
                .arg(format!("--nofile={n}:{n}"))
                .arg("--")
                .arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Raises this test process's own soft file limit to at least `wanted` (a flood opens more
/// sockets than the default 1,024), failing loudly when the hard limit does not allow it.
pub fn raise_own_file_limit(wanted: u64) {
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={wanted}:"))
        .status()
        .expect("prlimit (util-linux) is needed by the flood tests");
    if !status.success() {
        // The soft limit may already be higher, or the hard limit lower: say which.
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or("unknown");
        let soft: u64 = line
            .split_whitespace()
            .nth(3)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            soft >= wanted,
            "cannot raise this test's open-file limit to {wanted}: {line}"
        );
    }
}

pub fn details(scopes: &[&str]) -> Value {
    Value::Array(
        scopes
            .iter()
            .map(|scope| {
                let (resource, verb) = scope.rsplit_once(':').expect("resource:verb");
                json!({"type": "capgate", "locations": [resource], "actions": [verb]})
            })
            .collect(),
    )
}

pub async fn decode(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let problem = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    let text = response.text().await.expect("body");
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status >= 400 {
        assert!(problem, "error without problem+json: {status} {body}");
        assert!(body["code"].is_string(), "problem without code: {body}");
    }
    (status, body)
}

pub fn token_of(issued: &Value) -> String {
    issued["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

/// Signs a JWT with one of the fixture keys.
pub fn sign_jwt(
    alg: jsonwebtoken::Algorithm,
    key_file: &str,
    kid: Option<&str>,
    claims: &Value,
) -> String {
    let pem = std::fs::read(fixture(key_file)).expect("fixture key");
    let key = match alg {
        jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
        jsonwebtoken::Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
        jsonwebtoken::Algorithm::EdDSA => jsonwebtoken::EncodingKey::from_ed_pem(&pem),
        other => panic!("no fixture for {other:?}"),
    }
    .expect("encoding key");
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

pub fn claims(sub: &str, iss: &str, aud: &str, exp_offset: i64) -> Value {
    json!({
        "sub": sub,
        "iss": iss,
        "aud": aud,
        "iat": now_secs(),
        "exp": (now_secs() as i64 + exp_offset),
        "team": "platform",
        "groups": ["deployers", "oncall"],
    })
}
