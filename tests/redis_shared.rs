//! Shared state on the real Redis: two broker processes and two proxy processes; revocation
//! through one broker reaches both proxies; Redis going away means refusals and denials, and
//! its return means service without restarts; an evicting Redis is refused at start.
//! Tests that share 127.0.0.1:6379 use their own key prefix; tests that stop Redis run their
//! own `redis-server` on a free port.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::*;
use common::*;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

fn store_table(url: &str) -> String {
    // The shared Redis keeps nothing across restarts; tests on it accept that explicitly.
    format!(
        "[store]\nredis = \"{url}\"\nprefix = \"capgate-test-{}:\"\naccept_volatile = {}\n",
        capgate::token::random_id(),
        url == SHARED_REDIS
    )
}

/// `GET /v1/health` as (status, body): a degraded broker answers 503 with the same document.
async fn health_of(broker: &Broker) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("{}/v1/health", broker.url))
        .await
        .expect("health");
    let status = response.status().as_u16();
    (status, response.json().await.expect("health json"))
}

/// Two brokers on one Redis prefix, the second with the first's keys.
async fn two_brokers(url: &str) -> (Broker, Broker) {
    let store = store_table(url);
    let a = Broker::start_with(tempfile::tempdir().expect("dir"), None, &store, None).await;
    let b = Broker::start_with(tempfile::tempdir().expect("dir"), None, &store, Some(&a)).await;
    (a, b)
}

