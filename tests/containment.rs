//! Containment through the real broker and the real HTTP proxy: approvals end to end, staged
//! execution, two-person rule, velocity limits, freeze, kill switch, recovery points, the
//! audit trail and its verification, policy replay, and restarts that lose nothing.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::proxy::*;
use common::*;
use serde_json::{json, Value};

fn containment(extra: &str) -> String {
    format!(
        r#"
[containment]
approval_verbs = ["delete"]
recovery_points = ["http://railway/backups/", "http://railway/volumes/vol_backups/"]
{extra}

[[containment.velocity]]
agent = "ops-bot"
verb = "write"
limit = 30
per = "1m"
"#
    )
}

struct Setup {
    broker: Broker,
    upstream: Upstream,
    proxy: ProxyProcess,
    token: String,
}

async fn setup(extra: &str, scopes: &[&str]) -> Setup {
    let broker = Broker::start_custom(OPS_POLICY, &containment(extra)).await;
    let (upstream, up_port) = Upstream::start().await;
    let proxy = start_proxy(&broker.url, up_port, "prod").await;
    let token = token_of(&broker.issue(OPS_KEY, scopes, None).await);
    wait_allowed(&proxy, "/v2/volumes/vol_1", &token).await;
    upstream.clear();
    Setup {
        broker,
        upstream,
        proxy,
        token,
    }
}

/// Sends a request and returns (status, body, approval id header).
async fn send(
    proxy: &ProxyProcess,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, String, Option<String>) {
    let response = reqwest::Client::new()
        .request(
            method.parse().expect("method"),
            format!("{}{path}", proxy.url),
        )
        .bearer_auth(token)
        .send()
        .await
        .expect("send");
    let id = response
        .headers()
        .get("capgate-approval-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (
        response.status().as_u16(),
        response.text().await.unwrap_or_default(),
        id,
    )
}

const DELETE_SCOPES: [&str; 3] = [
    "http://railway/volumes/vol_1:delete",
    "http://railway/volumes/vol_2:delete",
    "http://railway/volumes/:read",
];

#[tokio::test]
async fn approval_flow_end_to_end() {
    let s = setup("", &DELETE_SCOPES).await;
    // The token alone: refused, with an approval request id; nothing reaches the upstream.
    let (status, body, id) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &s.token).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("approval_required"), "{body}");
    let id = id.expect("approval id header");
    assert!(s.upstream.seen().is_empty());

    // The approver sees the exact operation.
    let (status, listed) = s.broker.get_as("/v1/approvals", OPERATOR_KEY).await;
    assert_eq!(status, 200);
    let request = listed
        .as_array()
        .expect("list")
        .iter()
        .find(|a| a["id"] == id.as_str())
        .expect("listed")
        .clone();
    assert_eq!(request["operation"]["detail"]["method"], "DELETE");
    assert_eq!(request["operation"]["detail"]["path"], "/v2/volumes/vol_1");
    assert_eq!(
        request["operation"]["resource"],
        "http://railway/volumes/vol_1"
    );
    assert_eq!(request["agent"], "ops-bot");

    // The agent cannot approve itself, with any of its credentials.
    for credential in [OPS_KEY, s.token.as_str()] {
        let (status, body) = s
            .broker
            .post_as(&format!("/v1/approvals/{id}/approve"), credential)
            .await;
        assert_eq!(status, 401, "{body}");
    }
    // Nothing to collect before approval.
    let (status, _) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/grant"), &s.token)
        .await;
    assert_eq!(status, 409);

    let (status, approved) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    assert_eq!(
        (status, approved["status"].clone()),
        (200, json!("approved"))
    );
    let (status, grant) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/grant"), &s.token)
        .await;
    assert_eq!(status, 200, "{grant}");
    let approved_token = grant["token"].as_str().expect("token").to_owned();
    let inspection = capgate::token::inspect(&approved_token, None).expect("inspect");
    assert!(
        inspection
            .blocks
            .iter()
            .any(|b| b.external_key.is_some() && b.source.contains("approved(")),
        "third-party approval block"
    );

    // A different operation with the approved token: the digest does not match.
    let (status, body, other_id) =
        send(&s.proxy, "DELETE", "/v2/volumes/vol_2", &approved_token).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("approval_required"));
    assert_ne!(other_id.as_deref(), Some(id.as_str()));
    assert!(s.upstream.seen().is_empty());

    // The approved operation goes through, once.
    let (status, body, _) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &approved_token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.upstream.seen().len(), 1);
    let (status, body, _) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &approved_token).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("approval_used"), "{body}");
    assert_eq!(s.upstream.seen().len(), 1, "single use");
}

