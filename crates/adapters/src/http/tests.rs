//! The reverse proxy's handler, driven in-process through its router: a recording upstream on
//! loopback shows what was forwarded (the canonical path, the injected credential, never the
//! agent's token) and that nothing is forwarded for a refused request, whose problem+json
//! names its reason.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use http::StatusCode;
use tower::ServiceExt;

use super::{Proxy, ProxyConfig};
use capgate_core::scope::Verb;
use capgate_test_support::{Issuer, NoBroker};

/// What the upstream received: method, path and its `authorization` header.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

async fn recording_upstream() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |request: Request| {
        let record = record.clone();
        async move {
            let authorization = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            record.lock().expect("lock").push((
                request.method().to_string(),
                request.uri().path().to_owned(),
                authorization,
            ));
            "upstream answer"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

struct Harness {
    router: axum::Router,
    upstream_saw: Seen,
    token: String,
    _credential: tempfile::NamedTempFile,
}

async fn harness() -> Harness {
    let (url, upstream_saw) = recording_upstream().await;
    let credential = tempfile::NamedTempFile::new().expect("credential file");
    std::fs::write(credential.path(), "real-upstream-secret").expect("write credential");
    let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/adapters");
    let config: ProxyConfig = toml::from_str(&format!(
        r#"
listen = "127.0.0.1:0"
broker = "http://127.0.0.1:1"
environment = "prod"
adapter_policies = {policies:?}
[upstream]
url = "{url}"
credential_file = {credential:?}
credential_header = "authorization"
credential_prefix = "Bearer "
[[routes]]
method = "GET"
path = "/v2/volumes/{{id}}"
resource = "http://railway/volumes/{{id}}"
verb = "read"
[[routes]]
method = "DELETE"
path = "/v2/volumes/{{id}}"
resource = "http://railway/volumes/{{id}}"
verb = "delete"
"#,
        policies = policies.display().to_string(),
        credential = credential.path().display().to_string(),
    ))
    .expect("config");
    let issuer = Issuer::new();
    let proxy = Proxy::new(
        config,
        issuer.key_view(),
        issuer.synced_revocations(),
        issuer.containment(),
        Arc::new(NoBroker),
    )
    .expect("proxy");
    let token = issuer.token(
        "deploy-bot",
        "prod",
        &[("http://railway/volumes/", Verb::Read)],
    );
    Harness {
        router: Arc::new(proxy).router(),
        upstream_saw,
        token,
        _credential: credential,
    }
}

impl Harness {
    async fn call(&self, method: &str, path: &str, token: Option<&str>) -> (StatusCode, String) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn forwarded(&self) -> Vec<(String, String, String)> {
        self.upstream_saw.lock().expect("lock").clone()
    }
}

fn code(problem: &str) -> String {
    serde_json::from_str::<serde_json::Value>(problem)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("not a problem: {problem}"))
}

#[tokio::test]
async fn a_granted_read_is_forwarded_with_the_real_credential_instead_of_the_token() {
    let h = harness().await;
    let (status, body) = h.call("GET", "/v2/volumes/vol-1", Some(&h.token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "upstream answer");
    assert_eq!(
        h.forwarded(),
        vec![(
            "GET".to_owned(),
            "/v2/volumes/vol-1".to_owned(),
            "Bearer real-upstream-secret".to_owned()
        )]
    );
}

#[tokio::test]
async fn a_delete_the_token_does_not_grant_is_refused_before_the_upstream() {
    let h = harness().await;
    let (status, body) = h.call("DELETE", "/v2/volumes/vol-1", Some(&h.token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(code(&body), "policy_denied");
    assert!(h.forwarded().is_empty());
}

#[tokio::test]
async fn requests_without_a_valid_token_or_a_route_are_refused_with_their_reason() {
    let h = harness().await;
    let (status, body) = h.call("GET", "/v2/volumes/vol-1", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(code(&body), "token_malformed");
    let (status, body) = h.call("GET", "/v2/backups/b-1", Some(&h.token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(code(&body), "no_route");
    assert!(h.forwarded().is_empty());
}

#[tokio::test]
async fn paths_with_more_than_one_meaning_are_refused_not_guessed() {
    let h = harness().await;
    for path in [
        // Dot segments would walk a read route into another resource upstream.
        "/v2/volumes/vol-1/../../backups/b-1",
        // An encoded slash means one segment here and two to some upstreams.
        "/v2/volumes/vol-1%2F..%2F..%2Fbackups%2Fb-1",
    ] {
        let (status, body) = h.call("GET", path, Some(&h.token)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(code(&body), "path_rejected", "{path}");
    }
    assert!(h.forwarded().is_empty(), "{:?}", h.forwarded());
}
