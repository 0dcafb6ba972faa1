//! Revocation, attenuation, key rotation, restarts and hostile input, through the real binary.

mod common;

use std::time::Duration;

use biscuit_auth::builder::{fact, string, BlockBuilder};
use biscuit_auth::UnverifiedBiscuit;
use common::*;
use serde_json::json;

fn revocation_ids(token: &str) -> Vec<String> {
    capgate::token::inspect(token, None)
        .expect("inspect")
        .revocation_ids
}

#[tokio::test]
async fn revocation_by_token_id_session_and_agent() {
    let broker = Broker::start().await;
    let scopes = ["pg://prod/public.t:read"];
    let by_id = token_of(&broker.issue(READER_KEY, &scopes, None).await);
    let by_session = broker.issue(READER_KEY, &scopes, None).await;
    let untouched = token_of(&broker.issue(READER_KEY, &scopes, None).await);

    let (status, entry) = broker.revoke("token", &revocation_ids(&by_id)[0]).await;
    assert_eq!(status, 201, "{entry}");
    let (status, _) = broker
        .revoke("session", by_session["session_id"].as_str().expect("sid"))
        .await;
    assert_eq!(status, 201);
    for (token, label) in [
        (by_id.as_str(), "by id"),
        (token_of(&by_session).as_str(), "by session"),
    ] {
        let decision = broker.dry_run(token, "pg://prod/public.t", "read").await;
        assert_eq!(decision["code"], "token_revoked", "{label}: {decision}");
    }
    assert_eq!(
        broker
            .dry_run(&untouched, "pg://prod/public.t", "read")
            .await["decision"],
        "allow"
    );

    // Revoking a parent id also revokes what was attenuated from it.
    let parent = token_of(&broker.issue(READER_KEY, &scopes, None).await);
    let child = capgate::token::attenuate(
        &parent,
        &capgate::token::Attenuation {
            verbs: vec![capgate::scope::Verb::Read],
            ..Default::default()
        },
    )
    .expect("attenuate");
    broker.revoke("token", &revocation_ids(&parent)[0]).await;
    assert_eq!(
        broker.dry_run(&child, "pg://prod/public.t", "read").await["code"],
        "token_revoked"
    );

    // Kill switch: every token of the agent fails and it gets no new ones.
    let (status, _) = broker.revoke("agent", "reporting-bot").await;
    assert_eq!(status, 201);
    assert_eq!(
        broker
            .dry_run(&untouched, "pg://prod/public.t", "read")
            .await["code"],
        "token_revoked"
    );
    let (status, body) = broker.request_token(READER_KEY, &scopes, None).await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, json!("agent_revoked"))
    );
    // Other agents are unaffected.
    broker.issue(DEPLOY_BOT_KEY, &scopes, None).await;

    // The feed lists all of it, in cursor order, for adapters.
    let (status, feed) = broker.get("/v1/revocations?since=0").await;
    assert_eq!(status, 200);
    let entries = feed["revocations"].as_array().expect("entries");
    assert_eq!(entries.len(), 4);
    let cursors: Vec<u64> = entries
        .iter()
        .map(|e| e["cursor"].as_u64().expect("cursor"))
        .collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]));
    let (_, tail) = broker
        .get(&format!("/v1/revocations?since={}", cursors[2]))
        .await;
    assert_eq!(tail["revocations"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn only_operators_can_revoke() {
    let broker = Broker::start().await;
    for credential in [Some(DEPLOY_BOT_KEY), Some("cgo_not_an_operator"), None] {
        let (status, body) = broker
            .post_json(
                "/v1/revocations",
                credential,
                json!({"kind": "agent", "value": "deploy-bot"}),
            )
            .await;
        assert_eq!(status, 401, "{credential:?}: {body}");
    }
    broker
        .issue(DEPLOY_BOT_KEY, &["pg://staging/:write"], None)
        .await;
}

#[tokio::test]
async fn long_poll_returns_as_soon_as_a_revocation_lands() {
    let broker = Broker::start().await;
    let url = format!("{}/v1/revocations?since=0&wait=10", broker.url);
    let started = std::time::Instant::now();
    let poll = tokio::spawn(async move {
        reqwest::get(url)
            .await
            .expect("poll")
            .json::<serde_json::Value>()
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.revoke("agent", "some-bot").await;
    let page = poll.await.expect("join").expect("json");
    assert_eq!(page["revocations"].as_array().map(Vec::len), Some(1));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "long poll waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn attenuation_narrows_and_forged_facts_in_blocks_do_not_widen() {
    let broker = Broker::start().await;
    let token = token_of(
        &broker
            .issue(
                DEPLOY_BOT_KEY,
                &["pg://staging/:write", "pg://staging/:read"],
                None,
            )
            .await,
    );
    let narrowed = capgate::token::attenuate(
        &token,
        &capgate::token::Attenuation {
            resource: Some("pg://staging/public.bookings".parse().expect("pattern")),
            verbs: vec![capgate::scope::Verb::Read],
            expires_at: None,
        },
    )
    .expect("attenuate");
    assert_eq!(
        broker
            .dry_run(&narrowed, "pg://staging/public.bookings", "read")
            .await["decision"],
        "allow"
    );
    for (resource, verb) in [
        ("pg://staging/public.bookings", "write"),
        ("pg://staging/public.other", "read"),
    ] {
        let decision = broker.dry_run(&narrowed, resource, verb).await;
        assert_eq!(
            decision["code"], "policy_denied",
            "{resource} {verb}: {decision}"
        );
    }
    // A holder appends a block that claims a prod right: the adapter policy never sees it.
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE;
    let bytes = engine.decode(&token).expect("b64");
    let forged = UnverifiedBiscuit::from(&bytes)
        .expect("parse")
        .append(
            BlockBuilder::new()
                .fact(fact(
                    "right",
                    &[string("pg://prod/"), string("delete"), string("prod")],
                ))
                .expect("fact"),
        )
        .expect("append");
    let forged = engine.encode(forged.to_vec().expect("bytes"));
    let decision = broker
        .dry_run(&forged, "pg://prod/public.bookings", "delete")
        .await;
    assert_eq!(decision["code"], "policy_denied", "{decision}");
    // The CLI attenuates the same way.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args([
            "token",
            "attenuate",
            &token,
            "--verb",
            "read",
            "--ttl",
            "1s",
        ])
        .output()
        .expect("cli");
    assert!(output.status.success());
    let short = String::from_utf8(output.stdout).expect("utf8");
    assert_eq!(
        broker
            .dry_run(short.trim(), "pg://staging/x.y", "read")
            .await["decision"],
        "allow"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = broker
        .dry_run(short.trim(), "pg://staging/x.y", "read")
        .await;
    assert_eq!(
        expired["code"], "policy_denied",
        "the attenuated TTL check fails: {expired}"
    );
}

#[tokio::test]
async fn state_and_keys_survive_a_killed_broker() {
    let broker = Broker::start().await;
    let (_, keys_before) = broker.get("/v1/keys").await;
    let kept = token_of(
        &broker
            .issue(READER_KEY, &["pg://prod/public.t:read"], None)
            .await,
    );
    let revoked = token_of(
        &broker
            .issue(READER_KEY, &["pg://prod/public.t:read"], None)
            .await,
    );
    broker.revoke("token", &revocation_ids(&revoked)[0]).await;
    broker.revoke("agent", "deploy-bot").await;
    let dir = broker.kill();

    let broker = Broker::start_in(dir).await;
    let (_, keys_after) = broker.get("/v1/keys").await;
    assert_eq!(
        keys_before, keys_after,
        "the root key is reused, not regenerated"
    );
    assert_eq!(
        broker.dry_run(&kept, "pg://prod/public.t", "read").await["decision"],
        "allow"
    );
    assert_eq!(
        broker.dry_run(&revoked, "pg://prod/public.t", "read").await["code"],
        "token_revoked"
    );
    let (status, _) = broker
        .request_token(DEPLOY_BOT_KEY, &["pg://staging/:write"], None)
        .await;
    assert_eq!(status, 403, "agent revocation persisted");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = broker.dir.path().join("data/keys/root-1.key");
        let mode = std::fs::metadata(key)
            .expect("key file")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[tokio::test]
async fn key_rotation_keeps_old_tokens_valid_until_the_overlap_ends() {
    let broker = Broker::start().await;
    let old = token_of(
        &broker
            .issue(READER_KEY, &["pg://prod/public.t:read"], None)
            .await,
    );
    let until =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3))
            .to_string();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["keys", "rotate", "--config"])
        .arg(broker.config_path())
        .args(["--verify-old-until", &until])
        .output()
        .expect("rotate");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The running broker notices the new ring.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, keys) = broker.get("/v1/keys").await;
        if keys["active_key_id"] == 2 {
            assert_eq!(keys["keys"].as_array().map(Vec::len), Some(2));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotation not picked up: {keys}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new = broker
        .issue(READER_KEY, &["pg://prod/public.t:read"], None)
        .await;
    assert_eq!(new["key_id"], 2);
    assert_eq!(
        broker.dry_run(&old, "pg://prod/public.t", "read").await["decision"],
        "allow"
    );
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(
        broker.dry_run(&old, "pg://prod/public.t", "read").await["code"],
        "token_key_retired"
    );
    assert_eq!(
        broker
            .dry_run(&token_of(&new), "pg://prod/public.t", "read")
            .await["decision"],
        "allow"
    );
}

/// One row per hostile request; each gets its 4xx and code, and the broker keeps serving.
#[tokio::test]
async fn hostile_input_gets_problem_json_and_the_broker_keeps_serving() {
    let broker = Broker::start().await;
    let client = reqwest::Client::new();
    let huge = "x".repeat(70 * 1024);
    let rows: Vec<(&str, &str, &str, String, u16, &str)> = vec![
        ("malformed JSON", "/v1/tokens", "application/json", "{\"authorization_details\": [".into(), 400, "malformed_json"),
        ("unknown field", "/v1/tokens", "application/json", json!({"authorization_details": details(&["pg://prod/t:read"]), "admin": true}).to_string(), 400, "unknown_field"),
        ("unknown field in a detail", "/v1/tokens", "application/json", json!({"authorization_details": [{"type": "capgate", "locations": ["pg://prod/t"], "actions": ["read"], "x": 1}]}).to_string(), 400, "unknown_field"),
        ("oversized body", "/v1/tokens", "application/json", format!("{{\"pad\": \"{huge}\"}}"), 413, "body_too_large"),
        ("wrong content type", "/v1/tokens", "text/plain", "hello".into(), 415, "unsupported_media_type"),
        ("unknown verb", "/v1/tokens", "application/json", json!({"authorization_details": [{"type": "capgate", "locations": ["pg://prod/t"], "actions": ["destroy"]}]}).to_string(), 422, "invalid_scope"),
        ("wildcard resource", "/v1/tokens", "application/json", json!({"authorization_details": [{"type": "capgate", "locations": ["pg://prod/*"], "actions": ["read"]}]}).to_string(), 422, "invalid_scope"),
        ("dot segments", "/v1/tokens", "application/json", json!({"authorization_details": [{"type": "capgate", "locations": ["http://railway/volumes/../backups/"], "actions": ["read"]}]}).to_string(), 422, "invalid_scope"),
        ("empty request", "/v1/tokens", "application/json", json!({"authorization_details": []}).to_string(), 422, "invalid_scope"),
        ("dry run with no token field", "/v1/authorize", "application/json", json!({"resource": "pg://prod/t", "verb": "read"}).to_string(), 422, "invalid_request"),
        ("dry run, unknown environment", "/v1/authorize", "application/json", json!({"token": "x", "resource": "pg://nowhere/t", "verb": "read"}).to_string(), 422, "unknown_environment"),
    ];
    for (attack, path, content_type, body, status, code) in rows {
        let response = client
            .post(format!("{}{path}", broker.url))
            .bearer_auth(READER_KEY)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("send");
        let (got, problem) = decode(response).await;
        assert_eq!(
            (got, problem["code"].as_str().unwrap_or("")),
            (status, code),
            "{attack}: {problem}"
        );
    }
    let (status, body) = broker.get("/v1/nothing-here").await;
    assert_eq!((status, body["code"].clone()), (404, json!("not_found")));
    let response = client
        .delete(format!("{}/v1/keys", broker.url))
        .send()
        .await
        .expect("send");
    assert_eq!(decode(response).await.0, 405);
    let (status, body) = broker.get("/v1/revocations?since=minus-one").await;
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("invalid_query"))
    );

    // Tokens that are garbage, truncated, bit-flipped or signed by another broker are denies.
    let good = token_of(&broker.issue(READER_KEY, &["pg://prod/t:read"], None).await);
    let mut flipped = good.clone().into_bytes();
    let middle = flipped.len() / 2;
    flipped[middle] = if flipped[middle] == b'A' { b'B' } else { b'A' };
    let other_broker = Broker::start().await;
    let foreign = token_of(
        &other_broker
            .issue(READER_KEY, &["pg://prod/t:read"], None)
            .await,
    );
    let rows = [
        ("garbage", "not a token".to_owned(), vec!["token_malformed"]),
        ("empty", String::new(), vec!["token_malformed"]),
        (
            "truncated",
            good[..good.len() / 2].to_owned(),
            vec!["token_malformed"],
        ),
        (
            "bit flip",
            String::from_utf8(flipped).expect("ascii"),
            vec!["token_malformed", "token_bad_signature"],
        ),
        ("huge", "A".repeat(40_000), vec!["token_too_large"]),
        (
            "signed by another broker's key",
            foreign,
            vec!["token_bad_signature"],
        ),
    ];
    for (attack, token, codes) in rows {
        let decision = broker.dry_run(&token, "pg://prod/t", "read").await;
        assert_eq!(decision["decision"], "deny", "{attack}");
        let code = decision["code"].as_str().unwrap_or("");
        assert!(codes.contains(&code), "{attack}: {decision}");
    }
    let (status, _) = broker.get("/v1/health").await;
    assert_eq!(status, 200, "still serving");
}