#[tokio::test]
async fn expired_denied_and_self_approved_requests_do_not_pass() {
    let s = setup("approval_ttl = \"2s\"", &DELETE_SCOPES).await;
    let (_, _, id) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &s.token).await;
    let id = id.expect("id");
    s.broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    let (_, grant) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/grant"), &s.token)
        .await;
    let approved_token = grant["token"].as_str().expect("token").to_owned();
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (status, body, _) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &approved_token).await;
    assert_eq!(status, 403, "expired approval: {body}");
    assert!(s.upstream.seen().is_empty());

    // Denied by an operator: cannot be collected or used.
    let (_, _, id) = send(&s.proxy, "DELETE", "/v2/volumes/vol_2", &s.token).await;
    let id = id.expect("id");
    let (status, denied) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/deny"), OPERATOR_KEY)
        .await;
    assert_eq!((status, denied["status"].clone()), (200, json!("denied")));
    assert_eq!(
        s.broker
            .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_BOB_KEY)
            .await
            .0,
        409
    );
    assert_eq!(
        s.broker
            .post_as(&format!("/v1/approvals/{id}/grant"), &s.token)
            .await
            .0,
        409
    );
}

#[tokio::test]
async fn staged_execution_waits_and_a_cancelled_stage_never_runs() {
    let s = setup("approval_delay = \"2s\"", &DELETE_SCOPES).await;
    // Approved, then cancelled during the delay.
    let (_, _, id) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &s.token).await;
    let id = id.expect("id");
    s.broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    let (_, grant) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/grant"), &s.token)
        .await;
    let cancelled_token = grant["token"].as_str().expect("token").to_owned();
    let (status, body, _) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &cancelled_token).await;
    assert_eq!(status, 403);
    assert!(body.contains("approval_delayed"), "too early: {body}");
    let (status, cancelled) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/cancel"), OPERATOR_BOB_KEY)
        .await;
    assert_eq!(
        (status, cancelled["status"].clone()),
        (200, json!("cancelled"))
    );

    // Another, not cancelled: passes once the delay is over.
    let (_, _, id2) = send(&s.proxy, "DELETE", "/v2/volumes/vol_2", &s.token).await;
    let id2 = id2.expect("id");
    s.broker
        .post_as(&format!("/v1/approvals/{id2}/approve"), OPERATOR_KEY)
        .await;
    let (_, grant) = s
        .broker
        .post_as(&format!("/v1/approvals/{id2}/grant"), &s.token)
        .await;
    let staged_token = grant["token"].as_str().expect("token").to_owned();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (status, body, _) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &cancelled_token).await;
    assert_eq!(status, 403);
    assert!(body.contains("approval_cancelled"), "{body}");
    let (status, body, _) = send(&s.proxy, "DELETE", "/v2/volumes/vol_2", &staged_token).await;
    assert_eq!(status, 200, "{body}");
    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v2/volumes/vol_2");
}

#[tokio::test]
async fn two_person_rule_needs_two_different_operators() {
    let s = setup("approvers_required = 2", &DELETE_SCOPES).await;
    let (_, _, id) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &s.token).await;
    let id = id.expect("id");
    let (_, first) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    assert_eq!(first["status"], "pending");
    let (status, again) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    assert_eq!(
        (status, again["code"].clone()),
        (409, json!("approval_same_operator"))
    );
    assert_eq!(
        s.broker
            .post_as(&format!("/v1/approvals/{id}/grant"), &s.token)
            .await
            .0,
        409,
        "one operator is not enough"
    );
    let (_, second) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_BOB_KEY)
        .await;
    assert_eq!(second["status"], "approved");
    assert_eq!(second["approvers"], json!(["alice", "bob"]));
}