#[tokio::test]
async fn a_revocation_through_one_broker_is_enforced_by_proxies_of_both() {
    let (a, b) = two_brokers(SHARED_REDIS).await;
    let (upstream, up_port) = Upstream::start().await;
    let proxy_a = start_proxy(&a.url, up_port, "prod").await;
    let proxy_b = start_proxy(&b.url, up_port, "prod").await;
    let token = token_of(
        &a.issue(READER_KEY, &["http://railway/volumes/:read"], None)
            .await,
    );
    wait_allowed(&proxy_a, "/v2/volumes/vol_1", &token).await;
    wait_allowed(&proxy_b, "/v2/volumes/vol_1", &token).await;
    // Both brokers know the session issued by A.
    let session = capgate::token::inspect(&token, None)
        .expect("inspect")
        .revocation_ids[0]
        .clone();

    let started = Instant::now();
    let (status, _) = b.revoke("token", &session).await;
    assert_eq!(status, 201);
    let mut denied_at = [None, None];
    while denied_at.iter().any(Option::is_none) {
        for (i, proxy) in [&proxy_a, &proxy_b].into_iter().enumerate() {
            if denied_at[i].is_none()
                && call(proxy, "GET", "/v2/volumes/vol_1", Some(&token))
                    .await
                    .0
                    == 401
            {
                denied_at[i] = Some(started.elapsed());
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "not propagated: {denied_at:?}"
        );
    }
    println!(
        "revocation propagation (broker B -> Redis -> broker A feed -> proxy A): {:?}; proxy B: {:?}",
        denied_at[0].unwrap_or_default(),
        denied_at[1].unwrap_or_default()
    );
    // The kill switch through A refuses new tokens at B.
    a.revoke("agent", "reporting-bot").await;
    let (status, _) = b
        .request_token(READER_KEY, &["pg://prod/t:read"], None)
        .await;
    assert_eq!(status, 403);
    drop(upstream);
}

#[tokio::test]
async fn propagation_is_fast_on_loopback() {
    let (a, b) = two_brokers(SHARED_REDIS).await;
    let (_upstream, up_port) = Upstream::start().await;
    let proxy_a = start_proxy(&a.url, up_port, "prod").await;
    let mut samples = Vec::new();
    for _ in 0..5 {
        let token = token_of(
            &a.issue(READER_KEY, &["http://railway/volumes/:read"], None)
                .await,
        );
        wait_allowed(&proxy_a, "/v2/volumes/vol_1", &token).await;
        let id = capgate::token::inspect(&token, None)
            .expect("inspect")
            .revocation_ids[0]
            .clone();
        let started = Instant::now();
        b.revoke("token", &id).await;
        while call(&proxy_a, "GET", "/v2/volumes/vol_1", Some(&token))
            .await
            .0
            != 401
        {
            assert!(started.elapsed() < Duration::from_secs(3));
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    println!(
        "cross-broker revocation-to-deny: median {:?}, max {:?} (goal < 100 ms)",
        samples[2], samples[4]
    );
    assert!(
        samples[2] < Duration::from_millis(500),
        "median {:?}",
        samples[2]
    );
}

struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    policy: &'static str,
    /// Append-only file on (fsync always), or no persistence at all.
    persistent: bool,
}

impl OwnRedis {
    fn start(policy: &'static str) -> OwnRedis {
        Self::start_with(policy, true)
    }

    /// A Redis that keeps nothing across a restart (no AOF, no RDB snapshots).
    fn start_volatile() -> OwnRedis {
        Self::start_with("noeviction", false)
    }

    fn start_with(policy: &'static str, persistent: bool) -> OwnRedis {
        let mut redis = OwnRedis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("dir"),
            policy,
            persistent,
        };
        redis.spawn();
        redis
    }

    /// Stops Redis, throws away whatever it kept on disk, and starts it again empty: what a
    /// restart of a Redis without persistence does.
    fn restart_empty(&mut self) {
        self.stop();
        for entry in std::fs::read_dir(self.dir.path()).expect("redis dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove");
            } else {
                std::fs::remove_file(&path).expect("remove");
            }
        }
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                if self.persistent { "yes" } else { "no" },
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                self.policy,
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn redis_down_means_deny_and_redis_back_means_service_without_restart() {
    let mut redis = OwnRedis::start("noeviction");
    let store = store_table(&redis.url());
    let broker = Broker::start_with(tempfile::tempdir().expect("dir"), None, &store, None).await;
    let (upstream, up_port) = Upstream::start().await;
    let proxy = start_proxy(&broker.url, up_port, "prod").await;
    let token = token_of(
        &broker
            .issue(READER_KEY, &["http://railway/volumes/:read"], None)
            .await,
    );
    let revoked = token_of(
        &broker
            .issue(READER_KEY, &["http://railway/volumes/:read"], None)
            .await,
    );
    let id = capgate::token::inspect(&revoked, None)
        .expect("inspect")
        .revocation_ids[0]
        .clone();
    broker.revoke("token", &id).await;
    wait_allowed(&proxy, "/v2/volumes/vol_1", &token).await;

    let (_, health) = health_of(&broker).await;
    let generation = health["store"]["generation"].clone();
    assert!(generation.is_string(), "{health}");

    redis.stop();
    let stopped = Instant::now();
    // Issuance fails closed at once.
    let (status, body) = broker
        .request_token(READER_KEY, &["pg://prod/t:read"], None)
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "store_unavailable");
    // Past the proxy's 2 s bound, nothing is allowed.
    upstream.clear();
    let mut last_allow = None;
    while stopped.elapsed() < Duration::from_secs(4) {
        if call(&proxy, "GET", "/v2/volumes/vol_1", Some(&token))
            .await
            .0
            == 200
        {
            last_allow = Some(stopped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bound = Duration::from_millis(2000 + 1000 + 500); // bound + one poll wait + slack
    assert!(
        last_allow.is_none_or(|t| t < bound),
        "allowed at {last_allow:?} after Redis stopped"
    );
    let (status, body) = call(&proxy, "GET", "/v2/volumes/vol_1", Some(&token)).await;
    assert_eq!(status, 503, "{body}");

    // Redis returns (with its append-only file): everything resumes, state intact.
    redis.spawn();
    let back = Instant::now();
    loop {
        let (status, _) = broker
            .request_token(READER_KEY, &["pg://prod/t:read"], None)
            .await;
        if status == 201 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "issuance did not resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_allowed(&proxy, "/v2/volumes/vol_1", &token).await;
    assert_eq!(
        call(&proxy, "GET", "/v2/volumes/vol_1", Some(&revoked))
            .await
            .0,
        401,
        "revocation survived"
    );
    // A persistent Redis restarted lost nothing: same generation, healthy.
    let (status, health) = health_of(&broker).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["store"]["generation"], generation, "{health}");
    assert_eq!(health["store"]["lost"], false, "{health}");
    println!("service resumed {:?} after Redis came back", back.elapsed());
}

#[tokio::test]
async fn a_volatile_redis_is_refused_at_start_unless_the_risk_is_accepted() {
    let redis = OwnRedis::start_volatile();
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("capgate.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n{}",
            config_text(
                free_port(),
                &dir.path().join("data"),
                &repo().join("policies")
            ),
            store_table(&redis.url())
        ),
    )
    .expect("config");
    let output = serve_refusal(&config, &[]).expect("started on a volatile Redis");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("appendonly") && stderr.contains("--accept-volatile-store"),
        "{stderr}"
    );
    // The configuration can accept the risk explicitly.
    let store =
        store_table(&redis.url()).replace("accept_volatile = false", "accept_volatile = true");
    let broker = Broker::start_with(tempfile::tempdir().expect("dir"), None, &store, None).await;
    let (status, health) = health_of(&broker).await;
    assert_eq!(status, 200, "{health}");
}

/// Waits until `token` gets `code` from `proxy`; returns how long that took.
async fn wait_for_code(
    proxy: &ProxyProcess,
    token: &str,
    code: &str,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = call(proxy, "GET", "/v2/volumes/vol_1", Some(token)).await;
        if serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|b| b["code"] == code) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "still {status} {body} after {within:?}, expected {code}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_redis_restarted_empty_under_a_running_broker_means_deny_until_an_operator_recovers() {
    let mut redis = OwnRedis::start("noeviction");
    let store = store_table(&redis.url());
    let broker = Broker::start_with(tempfile::tempdir().expect("dir"), None, &store, None).await;
    let (_upstream, up_port) = Upstream::start().await;
    let proxy = start_proxy(&broker.url, up_port, "prod").await;
    let scopes = ["http://railway/volumes/:read"];
    let revoked = token_of(&broker.issue(READER_KEY, &scopes, None).await);
    let issued = broker.issue(READER_KEY, &scopes, None).await;
    let live = token_of(&issued);
    let live_session = issued["session_id"].as_str().expect("session").to_owned();
    let revoked_id = capgate::token::inspect(&revoked, None)
        .expect("inspect")
        .revocation_ids[0]
        .clone();
    assert_eq!(broker.revoke("token", &revoked_id).await.0, 201);
    wait_allowed(&proxy, "/v2/volumes/vol_1", &live).await;
    wait_for_code(&proxy, &revoked, "token_revoked", Duration::from_secs(3)).await;
    let (_, health) = health_of(&broker).await;
    let generation = health["store"]["generation"].clone();

    // Redis comes back empty: every revocation, the audit chain and the feed's cursor gone.
    redis.restart_empty();
    // Within the staleness bound the running adapter denies everything, with its own reason,
    // the token revoked before the loss included.
    let bound = Duration::from_millis(2000 + 1000 + 500);
    let took = wait_for_code(&proxy, &live, "revocation_feed_reset", bound).await;
    wait_for_code(
        &proxy,
        &revoked,
        "revocation_feed_reset",
        Duration::from_millis(500),
    )
    .await;
    println!("store loss to deny at the running adapter: {took:?}");
    // A fresh adapter never gets a view of the lost store.
    let fresh = start_proxy(&broker.url, up_port, "prod").await;
    let (status, _) = call(&fresh, "GET", "/v2/volumes/vol_1", Some(&revoked)).await;
    assert_eq!(status, 503);
    // The broker says so, and refuses what depends on the lost state.
    let (status, health) = health_of(&broker).await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["store"]["lost"], true, "{health}");
    assert_eq!(health["store"]["generation"], generation, "{health}");
    let (status, body) = broker.request_token(READER_KEY, &scopes, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("store_lost")),
        "{body}"
    );
    let (status, body) = broker.revoke("session", &live_session).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("store_lost")),
        "{body}"
    );

    // An operator accepts the loss: a new generation, seeded with the revocations this
    // broker still remembers.
    let (status, recovered) = broker.post_as("/v1/store/recover", OPERATOR_KEY).await;
    assert_eq!(status, 200, "{recovered}");
    assert_ne!(recovered["generation"], generation, "{recovered}");
    assert!(recovered["restored"].as_u64() >= Some(1), "{recovered}");
    // A session revoked after the loss, and the token revoked before it, are denied at both
    // adapters within the bound.
    assert_eq!(broker.revoke("session", &live_session).await.0, 201);
    for adapter in [&proxy, &fresh] {
        wait_for_code(adapter, &live, "token_revoked", bound).await;
        wait_for_code(adapter, &revoked, "token_revoked", bound).await;
    }
    let (status, health) = health_of(&broker).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["store"]["lost"], false, "{health}");
    assert_eq!(health["store"]["generation"], recovered["generation"]);
    let next = token_of(&broker.issue(READER_KEY, &scopes, None).await);
    wait_allowed(&proxy, "/v2/volumes/vol_1", &next).await;
}

