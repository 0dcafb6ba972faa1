//! Issuance through the real broker binary: API keys, JWTs (three algorithms, two request
//! forms), every JWT forgery we know of, policy refusals, TTL caps and expiry.

mod common;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

#[tokio::test]
async fn api_key_issues_a_token_that_the_dry_run_allows() {
    let broker = Broker::start().await;
    let issued = broker
        .issue(
            DEPLOY_BOT_KEY,
            &["pg://staging/:write", "http://railway/volumes/:read"],
            Some(300),
        )
        .await;
    assert_eq!(issued["agent"], "deploy-bot");
    assert_eq!(issued["key_id"], 1);
    assert_eq!(issued["expires_in"], 300);
    let granted = issued["granted"].as_array().expect("granted");
    assert!(granted.contains(
        &json!({"resource": "pg://staging/", "verb": "write", "environment": "staging"})
    ));
    let token = token_of(&issued);
    let allow = broker
        .dry_run(&token, "pg://staging/public.bookings", "write")
        .await;
    assert_eq!(allow["decision"], "allow", "{allow}");
    assert!(allow["explanation"][0]
        .as_str()
        .expect("why")
        .contains("allowed by"));
    // The environment comes from configuration: the same verb on prod is not covered.
    let deny = broker
        .dry_run(&token, "pg://prod/public.bookings", "write")
        .await;
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["code"], "policy_denied");
}

#[tokio::test]
async fn jwts_of_each_accepted_algorithm_issue_tokens_with_claims() {
    let broker = Broker::start().await;
    for (alg, key, kid) in [
        (Algorithm::RS256, "rsa.key.pem", "rsa-1"),
        (Algorithm::ES256, "ec.key.pem", "ec-1"),
        (Algorithm::EdDSA, "ed25519.key.pem", "ed-1"),
    ] {
        let jwt = sign_jwt(
            alg,
            key,
            Some(kid),
            &claims("deploy-bot", JWT_ISSUER, AUDIENCE, 300),
        );
        let issued = broker
            .issue(&jwt, &["pg://staging/public.t:write"], None)
            .await;
        assert_eq!(issued["agent"], "deploy-bot", "{alg:?}");
        assert_eq!(issued["expires_in"], 600, "default TTL applies");
    }
    // A PEM-configured issuer, no kid.
    let jwt = sign_jwt(
        Algorithm::RS256,
        "rsa.key.pem",
        None,
        &claims("reporting-bot", PEM_ISSUER, AUDIENCE, 300),
    );
    broker.issue(&jwt, &["pg://prod/public.t:read"], None).await;
}