#[tokio::test]
async fn velocity_limit_stops_the_31st_write_in_a_minute() {
    let s = setup(
        "",
        &[
            "http://railway/volumes/:write",
            "http://railway/volumes/:read",
        ],
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..31 {
        let (status, body, _) = send(&s.proxy, "POST", "/v2/volumes/vol_1/data", &s.token).await;
        statuses.push((status, body));
    }
    assert!(
        statuses[..30].iter().all(|(s, _)| *s == 200),
        "{:?}",
        &statuses[..30].iter().map(|s| s.0).collect::<Vec<_>>()
    );
    assert_eq!(statuses[30].0, 429, "{}", statuses[30].1);
    assert!(statuses[30].1.contains("rate_limited"));
    assert_eq!(s.upstream.seen().len(), 30);
    // Reads are not limited.
    assert_eq!(
        send(&s.proxy, "GET", "/v2/volumes/vol_1", &s.token).await.0,
        200
    );
}

#[tokio::test]
async fn freeze_and_kill_switch_take_effect_within_the_bound() {
    let s = setup(
        "",
        &[
            "http://railway/volumes/:write",
            "http://railway/volumes/:read",
        ],
    )
    .await;
    assert_eq!(
        send(&s.proxy, "POST", "/v2/volumes/vol_1/data", &s.token)
            .await
            .0,
        200
    );
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["freeze", "on", "--broker", &s.broker.url])
        .env("CAPGATE_OPERATOR_KEY", OPERATOR_KEY)
        .output()
        .expect("freeze");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    loop {
        let (status, body, _) = send(&s.proxy, "POST", "/v2/volumes/vol_1/data", &s.token).await;
        if status == 403 {
            assert!(body.contains("frozen"), "{body}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "freeze not seen within the 2 s bound"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("freeze-to-deny latency: {:?}", started.elapsed());
    assert_eq!(
        send(&s.proxy, "GET", "/v2/volumes/vol_1", &s.token).await.0,
        200,
        "reads continue"
    );
    Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["freeze", "off", "--broker", &s.broker.url])
        .env("CAPGATE_OPERATOR_KEY", OPERATOR_KEY)
        .output()
        .expect("unfreeze");
    let deadline = Instant::now() + Duration::from_secs(3);
    while send(&s.proxy, "POST", "/v2/volumes/vol_1/data", &s.token)
        .await
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "writes did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Kill switch: one command, every token of the agent fails at the adapter.
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["revoke", "--agent", "ops-bot", "--broker", &s.broker.url])
        .env("CAPGATE_OPERATOR_KEY", OPERATOR_KEY)
        .output()
        .expect("revoke");
    assert!(output.status.success());
    while send(&s.proxy, "GET", "/v2/volumes/vol_1", &s.token).await.0 != 401 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "kill switch not seen within the bound"
        );
    }
    assert_eq!(
        s.broker
            .request_token(OPS_KEY, &["http://railway/volumes/:read"], None)
            .await
            .0,
        403
    );
}

#[tokio::test]
async fn recovery_points_are_out_of_reach_even_with_an_approval() {
    let broker = Broker::start_custom(OPS_POLICY, &containment("")).await;
    // Even an agent whose policy grants anything gets no delete that reaches a recovery point.
    for scope in [
        "http://railway/backups/bk_1:delete",
        "http://railway/:delete",
        "http://railway/volumes/vol_backups:delete",
    ] {
        let (status, body) = broker.request_token(OPS_KEY, &[scope], None).await;
        assert_eq!(status, 403, "{scope}: {body}");
        assert!(
            body["refused"][0]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("recovery point"),
            "{body}"
        );
    }
    // No approval request can even be created for one.
    let token = token_of(
        &broker
            .issue(OPS_KEY, &["http://railway/volumes/:read"], None)
            .await,
    );
    let operation = json!({"operation": {"adapter": "railway-proxy", "resource": "http://railway/backups/bk_1", "verb": "delete", "detail": {}}});
    let (status, body) = broker
        .post_json("/v1/approvals", Some(&token), operation)
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, json!("recovery_point"))
    );
}

#[tokio::test]
async fn a_policy_that_grants_delete_on_a_recovery_point_fails_policy_test() {
    let dir = tempfile::tempdir().expect("dir");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(policies.join("tests")).expect("mkdir");
    std::fs::write(
        policies.join("bad.dl"),
        "grant($r, $v) <- agent(\"janitor\"), requested($r, $v);\n",
    )
    .expect("policy");
    std::fs::write(
        policies.join("tests/janitor.toml"),
        "[[case]]\nname = \"janitor cleans volumes\"\nagent = \"janitor\"\nscopes = [\"http://railway/volumes/vol_1:delete\"]\nexpect = \"granted\"\n",
    )
    .expect("cases");
    let config = dir.path().join("capgate.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n{}",
            config_text(free_port(), &dir.path().join("data"), &policies),
            containment("")
        ),
    )
    .expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["policy", "test", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stdout.contains("grants delete on recovery point"),
        "{stdout}"
    );
}