#[tokio::test]
async fn an_evicting_redis_is_refused_at_start_naming_the_setting() {
    for policy in ["allkeys-lru", "volatile-ttl"] {
        let redis = OwnRedis::start(policy);
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("capgate.toml");
        std::fs::write(
            &config,
            format!(
                "{}\n{}",
                config_text(
                    free_port(),
                    &dir.path().join("data"),
                    &repo().join("policies")
                ),
                store_table(&redis.url())
            ),
        )
        .expect("config");
        let output = Command::new(env!("CARGO_BIN_EXE_capgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .expect("run");
        assert!(!output.status.success(), "{policy}: started anyway");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("maxmemory-policy") && stderr.contains("noeviction"),
            "{policy}: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_store_flag_selects_redis() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = dir.path().join("capgate.toml");
    std::fs::write(
        &config,
        config_text(port, &dir.path().join("data"), &repo().join("policies")),
    )
    .expect("config");
    let log = dir.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--store", "redis://127.0.0.1:1"])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let status = child.wait().expect("wait");
    assert!(
        !status.success(),
        "an unreachable Redis must stop the broker from starting"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("redis"), "{text}");
    assert!(
        !dir.path().join("data/state.db").exists(),
        "SQLite was not used"
    );
}

/// Two brokers on one Redis prefix with containment, each with a proxy in front of one upstream.
async fn contained_pair(limit: u64) -> (Broker, Broker, Upstream, ProxyProcess, ProxyProcess) {
    let extra = format!(
        "{}\n[containment]\napproval_verbs = [\"delete\"]\n\n[[containment.velocity]]\nagent = \"ops-bot\"\nverb = \"write\"\nlimit = {limit}\nper = \"1m\"\n",
        store_table(SHARED_REDIS)
    );
    let dir_a = tempfile::tempdir().expect("dir");
    let policies_a = Broker::policies_with(dir_a.path(), OPS_POLICY);
    let a = Broker::start_with(dir_a, Some(policies_a), &extra, None).await;
    let dir_b = tempfile::tempdir().expect("dir");
    let policies_b = Broker::policies_with(dir_b.path(), OPS_POLICY);
    let b = Broker::start_with(dir_b, Some(policies_b), &extra, Some(&a)).await;
    let (upstream, up_port) = Upstream::start().await;
    let proxy_a = start_proxy(&a.url, up_port, "prod").await;
    let proxy_b = start_proxy(&b.url, up_port, "prod").await;
    (a, b, upstream, proxy_a, proxy_b)
}

#[tokio::test]
async fn velocity_limits_hold_across_two_proxies_under_concurrent_fire() {
    let limit = 20;
    let (a, _b, upstream, proxy_a, proxy_b) = contained_pair(limit).await;
    let token = token_of(
        &a.issue(
            OPS_KEY,
            &[
                "http://railway/volumes/:write",
                "http://railway/volumes/:read",
            ],
            None,
        )
        .await,
    );
    wait_allowed(&proxy_a, "/v2/volumes/vol_1", &token).await;
    wait_allowed(&proxy_b, "/v2/volumes/vol_1", &token).await;
    upstream.clear();
    let mut shots = Vec::new();
    for i in 0..40 {
        let url = if i % 2 == 0 {
            proxy_a.url.clone()
        } else {
            proxy_b.url.clone()
        };
        let token = token.clone();
        shots.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/v2/volumes/vol_1/data"))
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    let mut allowed = 0;
    let mut limited = 0;
    for shot in shots {
        match shot.await.expect("join") {
            200 => allowed += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(
        allowed, limit,
        "exactly the budget passes across both proxies"
    );
    assert_eq!(limited, 40 - limit);
    assert_eq!(upstream.seen().len() as u64, limit);
}

#[tokio::test]
async fn an_approval_requested_through_one_broker_is_approved_on_the_other() {
    let (a, b, upstream, proxy_a, proxy_b) = contained_pair(100).await;
    let token = token_of(
        &a.issue(
            OPS_KEY,
            &[
                "http://railway/volumes/vol_1:delete",
                "http://railway/volumes/:read",
            ],
            None,
        )
        .await,
    );
    wait_allowed(&proxy_a, "/v2/volumes/vol_1", &token).await;
    wait_allowed(&proxy_b, "/v2/volumes/vol_1", &token).await;
    upstream.clear();
    let response = reqwest::Client::new()
        .delete(format!("{}/v2/volumes/vol_1", proxy_a.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 403);
    let id = response.headers()["capgate-approval-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let (status, approved) = b
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    assert_eq!(
        (status, approved["status"].as_str()),
        (200, Some("approved")),
        "{approved}"
    );
    let (status, grant) = b
        .post_as(&format!("/v1/approvals/{id}/grant"), &token)
        .await;
    assert_eq!(status, 200, "{grant}");
    let approved_token = grant["token"].as_str().expect("token").to_owned();
    // Used through the other proxy, once.
    let send = |url: String| {
        let token = approved_token.clone();
        async move {
            reqwest::Client::new()
                .delete(format!("{url}/v2/volumes/vol_1"))
                .bearer_auth(token)
                .send()
                .await
                .expect("send")
                .status()
                .as_u16()
        }
    };
    assert_eq!(send(proxy_b.url.clone()).await, 200);
    assert_eq!(
        send(proxy_a.url.clone()).await,
        403,
        "single use across brokers"
    );
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn the_audit_chain_stays_intact_under_concurrent_appends_from_two_brokers() {
    use capgate::containment::audit::{verify, AuditEvent, AuditKind};
    use capgate::store::{RedisStore, Store};
    use std::sync::Arc;
    let prefix = format!("capgate-test-{}:", capgate::token::random_id());
    let one: Arc<dyn Store> = Arc::new(
        RedisStore::connect(SHARED_REDIS, &prefix)
            .await
            .expect("redis"),
    );
    let two: Arc<dyn Store> = Arc::new(
        RedisStore::connect(SHARED_REDIS, &prefix)
            .await
            .expect("redis"),
    );
    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let store = if i % 2 == 0 { one.clone() } else { two.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .append_audit(AuditEvent {
                    kind: AuditKind::Decision,
                    actor: Some("bot".into()),
                    detail: serde_json::json!({ "i": i }),
                })
                .await
                .expect("append")
        }));
    }
    for task in tasks {
        task.await.expect("join");
    }
    let records = one.audit_since(0, 1000).await.expect("read");
    assert_eq!(
        verify(&records, Some(one.audit_head().await.expect("head"))),
        Ok(60)
    );
}