#[tokio::test]
async fn rfc8693_token_exchange_in_form_and_json() {
    let broker = Broker::start().await;
    let jwt = sign_jwt(
        Algorithm::EdDSA,
        "ed25519.key.pem",
        Some("ed-1"),
        &claims("deploy-bot", JWT_ISSUER, AUDIENCE, 300),
    );
    let details_json = details(&["pg://staging/:write"]).to_string();
    let form = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", jwt.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("authorization_details", details_json.as_str()),
        ("ttl_seconds", "120"),
    ];
    let response = reqwest::Client::new()
        .post(format!("{}/v1/tokens", broker.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(form).expect("form"))
        .send()
        .await
        .expect("post");
    let (status, body) = decode(response).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["issued_token_type"],
        "urn:capgate:params:oauth:token-type:biscuit"
    );
    assert_eq!(body["expires_in"], 120);

    let (status, body) = broker
        .post_json(
            "/v1/tokens",
            None,
            json!({
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": jwt,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "authorization_details": details(&["pg://staging/:write"]),
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // Both a header credential and a subject token: ambiguous, refused.
    let (status, body) = broker
        .post_json(
            "/v1/tokens",
            Some(READER_KEY),
            json!({
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": jwt,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "authorization_details": details(&["pg://staging/:write"]),
            }),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("ambiguous_credential"))
    );
}

/// One row per attack on agent authentication; each must be a 401 with the given code.
#[tokio::test]
async fn forged_and_misdirected_jwts_are_refused() {
    let broker = Broker::start().await;
    let good = |offset| claims("deploy-bot", JWT_ISSUER, AUDIENCE, offset);
    let alg_none = {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            engine.encode(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
            engine.encode(good(300).to_string())
        )
    };
    // HS256 keyed with the RSA public key: the classic algorithm-confusion forgery.
    let hmac_confusion = {
        let public_pem = std::fs::read(fixture("rsa.pub.pem")).expect("pem");
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".into());
        jsonwebtoken::encode(
            &header,
            &good(300),
            &jsonwebtoken::EncodingKey::from_secret(&public_pem),
        )
        .expect("sign")
    };
    let rows: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            sign_jwt(Algorithm::RS256, "rsa.key.pem", Some("rsa-1"), &good(-120)),
            "jwt_expired",
        ),
        (
            "wrong issuer",
            sign_jwt(
                Algorithm::RS256,
                "rsa.key.pem",
                Some("rsa-1"),
                &claims("deploy-bot", "https://evil.test", AUDIENCE, 300),
            ),
            "jwt_wrong_issuer",
        ),
        (
            "wrong audience",
            sign_jwt(
                Algorithm::RS256,
                "rsa.key.pem",
                Some("rsa-1"),
                &claims("deploy-bot", JWT_ISSUER, "someone-else", 300),
            ),
            "jwt_wrong_audience",
        ),
        (
            "signed by another key under a known kid",
            sign_jwt(
                Algorithm::RS256,
                "other-rsa.key.pem",
                Some("rsa-1"),
                &good(300),
            ),
            "jwt_invalid",
        ),
        (
            "unknown kid",
            sign_jwt(
                Algorithm::RS256,
                "other-rsa.key.pem",
                Some("nope"),
                &good(300),
            ),
            "jwt_unknown_key",
        ),
        ("alg none", alg_none, "jwt_invalid"),
        (
            "HS256 with the public key as secret",
            hmac_confusion,
            "jwt_invalid",
        ),
        (
            "ES256 token presented under the RSA kid",
            sign_jwt(Algorithm::ES256, "ec.key.pem", Some("rsa-1"), &good(300)),
            "jwt_invalid",
        ),
        ("garbage", "not-a-jwt".to_owned(), "jwt_invalid"),
        (
            "operator key used as agent",
            OPERATOR_KEY.to_owned(),
            "api_key_unknown",
        ),
        (
            "unknown api key",
            "cgk_unknown".to_owned(),
            "api_key_unknown",
        ),
    ];
    for (attack, credential, code) in rows {
        let (status, body) = broker
            .request_token(&credential, &["pg://staging/:read"], None)
            .await;
        assert_eq!(status, 401, "{attack}: {body}");
        assert_eq!(body["code"], code, "{attack}: {body}");
    }
    let (status, body) = broker
        .post_json(
            "/v1/tokens",
            None,
            json!({"authorization_details": details(&["pg://staging/:read"])}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (401, json!("credential_missing"))
    );
}