#[tokio::test]
async fn the_audit_trail_verifies_and_names_each_kind_of_tampering() {
    let s = setup("", &DELETE_SCOPES).await;
    send(&s.proxy, "GET", "/v2/volumes/vol_1", &s.token).await;
    send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &s.token).await;
    s.broker.revoke("agent", "someone-else").await;
    wait_for_decisions(&s.broker, "approval_required", 1).await;
    let config = s.broker.config_path();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_capgate"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run")
    };
    let verify = run(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let tail = run(&["audit", "tail", "--agent", "ops-bot"]);
    let tail = String::from_utf8_lossy(&tail.stdout).into_owned();
    assert!(
        tail.contains("issuance") && tail.contains("approval_required"),
        "{tail}"
    );

    // Tamper with an exported copy, one way at a time.
    let export = run(&["audit", "export"]);
    let lines: Vec<String> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(lines.len() >= 5, "{lines:?}");
    let check = |lines: &[String]| {
        let file = s.broker.dir.path().join("tampered.jsonl");
        std::fs::write(&file, lines.join("\n")).expect("write");
        let output = Command::new(env!("CARGO_BIN_EXE_capgate"))
            .args(["audit", "verify", "--file"])
            .arg(&file)
            .output()
            .expect("run");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    assert!(check(&lines).0, "an honest export verifies");
    let mut edited = lines.clone();
    let mut record: Value = serde_json::from_str(&edited[1]).expect("json");
    record["event"]["actor"] = json!("nobody");
    edited[1] = record.to_string();
    let (ok, out) = check(&edited);
    assert!(!ok && out.contains("record 2 was edited"), "{out}");
    let mut removed = lines.clone();
    removed.remove(2);
    let (ok, out) = check(&removed);
    assert!(!ok && out.contains("records 3 to 3 are missing"), "{out}");
    let mut reordered = lines.clone();
    reordered.swap(1, 2);
    let (ok, out) = check(&reordered);
    assert!(!ok && out.contains("out of order"), "{out}");

    // And in the store itself: an edited row is found by `audit verify`.
    let db = rusqlite_path(&s.broker);
    let status = Command::new("sqlite3")
        .arg(&db)
        .arg("UPDATE audit SET json = replace(json, '\"someone-else\"', '\"nobody\"') WHERE json LIKE '%someone-else%';")
        .status()
        .expect("sqlite3");
    assert!(status.success());
    let verify = run(&["audit", "verify"]);
    assert!(!verify.status.success());
    assert!(String::from_utf8_lossy(&verify.stdout).contains("was edited"));
}

/// Waits until the audit trail holds at least `n` decisions matching `outcome` (spooled
/// decisions are shipped in batches).
async fn wait_for_decisions(broker: &Broker, outcome: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (_, page) = broker.get_as("/v1/audit?since=0", OPERATOR_KEY).await;
        let count = page["records"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter(|r| {
                        r["event"]["kind"] == "decision"
                            && r["event"]["detail"]["outcome"]["decision"] == outcome
                    })
                    .count()
            })
            .unwrap_or(0);
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {count} {outcome} decisions shipped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rusqlite_path(broker: &Broker) -> std::path::PathBuf {
    broker.dir.path().join("data/state.db")
}

#[tokio::test]
async fn policy_replay_reports_exactly_the_decisions_a_changed_policy_flips() {
    let s = setup(
        "",
        &[
            "http://railway/volumes/:read",
            "http://railway/volumes:read",
        ],
    )
    .await;
    for path in ["/v2/volumes/vol_1", "/v2/volumes/vol_2", "/v2/volumes"] {
        assert_eq!(send(&s.proxy, "GET", path, &s.token).await.0, 200);
    }
    assert_eq!(
        send(&s.proxy, "GET", "/v2/backups/bk_1", &s.token).await.0,
        403
    );
    // The setup's readiness probe allowed one read too.
    wait_for_decisions(&s.broker, "allow", 4).await;
    wait_for_decisions(&s.broker, "deny", 1).await;
    let config = s.broker.config_path();
    let export = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["audit", "export", "--config"])
        .arg(&config)
        .output()
        .expect("export");
    let log = s.broker.dir.path().join("audit.jsonl");
    std::fs::write(&log, &export.stdout).expect("write");
    // Candidate policy: the same, but vol_2 is off limits.
    let candidate = s.broker.dir.path().join("candidate");
    std::fs::create_dir_all(&candidate).expect("mkdir");
    let original =
        std::fs::read_to_string(repo().join("policies/adapters/default.dl")).expect("policy");
    std::fs::write(
        candidate.join("default.dl"),
        format!("deny if resource(\"http://railway/volumes/vol_2\");\n{original}"),
    )
    .expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["policy", "replay", "--config"])
        .arg(&config)
        .arg("--audit")
        .arg(&log)
        .arg("--policies")
        .arg(&candidate)
        .output()
        .expect("replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let changed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("record "))
        .collect();
    assert_eq!(changed.len(), 1, "{stdout}");
    assert!(
        changed[0].contains("http://railway/volumes/vol_2 was allowed, would be denied"),
        "{stdout}"
    );
    assert!(stdout.contains(" 1 would change"), "{stdout}");
}

