//! Hostile tokens through every real surface that reads one: the HTTP proxy, the broker's
//! routes and the CLI. Issue #9's classes: whatever is read from a token before its signature
//! is verified is bounded before use (an out-of-range time once panicked the peek), and only
//! the one canonical spelling of a verified token is accepted (re-encodings once verified).

mod common;

use std::process::Output;

use base64::Engine;
use biscuit_auth::builder::{fact, string, BlockBuilder};
use biscuit_auth::format::schema;
use biscuit_auth::{Biscuit, KeyPair};
use common::proxy::*;
use common::*;
use prost::Message;
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

/// How one field of a token's container is spelled differently. None of these touches the
/// signed block bytes, so each re-encoding still carries a valid signature chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Respelling {
    /// The canonical encoding, byte for byte (checks the encoder below).
    Faithful,
    UnknownTopLevelField,
    UnknownFieldInAuthorityBlock,
    PaddedRootKeyId,
    PaddedAuthorityLength,
    /// `2^32` fits the varint but not the `int32` field, so prost reads it as 0: Ed25519.
    NextKeyAlgorithmReadAsDefault,
    ExplicitDefaultVersion,
}

fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// The same value with one redundant continuation byte.
fn padded_varint(value: u64) -> Vec<u8> {
    let mut out = varint(value);
    if let Some(last) = out.last_mut() {
        *last |= 0x80;
    }
    out.push(0);
    out
}

fn length_delimited(out: &mut Vec<u8>, key: u8, payload: &[u8], padded: bool) {
    out.push(key);
    let len = payload.len() as u64;
    out.extend(if padded {
        padded_varint(len)
    } else {
        varint(len)
    });
    out.extend_from_slice(payload);
}

const UNKNOWN_FIELD: [u8; 3] = [0x98, 0x06, 0x01]; // field 99, varint 1

fn signed_block(block: &schema::SignedBlock, respelling: Respelling) -> Vec<u8> {
    let mut next_key = vec![0x08];
    let algorithm = if respelling == Respelling::NextKeyAlgorithmReadAsDefault {
        assert_eq!(block.next_key.algorithm, 0, "the flip needs an Ed25519 key");
        1 << 32
    } else {
        block.next_key.algorithm as u32 as u64
    };
    next_key.extend(varint(algorithm));
    length_delimited(&mut next_key, 0x12, &block.next_key.key, false);
    let mut out = Vec::new();
    length_delimited(&mut out, 0x0a, &block.block, false);
    length_delimited(&mut out, 0x12, &next_key, false);
    length_delimited(&mut out, 0x1a, &block.signature, false);
    if let Some(external) = &block.external_signature {
        length_delimited(&mut out, 0x22, &external.encode_to_vec(), false);
    }
    match (block.version, respelling) {
        (Some(version), _) => {
            out.push(0x28);
            out.extend(varint(version.into()));
        }
        (None, Respelling::ExplicitDefaultVersion) => out.extend([0x28, 0x00]),
        (None, _) => {}
    }
    if respelling == Respelling::UnknownFieldInAuthorityBlock {
        out.extend(UNKNOWN_FIELD);
    }
    out
}

/// Re-encodes a real token's container field by field, spelling one field differently.
fn respell(token: &str, respelling: Respelling) -> String {
    let bytes = BASE64.decode(token).expect("base64");
    let container = schema::Biscuit::decode(bytes.as_slice()).expect("container");
    assert_eq!(
        container.authority.version, None,
        "a version is spelled explicitly"
    );
    let mut out = Vec::new();
    if let Some(id) = container.root_key_id {
        out.push(0x08);
        out.extend(if respelling == Respelling::PaddedRootKeyId {
            padded_varint(id.into())
        } else {
            varint(id.into())
        });
    }
    let authority = signed_block(&container.authority, respelling);
    length_delimited(
        &mut out,
        0x12,
        &authority,
        respelling == Respelling::PaddedAuthorityLength,
    );
    for block in &container.blocks {
        length_delimited(
            &mut out,
            0x1a,
            &signed_block(block, Respelling::Faithful),
            false,
        );
    }
    length_delimited(&mut out, 0x22, &container.proof.encode_to_vec(), false);
    if respelling == Respelling::UnknownTopLevelField {
        out.extend(UNKNOWN_FIELD);
    }
    if respelling == Respelling::Faithful {
        assert_eq!(out, bytes, "the encoder reproduces a canonical token");
    }
    BASE64.encode(out)
}