#[tokio::test]
async fn scopes_beyond_policy_are_refused_by_name_with_reasons() {
    let broker = Broker::start().await;
    let (status, body) = broker
        .request_token(
            DEPLOY_BOT_KEY,
            &[
                "pg://staging/:write",
                "pg://prod/public.bookings:write",
                "http://railway/backups/bk_1:delete",
                "pg://elsewhere/x:read",
            ],
            None,
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "scope_refused");
    let refused: Vec<(String, String, String)> = body["refused"]
        .as_array()
        .expect("refused")
        .iter()
        .map(|r| {
            (
                r["resource"].as_str().unwrap_or("").to_owned(),
                r["verb"].as_str().unwrap_or("").to_owned(),
                r["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        refused.len(),
        3,
        "staging write is fine, the other three are not: {refused:?}"
    );
    assert!(refused
        .iter()
        .any(|(r, v, why)| r == "pg://prod/public.bookings"
            && v == "write"
            && why == "no grant rule matches"));
    assert!(refused
        .iter()
        .any(|(r, _, why)| r == "http://railway/backups/bk_1"
            && why.contains("backups are out of reach")));
    assert!(refused
        .iter()
        .any(|(r, _, why)| r == "pg://elsewhere/x" && why.contains("no configured environment")));
}

#[tokio::test]
async fn ttl_is_capped_by_policy_and_expiry_is_enforced() {
    let broker = Broker::start().await;
    // deploy-bot's policy caps at 15 minutes whatever it asks.
    let issued = broker
        .issue(DEPLOY_BOT_KEY, &["pg://staging/:write"], Some(7200))
        .await;
    assert_eq!(issued["expires_in"], 900);
    let short = broker
        .issue(READER_KEY, &["pg://prod/public.t:read"], Some(1))
        .await;
    let token = token_of(&short);
    assert_eq!(
        broker.dry_run(&token, "pg://prod/public.t", "read").await["decision"],
        "allow"
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let after = broker.dry_run(&token, "pg://prod/public.t", "read").await;
    assert_eq!(after["code"], "token_expired", "{after}");
}

#[tokio::test]
async fn cli_token_request_prints_only_the_token() {
    let broker = Broker::start().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args([
            "token",
            "request",
            "--broker",
            &broker.url,
            "--scope",
            "pg://staging/:write",
            "--ttl",
            "2m",
        ])
        .env("CAPGATE_CREDENTIAL", DEPLOY_BOT_KEY)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).expect("utf8");
    let token = token.trim();
    assert!(!token.contains(char::is_whitespace));
    assert_eq!(
        broker.dry_run(token, "pg://staging/x.y", "write").await["decision"],
        "allow"
    );

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args([
            "token",
            "request",
            "--broker",
            &broker.url,
            "--scope",
            "pg://prod/:write",
        ])
        .env("CAPGATE_CREDENTIAL", DEPLOY_BOT_KEY)
        .output()
        .expect("run");
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty(), "nothing on stdout when refused");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("pg://prod/:write"));
}

#[tokio::test]
async fn published_keys_verify_tokens_offline() {
    let broker = Broker::start().await;
    let (status, keys) = broker.get("/v1/keys").await;
    assert_eq!(status, 200);
    let document: capgate::token::KeySetDocument = serde_json::from_value(keys).expect("key set");
    let set = capgate::token::PublicKeySet::from_document(&document).expect("keys");
    let token = token_of(
        &broker
            .issue(READER_KEY, &["pg://prod/public.t:read"], None)
            .await,
    );
    let verified = capgate::token::verify(&token, &set, 16 * 1024, std::time::SystemTime::now())
        .expect("verifies offline");
    assert_eq!(verified.agent(), "reporting-bot");
    assert_eq!(verified.key_id(), document.active_key_id);
    let _: Value = serde_json::to_value(&document).expect("serialisable");
}

#[tokio::test]
async fn the_client_refreshes_before_expiry() {
    use capgate::client::{Client, TokenRefresher};
    let broker = Broker::start().await;
    let scopes = vec!["pg://prod/public.t:read".parse().expect("scope")];
    let refresher = TokenRefresher::start(
        Client::new(&broker.url).expect("client"),
        READER_KEY.to_owned(),
        scopes,
        Some(std::time::Duration::from_secs(6)),
    )
    .await
    .expect("first token");
    let first = refresher.current();
    // The refresher asks again at two thirds of the lifetime (about 4 s): what matters is that
    // the new token arrives before the first expires, however busy the machine is.
    let mut second = refresher.current();
    while second.session_id == first.session_id && std::time::SystemTime::now() < first.expires_at {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        second = refresher.current();
    }
    assert_ne!(
        first.session_id, second.session_id,
        "refreshed before the first token expired"
    );
    assert!(second.expires_at > first.expires_at);
    let token = refresher.token().expect("current token is valid");
    assert_eq!(
        broker.dry_run(&token, "pg://prod/public.t", "read").await["decision"],
        "allow"
    );

    // A revoked agent's refresher stops and its token then expires: no silent renewal.
    let refused = Client::new(&broker.url)
        .expect("client")
        .request_token(
            "cgk_unknown",
            &["pg://prod/t:read".parse().expect("scope")],
            None,
        )
        .await;
    assert!(matches!(
        refused,
        Err(capgate::client::ClientError::Refused { status: 401, .. })
    ));
}
