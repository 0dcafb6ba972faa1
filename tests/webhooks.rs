//! Approval notifications through the real broker and HTTP proxy to real HTTP sinks served
//! by this test: signed events for a request, a decision and an expiry (the signature
//! recomputed here independently), a Slack-format sink, a sink that hangs and one that
//! redirects, neither of which slows a decision or receives anything it should not.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::Value;

use common::metrics::scrape;
use common::proxy::*;
use common::*;

const SECRET: &str = "whsec_test_5b1f0c";

#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone, Default)]
struct Sink {
    received: Arc<Mutex<Vec<Received>>>,
}

impl Sink {
    /// Serves `/hook` and `/slack` (answer 204), `/hang` (never answers in time) and
    /// `/moved` (a redirect to `/stolen`, which must never be reached).
    async fn start() -> (Sink, u16) {
        let sink = Sink::default();
        async fn record(
            State(sink): State<Sink>,
            uri: axum::http::Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            sink.received.lock().expect("lock").push(Received {
                path: uri.path().to_owned(),
                headers,
                body,
            });
            StatusCode::NO_CONTENT
        }
        async fn hang(
            state: State<Sink>,
            uri: axum::http::Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            record(state, uri, headers, body).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::NO_CONTENT
        }
        async fn moved(
            state: State<Sink>,
            uri: axum::http::Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> (StatusCode, [(&'static str, &'static str); 1]) {
            record(state, uri, headers, body).await;
            (StatusCode::TEMPORARY_REDIRECT, [("location", "/stolen")])
        }
        let app = axum::Router::new()
            .route("/hook", post(record))
            .route("/slack", post(record))
            .route("/stolen", post(record))
            .route("/hang", post(hang))
            .route("/moved", post(moved))
            .with_state(sink.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (sink, port)
    }

    fn at(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits for an event of `kind` about approval `id` at `/hook` and returns it.
    async fn event(&self, kind: &str, id: &str, within: Duration) -> (Received, Value) {
        let deadline = Instant::now() + within;
        loop {
            for received in self.at("/hook") {
                let event: Value = serde_json::from_slice(&received.body).expect("json event");
                if event["type"] == kind && event["approval_id"] == id {
                    return (received, event);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} for {id}; got {:?}",
                self.at("/hook")
                    .iter()
                    .map(|r| String::from_utf8_lossy(&r.body).into_owned())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks `Capgate-Signature: t=..,v1=..` the way a receiver would, with its own HMAC.
fn assert_signed(received: &Received) {
    let header = received
        .headers
        .get("capgate-signature")
        .and_then(|v| v.to_str().ok())
        .expect("signature header");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("malformed signature {header}"));
    let t: u64 = t.parse().expect("timestamp");
    assert!(now_secs().abs_diff(t) < 60, "stale timestamp {t}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(&received.body);
    let expected = hex::encode(mac.finalize().into_bytes());
    assert_eq!(v1, expected, "signature does not verify");
    // The library's own check agrees, and refuses a changed body.
    let ok = capgate::broker::webhooks::verify(
        SECRET.as_bytes(),
        header,
        &received.body,
        now_secs(),
        Duration::from_secs(300),
    );
    assert_eq!(ok, Ok(()));
    let mut tampered = received.body.to_vec();
    tampered.push(b' ');
    assert!(capgate::broker::webhooks::verify(
        SECRET.as_bytes(),
        header,
        &tampered,
        now_secs(),
        Duration::from_secs(300)
    )
    .is_err());
}

/// A delete the proxy holds for approval: 403 `approval_required` and the request's id.
async fn held_delete(proxy: &ProxyProcess, path: &str, token: &str) -> String {
    let response = reqwest::Client::new()
        .delete(format!("{}{path}", proxy.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 403);
    let id = response
        .headers()
        .get("capgate-approval-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    assert!(body.contains("approval_required"), "{body}");
    id.expect("approval id header")
}

fn notifications(sink_port: u16, closed_port: u16) -> String {
    format!(
        r#"
[containment]
approval_verbs = ["delete"]
approval_ttl = "4s"

[notifications]
public_url = "https://capgate.example.test/"
expiry_sweep = "200ms"

[[notifications.webhooks]]
name = "ops"
url = "http://127.0.0.1:{sink_port}/hook"
secret = "{SECRET}"
initial_backoff = "50ms"

[[notifications.webhooks]]
name = "chat"
url = "http://127.0.0.1:{sink_port}/slack"
format = "slack"

[[notifications.webhooks]]
name = "hung"
url = "http://127.0.0.1:{sink_port}/hang"
secret = "{SECRET}"
timeout = "60s"
max_attempts = 1
queue = 1

[[notifications.webhooks]]
name = "moved"
url = "http://127.0.0.1:{sink_port}/moved"
secret = "{SECRET}"
max_attempts = 2
initial_backoff = "50ms"

[[notifications.webhooks]]
name = "down"
url = "http://127.0.0.1:{closed_port}/hook"
secret = "{SECRET}"
max_attempts = 3
initial_backoff = "50ms"
timeout = "1s"
"#
    )
}

#[tokio::test]
async fn approval_events_are_signed_delivered_and_never_slow_a_decision() {
    let (sink, sink_port) = Sink::start().await;
    let closed_port = free_port();
    let broker = Broker::start_custom(OPS_POLICY, &notifications(sink_port, closed_port)).await;
    let (upstream, up_port) = Upstream::start().await;
    let proxy = start_proxy(&broker.url, up_port, "prod").await;
    let token = token_of(
        &broker
            .issue(
                OPS_KEY,
                &[
                    "http://railway/volumes/:read",
                    "http://railway/volumes/vol_1:delete",
                    "http://railway/volumes/vol_2:delete",
                ],
                None,
            )
            .await,
    );
    wait_allowed(&proxy, "/v2/volumes/vol_1", &token).await;

    // 1. The request: the agent's delete is held, and the sink hears of it, signed.
    let id = held_delete(&proxy, "/v2/volumes/vol_1", &token).await;
    let (received, event) = sink
        .event("approval.requested", &id, Duration::from_secs(10))
        .await;
    assert_signed(&received);
    assert_eq!(
        received
            .headers
            .get("capgate-event")
            .and_then(|v| v.to_str().ok()),
        Some("approval.requested")
    );
    assert_eq!(event["agent"], "ops-bot");
    assert_eq!(event["environment"], "prod");
    assert_eq!(event["status"], "pending");
    assert_eq!(event["operation"]["verb"], "delete");
    assert_eq!(
        event["operation"]["resource"],
        "http://railway/volumes/vol_1"
    );
    assert_eq!(event["operation"]["detail"]["method"], "DELETE");
    assert_eq!(event["operation"]["detail"]["path"], "/v2/volumes/vol_1");
    assert_eq!(
        event["url"],
        format!("https://capgate.example.test/ui/approvals/{id}")
    );

    // The hung sink holds its first event; decisions go on at full speed meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.at("/hang").is_empty() {
        assert!(Instant::now() < deadline, "hung sink never called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 2. The decision, while that sink is blocked.
    let started = Instant::now();
    let (status, approved) = broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    let approve_took = started.elapsed();
    assert_eq!(status, 200, "{approved}");
    assert!(
        approve_took < Duration::from_secs(2),
        "approving took {approve_took:?} while a sink hung"
    );
    let (received, event) = sink
        .event("approval.decided", &id, Duration::from_secs(10))
        .await;
    assert_signed(&received);
    assert_eq!(event["status"], "approved");
    assert_eq!(event["decided_by"], "alice");

    // 3. A request nobody decides expires, and that is announced once.
    let started = Instant::now();
    let unattended = held_delete(&proxy, "/v2/volumes/vol_2", &token).await;
    let request_took = started.elapsed();
    assert!(
        request_took < Duration::from_secs(2),
        "request took {request_took:?}"
    );
    let (received, event) = sink
        .event("approval.expired", &unattended, Duration::from_secs(20))
        .await;
    assert_signed(&received);
    assert_eq!(event["status"], "expired");
    assert_eq!(
        event["operation"]["resource"],
        "http://railway/volumes/vol_2"
    );
    let (status, shown) = broker
        .get_as(&format!("/v1/approvals/{unattended}"), OPERATOR_KEY)
        .await;
    assert_eq!(status, 200);
    assert_eq!(shown["status"], "expired");
    // An expired request cannot be approved any more, with the same code as before sweeping.
    let (status, refused) = broker
        .post_as(&format!("/v1/approvals/{unattended}/approve"), OPERATOR_KEY)
        .await;
    assert_eq!(status, 409);
    assert_eq!(refused["code"], "approval_expired");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let expired_events = sink
        .at("/hook")
        .iter()
        .filter(|r| {
            serde_json::from_slice::<Value>(&r.body).is_ok_and(|e| {
                e["type"] == "approval.expired" && e["approval_id"] == unattended.as_str()
            })
        })
        .count();
    assert_eq!(expired_events, 1, "the sweep announces an expiry once");

    // The Slack sink got messages with a link to the approval page, unsigned (no secret).
    let slack = sink.at("/slack");
    assert!(slack.len() >= 3, "{slack:?}");
    let first: Value = serde_json::from_slice(&slack[0].body).expect("slack json");
    let text = first["text"].as_str().expect("text");
    assert!(text.contains("Approval requested"), "{text}");
    assert!(
        text.contains(&format!("<https://capgate.example.test/ui/approvals/{id}|")),
        "{text}"
    );
    assert!(slack[0].headers.get("capgate-signature").is_none());

    // Redirects are not followed; the dead sink is retried, then given up; the hung sink's
    // queue of one dropped what did not fit. All counted.
    let url = format!("{}/metrics", broker.url);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let e = scrape(&url).await;
        let moved_failures = e.value(
            "capgate_webhook_attempt_failures_total",
            &[("sink", "moved")],
        );
        let down_failed = e.value("capgate_webhook_failed_total", &[("sink", "down")]);
        let down_attempts = e.value(
            "capgate_webhook_attempt_failures_total",
            &[("sink", "down")],
        );
        let dropped = e.value("capgate_webhook_dropped_total", &[("sink", "hung")]);
        let delivered = e.value("capgate_webhook_delivered_total", &[("sink", "ops")]);
        if moved_failures >= 2.0 && down_failed >= 1.0 && dropped >= 1.0 && delivered >= 3.0 {
            assert!(down_attempts >= 3.0, "{down_attempts}");
            assert_eq!(
                e.value("capgate_approval_events_total", &[("event", "expired")]),
                1.0
            );
            assert_eq!(e.value("capgate_approvals", &[("status", "expired")]), 1.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "moved {moved_failures}, down failed {down_failed}, dropped {dropped}, delivered {delivered}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sink.at("/stolen").is_empty(), "a redirect was followed");
    assert!(upstream.seen().iter().all(|s| s.method != "DELETE"));
}

#[test]
fn a_json_sink_without_a_secret_or_an_https_sink_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    for (sink, why) in [
        (
            "name = \"a\"\nurl = \"http://127.0.0.1:9/hook\"\n",
            "needs a secret",
        ),
        (
            "name = \"a\"\nurl = \"https://hooks.example.test/x\"\nformat = \"slack\"\n",
            "must be http://",
        ),
    ] {
        let config = dir.path().join("capgate.toml");
        std::fs::write(
            &config,
            format!(
                "{}\n[[notifications.webhooks]]\n{sink}",
                config_text(
                    free_port(),
                    &dir.path().join("data"),
                    &repo().join("policies")
                )
            ),
        )
        .expect("config");
        let output = serve_refusal(&config, &[]).expect("refused at start");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(why), "{stderr}");
    }
}

/// Two brokers on one Redis both sweep expired approvals; the compare-and-set lets exactly
/// one of them mark each request expired and announce it.
#[tokio::test]
async fn of_two_brokers_sharing_a_store_one_announces_each_expiry() {
    let (sink, sink_port) = Sink::start().await;
    let config = format!(
        r#"
[store]
redis = "redis://127.0.0.1:6379"
prefix = "capgate-test-{prefix}:"
accept_volatile = true

[containment]
approval_verbs = ["delete"]
approval_ttl = "1s"

[notifications]
expiry_sweep = "20ms"

[[notifications.webhooks]]
name = "ops"
url = "http://127.0.0.1:{sink_port}/hook"
secret = "{SECRET}"
"#,
        prefix = capgate::token::random_id()
    );
    let dir_a = tempfile::tempdir().expect("dir");
    let policies_a = Broker::policies_with(dir_a.path(), OPS_POLICY);
    let a = Broker::start_with(dir_a, Some(policies_a), &config, None).await;
    let dir_b = tempfile::tempdir().expect("dir");
    let policies_b = Broker::policies_with(dir_b.path(), OPS_POLICY);
    let b = Broker::start_with(dir_b, Some(policies_b), &config, Some(&a)).await;
    let token = token_of(
        &a.issue(OPS_KEY, &["http://railway/volumes/:delete"], None)
            .await,
    );
    let mut ids = Vec::new();
    for n in 0..20 {
        let (status, created) = a
            .post_json(
                "/v1/approvals",
                Some(&token),
                serde_json::json!({"operation": {
                    "adapter": "railway-proxy",
                    "resource": format!("http://railway/volumes/vol_{n}"),
                    "verb": "delete",
                    "detail": {"method": "DELETE", "path": format!("/v2/volumes/vol_{n}")}
                }}),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        ids.push(created["id"].as_str().expect("id").to_owned());
    }
    for id in &ids {
        let (received, _) = sink
            .event("approval.expired", id, Duration::from_secs(15))
            .await;
        assert_signed(&received);
    }
    // Both brokers kept sweeping well past the expiry: still one event per request.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for id in &ids {
        let count = sink
            .at("/hook")
            .iter()
            .filter(|r| {
                serde_json::from_slice::<Value>(&r.body).is_ok_and(|e| {
                    e["type"] == "approval.expired" && e["approval_id"] == id.as_str()
                })
            })
            .count();
        assert_eq!(count, 1, "approval {id} announced {count} times");
    }
    let expired = |e: &common::metrics::Exposition| {
        e.value("capgate_approval_events_total", &[("event", "expired")])
    };
    let (ea, eb) = (
        scrape(&format!("{}/metrics", a.url)).await,
        scrape(&format!("{}/metrics", b.url)).await,
    );
    assert_eq!(expired(&ea) + expired(&eb), ids.len() as f64);
    drop(b);
}