#[tokio::test]
async fn a_broker_restart_loses_no_approval_counter_or_audit_record() {
    let s = setup("", &DELETE_SCOPES).await;
    let (_, _, id) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &s.token).await;
    let id = id.expect("id");
    s.broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    let (_, before) = s.broker.get_as("/v1/audit?since=0", OPERATOR_KEY).await;
    let head_before = before["head"].as_u64().expect("head");
    let Setup { broker, .. } = s;
    let dir = broker.kill();
    let broker = Broker::start_with(dir, None, "", None).await;
    // The restarted broker has the same approval and every audit record.
    let (status, approval) = broker
        .get_as(&format!("/v1/approvals/{id}"), OPERATOR_KEY)
        .await;
    assert_eq!(
        (status, approval["status"].clone()),
        (200, json!("approved"))
    );
    let (_, after) = broker.get_as("/v1/audit?since=0", OPERATOR_KEY).await;
    assert!(after["head"].as_u64().expect("head") >= head_before);
    let store =
        capgate::store::SqliteStore::open(&broker.dir.path().join("data/state.db")).expect("store");
    use capgate::store::Store;
    // Counter windows persist: the next count continues where the last left off.
    let first = store
        .increment("restart-test", Duration::from_secs(60))
        .await
        .expect("count");
    drop(store);
    let store =
        capgate::store::SqliteStore::open(&broker.dir.path().join("data/state.db")).expect("store");
    assert_eq!(
        store
            .increment("restart-test", Duration::from_secs(60))
            .await
            .expect("count"),
        first + 1
    );
}

#[tokio::test]
async fn a_token_use_budget_is_counted_across_its_attenuated_copies() {
    let s = setup("", &["http://railway/volumes/:read"]).await;
    let (status, issued) = s
        .broker
        .post_json(
            "/v1/tokens",
            Some(OPS_KEY),
            json!({"authorization_details": details(&["http://railway/volumes/:read"]), "max_uses": 2}),
        )
        .await;
    assert_eq!(status, 201, "{issued}");
    let token = token_of(&issued);
    let narrowed = capgate::token::attenuate(
        &token,
        &capgate::token::Attenuation {
            resource: Some("http://railway/volumes/vol_1".parse().expect("pattern")),
            ..Default::default()
        },
    )
    .expect("attenuate");
    assert_eq!(
        send(&s.proxy, "GET", "/v2/volumes/vol_1", &token).await.0,
        200
    );
    assert_eq!(
        send(&s.proxy, "GET", "/v2/volumes/vol_1", &narrowed)
            .await
            .0,
        200
    );
    let (status, body, _) = send(&s.proxy, "GET", "/v2/volumes/vol_1", &token).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("use_budget_exhausted"), "{body}");
    let (status, _, _) = send(&s.proxy, "GET", "/v2/volumes/vol_1", &narrowed).await;
    assert_eq!(status, 429, "the attenuated copy shares the budget");
    assert_eq!(s.upstream.seen().len(), 2);
}

#[tokio::test]
async fn writes_are_denied_when_their_audit_record_cannot_be_stored() {
    // A proxy that has no audit key cannot record writes, so it must not perform them.
    let broker = Broker::start_custom(OPS_POLICY, &containment("")).await;
    let (upstream, up_port) = Upstream::start().await;
    let proxy = start_proxy_with_env(
        &broker.url,
        up_port,
        "prod",
        &[(
            "CAPGATE_TEST_ADAPTER_KEY",
            "cga_not_configured_at_the_broker_000",
        )],
    )
    .await;
    let token = token_of(
        &broker
            .issue(
                OPS_KEY,
                &[
                    "http://railway/volumes/:write",
                    "http://railway/volumes/:read",
                ],
                None,
            )
            .await,
    );
    wait_allowed(&proxy, "/v2/volumes/vol_1", &token).await;
    upstream.clear();
    let (status, body, _) = send(&proxy, "POST", "/v2/volumes/vol_1/data", &token).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("audit_unavailable"), "{body}");
    assert!(
        upstream.seen().is_empty(),
        "nothing unrecorded reached the upstream"
    );
    assert_eq!(
        send(&proxy, "GET", "/v2/volumes/vol_1", &token).await.0,
        200,
        "reads are spooled, not blocked"
    );
}

