//! Hostile tokens through every real surface that reads one: the HTTP proxy, the broker's
//! routes and the CLI. Issue #9's classes: whatever is read from a token before its signature
//! is verified is bounded before use (an out-of-range time once panicked the peek), and only
//! the one canonical spelling of a verified token is accepted (re-encodings once verified).

mod common;

use std::process::Output;

use base64::Engine;
use biscuit_auth::builder::{fact, string, BlockBuilder};
use biscuit_auth::{Biscuit, KeyPair};
use common::proxy::*;
use common::*;
use serde_json::{json, Value};

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE;
const VOLUME: &str = "http://railway/volumes/vol_1";

/// A token shaped like the broker's, with `exp` as its signed context's expiry.
fn token_expiring_at(exp: u64, key_id: u32, key: &KeyPair) -> String {
    let context = json!({"capgate": 1, "agent": "reporting-bot", "session": "s1", "exp": exp});
    let block = BlockBuilder::new()
        .fact(fact("agent", &[string("reporting-bot")]))
        .and_then(|b| {
            b.fact(fact(
                "right",
                &[
                    string("http://railway/volumes/"),
                    string("read"),
                    string("prod"),
                ],
            ))
        })
        .expect("facts")
        .context(context.to_string());
    let biscuit = Biscuit::builder()
        .merge(block)
        .root_key_id(key_id)
        .build(key)
        .expect("build");
    BASE64.encode(biscuit.to_vec().expect("bytes"))
}

/// GET through the proxy; a dropped connection is status 0 rather than a test panic.
async fn through_proxy(proxy: &ProxyProcess, token: &str) -> (u16, String) {
    let sent = reqwest::Client::new()
        .get(format!("{}/v2/volumes/vol_1", proxy.url))
        .header("capgate-token", token)
        .send()
        .await;
    match sent {
        Ok(response) => (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        ),
        Err(e) => (0, format!("connection dropped: {e}")),
    }
}

fn code_in(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Every broker route that reads an agent's token, as (route, status, code); the dry run
/// answers 200 with the decision, the others 401 with a problem.
async fn through_broker(broker: &Broker, token: &str) -> Vec<(&'static str, u16, String)> {
    let client = reqwest::Client::new();
    let routes: [(&str, &str, Option<Value>); 6] = [
        (
            "/v1/authorize",
            "/v1/authorize",
            Some(json!({"token": token, "resource": VOLUME, "verb": "read"})),
        ),
        (
            "/v1/velocity",
            "/v1/velocity",
            Some(json!({"verb": "write"})),
        ),
        ("/v1/uses", "/v1/uses", None),
        ("/v1/approvals", "/v1/approvals", Some(json!({}))),
        ("/v1/approvals/{id}/grant", "/v1/approvals/a1/grant", None),
        (
            "/v1/approvals/{id}/consume",
            "/v1/approvals/a1/consume",
            Some(json!({"digest": "d"})),
        ),
    ];
    let mut answers = Vec::new();
    for (route, path, body) in routes {
        let mut request = client.post(format!("{}{path}", broker.url));
        if route != "/v1/authorize" {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                (status, code_in(&text))
            }
            Err(e) => (0, format!("connection dropped: {e}")),
        };
        answers.push((route, answer.0, answer.1));
    }
    answers
}

fn cli(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run capgate")
}

fn exit_code(output: &Output) -> Option<i32> {
    output.status.code()
}

/// Expiries no broker mints, each past a different edge: `SystemTime` overflow, the largest
/// `SystemTime`, and the first instant RFC 3339 cannot print. Forged with a stranger's key
/// (rejected only after the peek) and signed with the broker's own key (reaches every step).
#[tokio::test]
async fn out_of_range_times_in_a_token_are_malformed_on_every_surface() {
    let broker = Broker::start().await;
    let (upstream, up_port) = Upstream::start().await;
    let proxy = start_proxy(&broker.url, up_port, "prod").await;
    let good = token_of(
        &broker
            .issue(READER_KEY, &["http://railway/volumes/:read"], None)
            .await,
    );
    wait_allowed(&proxy, "/v2/volumes/vol_1", &good).await;
    upstream.clear();
    let ring = capgate::token::Keyring::open(&broker.dir.path().join("data")).expect("keys");
    let key_id = ring.active_key_id();
    let stranger = KeyPair::new();
    let mut attacks = Vec::new();
    for (label, exp) in [
        ("u64::MAX", u64::MAX),
        ("2^63", 1 << 63),
        ("i64::MAX", i64::MAX as u64),
        ("year 10000", 253_402_300_800),
    ] {
        attacks.push((
            format!("{label}, forged"),
            token_expiring_at(exp, key_id, &stranger),
        ));
        attacks.push((
            format!("{label}, signed by the broker"),
            token_expiring_at(exp, key_id, ring.signing_key()),
        ));
    }
    let config = broker.config_path();
    let config = config.to_str().expect("utf8 path");
    for (label, token) in &attacks {
        let (status, body) = through_proxy(&proxy, token).await;
        assert_eq!(
            (status, code_in(&body).as_str()),
            (401, "token_malformed"),
            "proxy, {label}: {body}"
        );
        for (route, status, code) in through_broker(&broker, token).await {
            let expected = if route == "/v1/authorize" { 200 } else { 401 };
            assert_eq!(
                (status, code.as_str()),
                (expected, "token_malformed"),
                "{route}, {label}"
            );
        }
        for args in [
            vec!["token", "inspect", token.as_str()],
            vec!["token", "inspect", "--config", config, token.as_str()],
        ] {
            let output = cli(&args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(exit_code(&output), Some(1), "{args:?}, {label}: {stderr}");
            assert!(
                stderr.contains("token is not a well-formed Capgate biscuit"),
                "{args:?}, {label}: {stderr}"
            );
        }
        let explain = cli(&[
            "policy",
            "explain",
            "--config",
            config,
            "--token",
            token,
            "--resource",
            VOLUME,
            "--verb",
            "read",
        ]);
        let stdout = String::from_utf8_lossy(&explain.stdout);
        assert_eq!(exit_code(&explain), Some(1), "policy explain, {label}");
        assert!(
            stdout.contains("\"code\": \"token_malformed\""),
            "policy explain, {label}: {stdout}"
        );
    }
    // The same forgery with an ordinary expiry gets as far as the signature check: the time,
    // and nothing else, is what made the rows above malformed.
    let control = token_expiring_at(now_secs() + 600, key_id, &stranger);
    let (status, body) = through_proxy(&proxy, &control).await;
    assert_eq!(
        (status, code_in(&body).as_str()),
        (401, "token_bad_signature")
    );
    // Everything kept serving, and nothing hostile reached the upstream.
    assert_eq!(through_proxy(&proxy, &good).await.0, 200);
    assert_eq!(upstream.seen().len(), 1, "{:?}", upstream.seen());
    assert_eq!(
        broker.dry_run(&good, VOLUME, "read").await["decision"],
        "allow"
    );
}