#[tokio::test]
async fn a_broken_policy_stops_the_broker_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir");
    std::fs::write(
        policies.join("ok.dl"),
        "grant($r, \"read\") <- requested($r, \"read\");\n",
    )
    .expect("write");
    std::fs::write(
        policies.join("broken.dl"),
        "// fine\n\ngrant($r, <- requested($r);\n",
    )
    .expect("write");
    let config = dir.path().join("capgate.toml");
    std::fs::write(
        &config,
        config_text(free_port(), &dir.path().join("data"), &policies),
    )
    .expect("config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("broken.dl:3:"), "{stderr}");
}

#[tokio::test]
async fn policy_cli_checks_tests_and_explains() {
    let broker = Broker::start().await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_capgate"))
            .args(args)
            .arg("--config")
            .arg(broker.config_path())
            .output()
            .expect("run")
    };
    assert!(run(&["policy", "check"]).status.success());
    let test = run(&["policy", "test"]);
    assert!(
        test.status.success(),
        "{}",
        String::from_utf8_lossy(&test.stdout)
    );
    assert!(String::from_utf8_lossy(&test.stdout).contains(" passed, 0 failed"));
    let token = token_of(
        &broker
            .issue(DEPLOY_BOT_KEY, &["pg://staging/:write"], None)
            .await,
    );
    let allow = run(&[
        "policy",
        "explain",
        "--token",
        &token,
        "--resource",
        "pg://staging/public.t",
        "--verb",
        "write",
    ]);
    assert!(
        allow.status.success(),
        "{}",
        String::from_utf8_lossy(&allow.stdout)
    );
    let deny = run(&[
        "policy",
        "explain",
        "--token",
        &token,
        "--resource",
        "pg://staging/public.t",
        "--verb",
        "delete",
    ]);
    assert!(!deny.status.success());
    assert!(String::from_utf8_lossy(&deny.stdout).contains("no allow policy matched"));
}
