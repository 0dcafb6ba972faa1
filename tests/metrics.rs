//! Prometheus metrics through the real binaries: the broker's `/metrics`, the HTTP proxy's
//! and the PostgreSQL proxy's metrics listeners, scraped and parsed strictly; the counters
//! move with real decisions, denials, issuance and approvals, by exactly what was done.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::metrics::{parse, scrape, Exposition};
use common::proxy::*;
use common::*;

const CONTAINMENT: &str = "[containment]\napproval_verbs = [\"delete\"]\n";

fn decisions(e: &Exposition, adapter: &str, verb: &str, outcome: &str) -> f64 {
    e.value(
        "capgate_decisions_total",
        &[("adapter", adapter), ("verb", verb), ("outcome", outcome)],
    )
}

fn denials(e: &Exposition, adapter: &str, reason: &str) -> f64 {
    e.value(
        "capgate_denials_total",
        &[("adapter", adapter), ("reason", reason)],
    )
}

#[test]
fn the_reader_refuses_what_is_not_openmetrics() {
    let good = "# HELP a_x help\n# TYPE a_x counter\na_x_total{k=\"v\\\"q\"} 3\n# EOF\n";
    assert_eq!(parse(good).value("a_x_total", &[("k", "v\"q")]), 3.0);
    for bad in [
        "# TYPE a counter\na_total 1\n",
        "# TYPE a counter\nb_total 1\n# EOF\n",
        "# TYPE a counter\na_total{k=v} 1\n# EOF\n",
        "# TYPE a counter\na_total one\n# EOF\n",
        "# TYPE a counter\na_total 1\na_total 2\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n# EOF\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse(bad)).is_err(),
            "accepted: {bad:?}"
        );
    }
}