/// Every way to spell a valid token other than its one canonical spelling.
fn respellings(token: &str) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = [
        Respelling::UnknownTopLevelField,
        Respelling::UnknownFieldInAuthorityBlock,
        Respelling::PaddedRootKeyId,
        Respelling::PaddedAuthorityLength,
        Respelling::NextKeyAlgorithmReadAsDefault,
        Respelling::ExplicitDefaultVersion,
    ]
    .into_iter()
    .map(|r| (format!("{r:?}"), respell(token, r)))
    .collect();
    assert_eq!(respell(token, Respelling::Faithful), token);
    let unpadded = token.trim_end_matches('=');
    assert_ne!(unpadded, token, "the token has padding to drop");
    rows.push(("base64 without padding".into(), unpadded.to_owned()));
    rows
}

/// Re-encodings of a broker-issued token whose signature chain still verifies: unknown
/// fields, padded varints, an algorithm read as the default, a dropped base64 padding. Each
/// is `token_malformed` at the proxy, the broker and the in-process guard, even after the
/// canonical token is in the verified-token cache.
#[tokio::test]
async fn malleated_spellings_of_a_valid_token_are_malformed() {
    let broker = Broker::start().await;
    let (upstream, up_port) = Upstream::start().await;
    let proxy = start_proxy(&broker.url, up_port, "prod").await;
    let token = token_of(
        &broker
            .issue(READER_KEY, &["http://railway/volumes/:read"], None)
            .await,
    );
    wait_allowed(&proxy, "/v2/volumes/vol_1", &token).await;
    upstream.clear();
    let rows = respellings(&token);
    // Outside an HTTP header (where surrounding whitespace is syntax), whitespace is not
    // part of any token either.
    let text_only = [
        ("trailing newline", format!("{token}\n")),
        ("leading space", format!(" {token}")),
    ];

    // In process: the cached canonical token is never found under another spelling.
    let guard = in_process_guard(&broker);
    let request = capgate::guard::Request {
        resource: VOLUME.into(),
        verb: capgate::scope::Verb::Read,
        environment: "prod".into(),
        attributes: vec![],
    };
    let decide = |t: &str| {
        guard.decide_at(
            t,
            &request,
            std::time::SystemTime::now(),
            std::time::Instant::now(),
        )
    };
    assert!(decide(&token).is_allow());
    assert_eq!(guard.cache().len(), 1);
    for (label, respelled) in rows
        .iter()
        .map(|(l, t)| (l.as_str(), t.as_str()))
        .chain(text_only.iter().map(|(l, t)| (*l, t.as_str())))
    {
        for attempt in ["first", "second"] {
            let decision = decide(respelled);
            assert_eq!(
                decision.outcome,
                capgate::guard::Outcome::Deny {
                    code: capgate::guard::DenyCode::TokenMalformed,
                    reason: "token is not a well-formed Capgate biscuit".into(),
                },
                "in process, {label}, {attempt} attempt"
            );
        }
        let dry_run = broker.dry_run(respelled, VOLUME, "read").await;
        assert_eq!(dry_run["code"], "token_malformed", "dry run, {label}");
    }
    assert_eq!(
        guard.cache().len(),
        1,
        "only the canonical spelling is cached"
    );

    for (label, respelled) in &rows {
        for attempt in ["first", "second"] {
            let (status, body) = through_proxy(&proxy, respelled).await;
            assert_eq!(
                (status, code_in(&body).as_str()),
                (401, "token_malformed"),
                "proxy, {label}, {attempt} attempt: {body}"
            );
        }
        let uses = through_broker(&broker, respelled).await;
        for (route, status, code) in uses {
            let expected = if route == "/v1/authorize" { 200 } else { 401 };
            assert_eq!(
                (status, code.as_str()),
                (expected, "token_malformed"),
                "{route}, {label}"
            );
        }
    }
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    // The canonical spelling is untouched by all of this.
    assert_eq!(through_proxy(&proxy, &token).await.0, 200);
    assert!(decide(&token).is_allow());
}

/// A guard over the broker's own keys and the repository's adapter policy, with a cache.
fn in_process_guard(broker: &Broker) -> capgate::guard::Guard {
    use std::sync::{Arc, RwLock};
    let ring = capgate::token::Keyring::open(&broker.dir.path().join("data")).expect("keys");
    let keys = Arc::new(RwLock::new(Arc::new(ring.public_keys().expect("public"))));
    let revocations = Arc::new(capgate::revocation::RevocationView::new());
    revocations.apply(&[], std::time::Instant::now());
    capgate::guard::Guard::new(
        capgate::guard::GuardConfig {
            adapter: "token-hostile".into(),
            max_token_bytes: 16 * 1024,
            max_staleness: std::time::Duration::from_secs(600),
            limits: capgate::config::RunLimits::default(),
            cache_capacity: 100,
        },
        keys,
        revocations,
        capgate::policy::PolicySet::load_dir(&repo().join("policies/adapters")).expect("policy"),
    )
}
