//! The audit trail as evidence: it never holds a bearer token that could be replayed, replays
//! still work from what it does hold, and truncating or rewriting it is caught against a
//! signed checkpoint kept outside the store, by `audit verify` and by the broker at start.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::proxy::*;
use common::*;
use serde_json::{json, Value};

const CONTAINMENT: &str = "[containment]\napproval_verbs = [\"delete\"]\n";

fn capgate(args: &[&str], config: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run capgate")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until the trail holds at least `n` decisions that ran the policy (adapters ship them
/// in batches; denials before the adapter's first sync do not count).
async fn wait_for_decisions(broker: &Broker, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (_, page) = broker.get_as("/v1/audit?since=0", OPERATOR_KEY).await;
        let records = page["records"].as_array().cloned().unwrap_or_default();
        let decisions = records
            .iter()
            .filter(|r| {
                let outcome = &r["event"]["detail"]["outcome"];
                r["event"]["kind"] == "decision"
                    && (outcome["decision"] != "deny" || outcome["code"] == "policy_denied")
            })
            .count();
        if decisions >= n {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "only {decisions} decisions shipped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every 32-character window of the token: a trail holding any of them holds a piece of it.
fn token_windows(token: &str) -> Vec<&str> {
    (0..token.len().saturating_sub(32))
        .step_by(8)
        .filter_map(|i| token.get(i..i + 32))
        .collect()
}

#[tokio::test]
async fn the_audit_trail_holds_no_bearer_token_and_replay_still_works() {
    let broker = Broker::start_custom(OPS_POLICY, CONTAINMENT).await;
    let (_upstream, up_port) = Upstream::start().await;
    let proxy = start_proxy(&broker.url, up_port, "prod").await;
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
    assert_eq!(
        call(&proxy, "GET", "/v2/volumes/vol_2", Some(&token))
            .await
            .0,
        200
    );
    assert_eq!(
        call(&proxy, "GET", "/v2/backups/bk_1", Some(&token))
            .await
            .0,
        403
    );
    // An approved delete: the token then carries a third-party block signed by the approval
    // key, whose scoping a replay must reproduce.
    let response = reqwest::Client::new()
        .delete(format!("{}/v2/volumes/vol_1", proxy.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 403);
    let id = response.headers()["capgate-approval-id"]
        .to_str()
        .expect("id")
        .to_owned();
    broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    let (status, grant) = broker
        .post_as(&format!("/v1/approvals/{id}/grant"), &token)
        .await;
    assert_eq!(status, 200, "{grant}");
    let approved = grant["token"].as_str().expect("token").to_owned();
    assert_eq!(
        call(&proxy, "DELETE", "/v2/volumes/vol_1", Some(&approved))
            .await
            .0,
        200
    );
    // readiness probe + vol_2 + backup deny + approval_required + approved delete
    wait_for_decisions(&broker, 5).await;

    let config = broker.config_path();
    let export = capgate(&["audit", "export"], &config);
    assert!(export.status.success(), "{}", stdout(&export));
    let text = stdout(&export);
    for secret in [&token, &approved] {
        for window in token_windows(secret) {
            assert!(
                !text.contains(window),
                "the exported trail holds a piece of a bearer token: {window}"
            );
        }
    }
    // What a decision record holds instead: the token's digest, its blocks' Datalog (which
    // block is which) and its revocation ids.
    let decisions: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|r| r["event"]["kind"] == "decision")
        .collect();
    let approved_digest = sha256(&approved);
    let record = decisions
        .iter()
        .find(|r| r["event"]["detail"]["token_sha256"] == json!(approved_digest))
        .unwrap_or_else(|| panic!("no decision names the approved token's digest: {decisions:?}"));
    let blocks = record["event"]["detail"]["blocks"]
        .as_array()
        .expect("blocks");
    assert_eq!(blocks[0]["kind"], "authority", "{blocks:?}");
    assert!(
        blocks[0]["source"]
            .as_str()
            .is_some_and(|s| s.contains("right(\"http://railway/volumes/vol_1\", \"delete\"")),
        "{blocks:?}"
    );
    let third = blocks.last().expect("a block");
    assert_eq!(third["kind"], "third_party", "{blocks:?}");
    assert!(
        third["source"]
            .as_str()
            .is_some_and(|s| s.contains("approved(")),
        "{blocks:?}"
    );
    assert!(third["external_key"]
        .as_str()
        .is_some_and(|k| k.starts_with("ed25519/")));
    assert_eq!(
        record["event"]["detail"]["revocation_ids"]
            .as_array()
            .map(Vec::len),
        Some(blocks.len())
    );

    // Replay works from those records: the same policy changes nothing (so every block,
    // the third-party one included, was rebuilt faithfully), and a candidate flips vol_2.
    let log = broker.dir.path().join("audit.jsonl");
    std::fs::write(&log, &export.stdout).expect("write");
    let replay = |policies: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_capgate"))
            .args(["policy", "replay", "--config"])
            .arg(&config)
            .arg("--audit")
            .arg(&log)
            .arg("--policies")
            .arg(policies)
            .output()
            .expect("replay")
    };
    let same = replay(&repo().join("policies/adapters"));
    let out = stdout(&same);
    assert!(same.status.success(), "{out}");
    assert!(out.contains(" 0 would change"), "{out}");
    assert!(out.starts_with("5 decisions replayed"), "{out}");
    assert!(!out.contains("record "), "{out}");
    let candidate = broker.dir.path().join("candidate");
    std::fs::create_dir_all(&candidate).expect("mkdir");
    let original =
        std::fs::read_to_string(repo().join("policies/adapters/default.dl")).expect("policy");
    std::fs::write(
        candidate.join("default.dl"),
        format!("deny if resource(\"http://railway/volumes/vol_2\");\n{original}"),
    )
    .expect("write");
    let flipped = replay(&candidate);
    let out = stdout(&flipped);
    assert!(
        out.contains("http://railway/volumes/vol_2 was allowed, would be denied")
            && out.contains(" 1 would change"),
        "{out}"
    );

    // A trail written by an older Capgate, with a bearer token in a record, is refused by
    // name rather than replayed.
    let mut legacy: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let seq = record["seq"].as_u64().expect("seq");
    let index = legacy
        .iter()
        .position(|r| r["seq"] == json!(seq))
        .expect("record");
    legacy[index]["event"]["detail"]["token"] = json!(approved);
    let lines: Vec<String> = legacy.iter().map(Value::to_string).collect();
    std::fs::write(&log, lines.join("\n")).expect("write");
    let refused = replay(&candidate);
    let all = format!(
        "{}{}",
        stdout(&refused),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "{all}");
    assert!(
        all.contains(&format!("record {seq}")) && all.contains("bearer token"),
        "{all}"
    );
}

/// Appends `n` operator records (revocations of made-up agents) and returns the head.
async fn append_records(broker: &Broker, n: usize) -> u64 {
    for i in 0..n {
        let (status, body) = broker.revoke("agent", &format!("gone-bot-{i}")).await;
        assert_eq!(status, 201, "{body}");
    }
    let (_, page) = broker.get_as("/v1/audit?since=0", OPERATOR_KEY).await;
    page["head"].as_u64().expect("head")
}

/// Waits until the broker's published checkpoint covers `head` (it signs one shortly after
/// appends); gives up quietly so an old broker without checkpoints fails the assertions after.
async fn wait_for_checkpoint(broker: &Broker, head: u64) {
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let (status, body) = broker.get("/v1/audit/checkpoint").await;
        if status == 200 && body["checkpoint"]["seq"].as_u64() >= Some(head) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sqlite(db: &std::path::Path, sql: &str) {
    let status = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .status()
        .expect("sqlite3");
    assert!(status.success(), "sqlite3 {sql}");
}

#[tokio::test]
async fn deleting_the_newest_audit_records_is_caught_against_the_signed_checkpoint() {
    let broker = Broker::start().await;
    let head = append_records(&broker, 5).await;
    wait_for_checkpoint(&broker, head).await;
    let config = broker.config_path();
    assert!(capgate(&["audit", "verify"], &config).status.success());
    let dir = broker.kill();
    let config = dir.path().join("capgate.toml");
    let db = dir.path().join("data/state.db");
    // Remove the two newest records, as someone covering their tracks would.
    sqlite(&db, &format!("DELETE FROM audit WHERE seq > {};", head - 2));

    let verify = capgate(&["audit", "verify"], &config);
    let out = stdout(&verify);
    assert!(!verify.status.success(), "truncation went unnoticed: {out}");
    assert!(
        out.contains(&format!("records {} to {head} are missing", head - 1))
            && out.contains("checkpoint"),
        "{out}"
    );

    // The broker refuses to start on a store behind its checkpoint, saying why and how to
    // accept it anyway.
    let refused = serve_refusal(&config, &[]).expect("the broker started on a truncated trail");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("checkpoint") && stderr.contains("--accept-audit-rollback"),
        "{stderr}"
    );
    assert!(
        serve_refusal(&config, &["--accept-audit-rollback"]).is_none(),
        "the explicit flag lets the broker start"
    );
}

#[tokio::test]
async fn rewriting_audit_records_and_their_hashes_is_caught_against_the_signed_checkpoint() {
    use capgate::containment::audit::{record_hash, AuditRecord};
    let broker = Broker::start().await;
    let head = append_records(&broker, 5).await;
    wait_for_checkpoint(&broker, head).await;
    let dir = broker.kill();
    let config = dir.path().join("capgate.toml");
    let db = dir.path().join("data/state.db");
    // Rewrite record 2 and recompute every later hash, so the chain itself is consistent.
    let export = capgate(&["audit", "export"], &config);
    let mut records: Vec<AuditRecord> = stdout(&export)
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    assert_eq!(records.len() as u64, head);
    records[1].event.actor = Some("nobody".into());
    for i in 1..records.len() {
        let prev = records[i - 1].hash.clone();
        let r = &mut records[i];
        r.prev_hash = prev;
        r.hash = record_hash(r.seq, r.at, &r.prev_hash, &r.event);
    }
    let mut sql = String::from("BEGIN;");
    for r in &records[1..] {
        let json = serde_json::to_string(r).expect("json").replace('\'', "''");
        sql.push_str(&format!(
            "UPDATE audit SET json = '{json}' WHERE seq = {};",
            r.seq
        ));
    }
    sql.push_str("COMMIT;");
    sqlite(&db, &sql);
    let rewritten = stdout(&capgate(&["audit", "export"], &config));
    let file = dir.path().join("rewritten.jsonl");
    std::fs::write(&file, &rewritten).expect("write");
    // Consistent on its own: without the checkpoint nothing would show.
    assert!(rewritten.contains("nobody"));

    let verify = capgate(&["audit", "verify"], &config);
    let out = stdout(&verify);
    assert!(!verify.status.success(), "rewrite went unnoticed: {out}");
    assert!(
        out.contains(&format!(
            "record {head} does not match the signed checkpoint"
        )),
        "{out}"
    );
    // The exported copy is checked against the same checkpoint.
    let verify_file = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["audit", "verify", "--file"])
        .arg(&file)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    assert!(!verify_file.status.success(), "{}", stdout(&verify_file));
    let refused = serve_refusal(&config, &[]).expect("the broker started on a rewritten trail");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("checkpoint"), "{stderr}");
}