#[tokio::test]
async fn http_proxy_metrics_count_real_decisions_by_verb_outcome_and_reason() {
    let broker = Broker::start_custom(OPS_POLICY, CONTAINMENT).await;
    let (upstream, up_port) = Upstream::start().await;
    let metrics_port = free_port();
    let proxy = start_proxy_full(
        &broker.url,
        up_port,
        "prod",
        &[],
        "",
        &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
    )
    .await;
    let token = token_of(
        &broker
            .issue(
                OPS_KEY,
                &[
                    "http://railway/volumes/:read",
                    "http://railway/volumes/vol_1:delete",
                ],
                None,
            )
            .await,
    );
    wait_allowed(&proxy, "/v2/volumes/vol_1", &token).await;
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let before = scrape(&url).await;

    for _ in 0..3 {
        assert_eq!(
            call(&proxy, "GET", "/v2/volumes/vol_1", Some(&token))
                .await
                .0,
            200
        );
    }
    let (status, body) = call(&proxy, "GET", "/v2/volumes/vol_1", Some("not-a-token")).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = call(&proxy, "DELETE", "/v2/volumes/vol_1", Some(&token)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("approval_required"), "{body}");
    // Not granted: a delete of another volume is a policy deny.
    let (status, body) = call(&proxy, "DELETE", "/v2/volumes/vol_9", Some(&token)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("policy_denied"), "{body}");
    upstream.clear();

    let after = scrape(&url).await;
    let delta = |f: &dyn Fn(&Exposition) -> f64| f(&after) - f(&before);
    let a = "railway-proxy";
    assert_eq!(delta(&|e| decisions(e, a, "read", "allow")), 3.0);
    assert_eq!(delta(&|e| decisions(e, a, "read", "deny")), 1.0);
    assert_eq!(delta(&|e| denials(e, a, "token_malformed")), 1.0);
    assert_eq!(
        delta(&|e| decisions(e, a, "delete", "approval_required")),
        1.0
    );
    assert_eq!(delta(&|e| decisions(e, a, "delete", "deny")), 1.0);
    assert_eq!(delta(&|e| denials(e, a, "policy_denied")), 1.0);
    assert_eq!(delta(&|e| denials(e, a, "frozen")), 0.0);
    // Every read decision landed in the latency histogram.
    let count = |e: &Exposition| {
        e.value(
            "capgate_decision_duration_seconds_count",
            &[("adapter", a), ("verb", "read")],
        )
    };
    assert_eq!(count(&after) - count(&before), 4.0);
    assert_eq!(
        after.types["capgate_decision_duration_seconds"],
        "histogram"
    );
    // The revocation view is fresh (the feed long-polls every second) and never reset.
    let age = after.value("capgate_revocation_feed_age_seconds", &[]);
    assert!((0.0..2.0).contains(&age), "feed age {age}");
    assert_eq!(
        after.value("capgate_revocation_feed_resyncs_total", &[]),
        0.0
    );
    assert!(after.has("capgate_audit_spool_depth", &[]));
    assert!(after.has("capgate_audit_spool_ship_failures_total", &[]));

    // The reads were spooled and shipped: the spool drains and counts what it shipped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(&url).await;
        let shipped = now.value("capgate_audit_spool_shipped_records_total", &[]);
        if shipped >= 4.0 && now.value("capgate_audit_spool_depth", &[]) == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spool never drained: shipped {shipped}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The metrics listener is not the proxy's: agents cannot reach it through the proxy.
    let (status, _) = call(&proxy, "GET", "/metrics", Some(&token)).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn an_unreachable_broker_shows_as_feed_age_and_spool_backlog() {
    let broker = Broker::start_custom(OPS_POLICY, CONTAINMENT).await;
    let (_upstream, up_port) = Upstream::start().await;
    let metrics_port = free_port();
    let proxy = start_proxy_full(
        &broker.url,
        up_port,
        "prod",
        &[],
        "",
        &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
    )
    .await;
    let token = token_of(
        &broker
            .issue(OPS_KEY, &["http://railway/volumes/:read"], None)
            .await,
    );
    wait_allowed(&proxy, "/v2/volumes/vol_1", &token).await;
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let _dir = broker.kill();
    // Reads until the view is stale: each is spooled, none can be shipped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = call(&proxy, "GET", "/v2/volumes/vol_1", Some(&token)).await;
        if status != 200 {
            assert!(body.contains("revocation_feed_stale"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never went stale");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = scrape(&url).await;
        let age = e.value("capgate_revocation_feed_age_seconds", &[]);
        let depth = e.value("capgate_audit_spool_depth", &[]);
        let failures = e.value("capgate_audit_spool_ship_failures_total", &[]);
        let stale = denials(&e, "railway-proxy", "revocation_feed_stale");
        if age > 2.0 && depth >= 1.0 && failures >= 1.0 && stale >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "age {age}, depth {depth}, failures {failures}, stale denials {stale}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn broker_metrics_count_issuance_refusals_approvals_and_dry_runs() {
    let broker = Broker::start_custom(OPS_POLICY, CONTAINMENT).await;
    let url = format!("{}/metrics", broker.url);
    let before = scrape(&url).await;
    let token = token_of(
        &broker
            .issue(OPS_KEY, &["http://railway/volumes/:delete"], None)
            .await,
    );
    // reporting-bot is granted no prod deletes: refused whole.
    let (status, body) = broker
        .request_token(READER_KEY, &["http://railway/volumes/:delete"], None)
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "scope_refused");
    let (status, _) = broker
        .request_token(
            "cgk_nobody_0000000000000000000000",
            &["http://railway/volumes/:read"],
            None,
        )
        .await;
    assert_eq!(status, 401);
    // A dry run goes through the broker's own guard.
    let dry = broker
        .dry_run(&token, "http://railway/volumes/vol_1", "read")
        .await;
    assert_eq!(dry["decision"], "deny", "{dry}");
    // An approval request, then a denial by an operator.
    let (status, created) = broker
        .post_json(
            "/v1/approvals",
            Some(&token),
            serde_json::json!({"operation": {
                "adapter": "railway-proxy",
                "resource": "http://railway/volumes/vol_1",
                "verb": "delete",
                "detail": {"method": "DELETE", "path": "/v2/volumes/vol_1"}
            }}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let middle = scrape(&url).await;
    assert_eq!(
        middle.value("capgate_approvals", &[("status", "pending")]),
        1.0
    );
    let (status, _) = broker
        .post_as(&format!("/v1/approvals/{id}/deny"), OPERATOR_KEY)
        .await;
    assert_eq!(status, 200);

    let after = scrape(&url).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    assert_eq!(delta("capgate_tokens_issued_total", &[]), 1.0);
    assert_eq!(
        delta("capgate_token_refusals_total", &[("code", "scope_refused")]),
        1.0
    );
    assert_eq!(
        delta(
            "capgate_token_refusals_total",
            &[("code", "api_key_unknown")]
        ),
        1.0
    );
    assert_eq!(
        delta("capgate_approval_events_total", &[("event", "requested")]),
        1.0
    );
    assert_eq!(
        delta("capgate_approval_events_total", &[("event", "denied")]),
        1.0
    );
    assert_eq!(
        after.value("capgate_approvals", &[("status", "pending")]),
        0.0
    );
    assert_eq!(
        after.value("capgate_approvals", &[("status", "denied")]),
        1.0
    );
    assert_eq!(
        decisions(&after, "broker-dry-run", "read", "deny")
            - decisions(&before, "broker-dry-run", "read", "deny"),
        1.0
    );
    assert!(after.value("capgate_audit_head_seq", &[]) >= 3.0);
    let age = after.value("capgate_revocation_feed_age_seconds", &[]);
    assert!((0.0..2.0).contains(&age), "broker view age {age}");
}

struct PgProxy {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn pg_proxy(broker: &Broker, metrics_port: u16) -> PgProxy {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = format!(
        r#"
listen = "127.0.0.1:{port}"
broker = "{broker}"
environment = "staging"
database = "staging"
name = "pg-staging"
adapter_policies = "{policies}"
adapter_key_env = "CAPGATE_TEST_ADAPTER_KEY"
audit_spool = "{spool}"
metrics_listen = "127.0.0.1:{metrics_port}"

[upstream]
addr = "127.0.0.1:5432"
database = "test"
user = "postgres"
"#,
        broker = broker.url,
        policies = repo().join("policies/adapters").display(),
        spool = dir.path().join("spool.jsonl").display(),
    );
    let path = dir.path().join("pg.toml");
    std::fs::write(&path, config).expect("config");
    let log = std::fs::File::create(dir.path().join("pg.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["proxy", "pg", "--config"])
        .arg(&path)
        .env("CAPGATE_TEST_ADAPTER_KEY", ADAPTER_KEY)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pg proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    PgProxy {
        port,
        child,
        _dir: dir,
    }
}

#[tokio::test]
async fn pg_proxy_metrics_count_statements_it_judged() {
    let broker = Broker::start().await;
    let metrics_port = free_port();
    let proxy = pg_proxy(&broker, metrics_port).await;
    let token = token_of(
        &broker
            .issue(READER_KEY, &["pg://staging/:read"], None)
            .await,
    );
    let config = format!(
        "host=127.0.0.1 port={} user=reporting-bot password={token} dbname=staging connect_timeout=5",
        proxy.port
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        if let Ok((client, connection)) =
            tokio_postgres::connect(&config, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            if client.simple_query("SELECT 1").await.is_ok() {
                break client;
            }
        }
        assert!(Instant::now() < deadline, "proxy never accepted the token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let before = scrape(&url).await;
    client
        .simple_query("SELECT count(*) FROM pg_catalog.pg_class")
        .await
        .expect("read");
    let denied = client
        .simple_query("CREATE TABLE capgate_metrics_never (id int)")
        .await
        .expect_err("a read token cannot create");
    assert_eq!(denied.as_db_error().map(|e| e.code().code()), Some("42501"));
    let after = scrape(&url).await;
    let a = "pg-staging";
    assert!(decisions(&after, a, "read", "allow") > decisions(&before, a, "read", "allow"));
    assert_eq!(
        decisions(&after, a, "admin", "deny") - decisions(&before, a, "admin", "deny"),
        1.0
    );
    assert_eq!(
        denials(&after, a, "policy_denied") - denials(&before, a, "policy_denied"),
        1.0
    );
    assert!(after.has("capgate_audit_spool_depth", &[]));
}