/// An approval belongs to the session (and token lineage) that asked for it. Another
/// session of the same agent can neither collect it nor mark it used: 403
/// `approval_other_session`. The session that asked still can, also with an attenuated
/// copy of its token, and the approved operation then goes through once.
#[tokio::test]
async fn an_approval_is_bound_to_the_session_that_asked() {
    let s = setup("", &DELETE_SCOPES).await;
    let other = token_of(&s.broker.issue(OPS_KEY, &DELETE_SCOPES, None).await);
    let (status, body, id) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &s.token).await;
    assert_eq!(status, 403, "{body}");
    let id = id.expect("approval id header");
    let (status, approved) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    assert_eq!(status, 200, "{approved}");
    let digest = approved["digest"].as_str().expect("digest").to_owned();

    // The other session: no collecting, no consuming.
    let (status, problem) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/grant"), &other)
        .await;
    assert_eq!(
        (status, problem["code"].clone()),
        (403, json!("approval_other_session")),
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("another session"),
        "{problem}"
    );
    let (status, problem) = s
        .broker
        .post_json(
            &format!("/v1/approvals/{id}/consume"),
            Some(&other),
            json!({ "digest": digest }),
        )
        .await;
    assert_eq!(
        (status, problem["code"].clone()),
        (403, json!("approval_other_session")),
        "{problem}"
    );
    // The other session's own delete is still only an approval request of its own.
    let (status, body, other_id) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &other).await;
    assert_eq!(status, 403, "{body}");
    assert_ne!(other_id.as_deref(), Some(id.as_str()));
    assert!(s.upstream.seen().is_empty());

    // The session that asked collects it with an attenuated copy of its token (same
    // lineage) and runs the operation once.
    let narrowed = capgate::token::attenuate(
        &s.token,
        &capgate::token::Attenuation {
            resource: Some("http://railway/volumes/vol_1".parse().expect("pattern")),
            ..Default::default()
        },
    )
    .expect("attenuate");
    let (status, grant) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/grant"), &narrowed)
        .await;
    assert_eq!(status, 200, "{grant}");
    let approved_token = grant["token"].as_str().expect("token").to_owned();
    let (status, body, _) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &approved_token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.upstream.seen().len(), 1);
}

/// An operator who shares the requesting agent's name cannot approve its request (a person
/// running both an agent and an operator key under one name), with one operator required
/// or under the two-person rule, where it does not count as either person.
#[tokio::test]
async fn an_operator_cannot_approve_a_request_made_under_its_own_name() {
    const SELF_OPERATOR_KEY: &str = "cgo_test_self_ops_bot_0123456789abcd";
    let operator = format!(
        "approvers_required = 2\n\n[[operators]]\nname = \"ops-bot\"\nsha256 = \"{}\"\n",
        sha256(SELF_OPERATOR_KEY)
    );
    let s = setup(&operator, &DELETE_SCOPES).await;
    let (_, _, id) = send(&s.proxy, "DELETE", "/v2/volumes/vol_1", &s.token).await;
    let id = id.expect("id");
    let refused = |body: &Value| {
        assert_eq!(body["code"], "approval_self", "{body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("ops-bot") && detail.contains("own"),
            "the reason names who and why: {body}"
        );
    };
    let (status, body) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), SELF_OPERATOR_KEY)
        .await;
    assert_eq!(status, 403, "{body}");
    refused(&body);
    let (_, first) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    assert_eq!(first["status"], "pending", "{first}");
    // Not the second person either.
    let (status, body) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), SELF_OPERATOR_KEY)
        .await;
    assert_eq!(status, 403, "{body}");
    refused(&body);
    let (_, shown) = s
        .broker
        .get_as(&format!("/v1/approvals/{id}"), OPERATOR_KEY)
        .await;
    assert_eq!(
        (shown["status"].clone(), shown["approvers"].clone()),
        (json!("pending"), json!(["alice"]))
    );
    let (_, second) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_BOB_KEY)
        .await;
    assert_eq!(second["status"], "approved", "{second}");
}