#[tokio::test]
async fn a_replaced_state_database_is_a_lost_store_and_the_broker_will_not_start_on_it() {
    let broker = Broker::start().await;
    let head = append_records(&broker, 2).await;
    wait_for_checkpoint(&broker, head).await;
    let dir = broker.kill();
    let config = dir.path().join("capgate.toml");
    // The embedded store deleted (with its revocations): a fresh one would be created empty.
    for name in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join("data").join(name));
    }
    let refused = serve_refusal(&config, &[]).expect("the broker started on a replaced store");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("store lost") && stderr.contains("--accept-store-loss"),
        "{stderr}"
    );
    // `audit verify` says the same of the store as it is.
    let verify = capgate(&["audit", "verify"], &config);
    assert!(!verify.status.success());
    assert!(
        stdout(&verify).contains("emptied or replaced"),
        "{}",
        stdout(&verify)
    );
    // Accepted explicitly: a new generation, whose first record says what happened.
    assert!(serve_refusal(&config, &["--accept-store-loss"]).is_none());
    let export = stdout(&capgate(&["audit", "export"], &config));
    let first: Value =
        serde_json::from_str(export.lines().next().expect("a record")).expect("json");
    assert_eq!(first["event"]["kind"], "integrity", "{export}");
    assert_eq!(first["event"]["detail"]["event"], "store_loss_accepted");
    assert!(capgate(&["audit", "verify"], &config).status.success());
}
