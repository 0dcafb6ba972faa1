//! The tower layer in-process: an axum router protected by the same guard, with tokens minted
//! by the library and a local key ring and revocation view.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Extension, Router};
use capgate::adapters::tower::{GuardLayer, GuardedRequest};
use capgate::adapters::Mode;
use capgate::config::RunLimits;
use capgate::containment::audit::AuditEvent;
use capgate::containment::{ContainmentConfig, ContainmentDocument, Operation};
use capgate::guard::{
    ContainmentView, Guard, GuardConfig, Ledger, LedgerCode, LedgerDenial, Request as GuardRequest,
};
use capgate::policy::PolicySet;
use capgate::revocation::RevocationView;
use capgate::scope::Verb;
use capgate::store::{Revocation, RevocationKind};
use capgate::token::{encode, mint, random_id, GrantedRight, Keyring, TokenSpec};
use tower_service::Service;

struct Fixture {
    keyring: Keyring,
    revocations: Arc<RevocationView>,
    guard: Arc<Guard>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let (keyring, _) = Keyring::open_or_create(dir.path()).expect("keys");
    let keys = Arc::new(RwLock::new(Arc::new(
        keyring.public_keys().expect("public"),
    )));
    let revocations = Arc::new(RevocationView::new());
    revocations.apply(&[], Instant::now() + Duration::from_secs(3600));
    let policy = PolicySet::load_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/adapters"),
    )
    .expect("policy");
    let guard = Guard::new(
        GuardConfig {
            adapter: "items-app".into(),
            max_token_bytes: 16 * 1024,
            max_staleness: Duration::from_secs(3600 * 2),
            limits: RunLimits::default(),
            cache_capacity: 100,
        },
        keys,
        revocations.clone(),
        policy,
    );
    Fixture {
        keyring,
        revocations,
        guard: Arc::new(guard),
        _dir: dir,
    }
}

/// Another guard of the items app over `fixture`'s keys and revocation view.
fn guard_of(fixture: &Fixture, limits: RunLimits, cache_capacity: usize) -> Guard {
    Guard::new(
        GuardConfig {
            adapter: "items-app".into(),
            max_token_bytes: 16 * 1024,
            max_staleness: Duration::from_secs(3600 * 2),
            limits,
            cache_capacity,
        },
        Arc::new(RwLock::new(Arc::new(
            fixture.keyring.public_keys().expect("keys"),
        ))),
        fixture.revocations.clone(),
        PolicySet::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/adapters"),
        )
        .expect("policy"),
    )
}

fn token(fixture: &Fixture, rights: &[(&str, Verb)], session: &str) -> String {
    let now = SystemTime::now();
    let spec = TokenSpec {
        row_budget: None,
        use_budget: None,
        agent: "app-bot".into(),
        session_id: session.into(),
        rights: rights
            .iter()
            .map(|(r, v)| GrantedRight {
                resource: r.parse().expect("pattern"),
                verb: *v,
                environment: "prod".into(),
            })
            .collect(),
        issued_at: now,
        expires_at: now + Duration::from_secs(60),
    };
    let biscuit = mint(
        &spec,
        fixture.keyring.active_key_id(),
        fixture.keyring.signing_key(),
    )
    .expect("mint");
    encode(&biscuit).expect("encode")
}

fn app(guard: Arc<Guard>, mode: Mode) -> Router {
    app_with(guard, mode, None)
}

fn app_with(guard: Arc<Guard>, mode: Mode, ledger: Option<Arc<dyn Ledger>>) -> Router {
    let mapper = |parts: &axum::http::request::Parts| {
        let id = parts.uri.path().strip_prefix("/items/")?;
        let verb = match parts.method.as_str() {
            "GET" => Verb::Read,
            "DELETE" => Verb::Delete,
            _ => return None,
        };
        Some(GuardRequest {
            resource: format!("http://app/items/{id}"),
            verb,
            environment: "prod".into(),
            attributes: vec![],
        })
    };
    Router::new()
        .route(
            "/items/{id}",
            get(
                |Path(id): Path<String>,
                 Extension(guarded): Extension<GuardedRequest>,
                 headers: HeaderMap| async move {
                    let leaked = headers.contains_key("authorization")
                        || headers.contains_key("capgate-token");
                    format!(
                        "item {id} decision {} shadow_denied={} token_leaked={leaked}",
                        guarded.decision_id, guarded.shadow_denied
                    )
                },
            )
            .delete(|| async { "deleted" }),
        )
        .layer(match ledger {
            Some(ledger) => GuardLayer::new(guard, mapper)
                .with_mode(mode)
                .with_ledger(ledger),
            None => GuardLayer::new(guard, mapper).with_mode(mode),
        })
}

async fn send(
    router: &mut Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
) -> (StatusCode, String) {
    send_body(router, method, uri, token, "").await
}

async fn send_body(
    router: &mut Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: &'static str,
) -> (StatusCode, String) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = router
        .call(request.body(Body::from(body)).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_layer_allows_what_the_token_names_and_strips_it() {
    let fixture = fixture();
    let mut router = app(fixture.guard.clone(), Mode::Enforce);
    let token = token(&fixture, &[("http://app/items/", Verb::Read)], &random_id());
    let (status, body) = send(&mut router, "GET", "/items/42", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("item 42 decision "), "{body}");
    assert!(body.contains("token_leaked=false"), "{body}");
}

#[tokio::test]
async fn the_layer_denies_missing_wrong_and_revoked_tokens() {
    let fixture = fixture();
    let mut router = app(fixture.guard.clone(), Mode::Enforce);
    let session = random_id();
    let token = token(&fixture, &[("http://app/items/1", Verb::Read)], &session);
    assert_eq!(
        send(&mut router, "GET", "/items/1", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&mut router, "GET", "/items/1", Some("garbage"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&mut router, "GET", "/items/2", Some(&token)).await.0,
        StatusCode::FORBIDDEN
    );
    let (status, body) = send(&mut router, "DELETE", "/items/1", Some(&token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body.contains("policy_denied") && body.contains("decision_id"),
        "{body}"
    );
    assert_eq!(
        send(&mut router, "PUT", "/items/1", Some(&token)).await.0,
        StatusCode::FORBIDDEN,
        "unmapped"
    );
    assert_eq!(
        send(&mut router, "GET", "/items/1", Some(&token)).await.0,
        StatusCode::OK
    );
    fixture.revocations.apply(
        &[Revocation {
            cursor: 1,
            kind: RevocationKind::Session,
            value: session,
            reason: "test".into(),
            revoked_by: "test".into(),
            revoked_at: 0,
            expires_at: None,
        }],
        Instant::now(),
    );
    let (status, body) = send(&mut router, "GET", "/items/1", Some(&token)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("token_revoked"), "{body}");
}

#[tokio::test]
async fn shadow_mode_lets_requests_through_and_marks_them() {
    let fixture = fixture();
    let mut router = app(fixture.guard.clone(), Mode::Shadow);
    let token = token(
        &fixture,
        &[("http://app/items/1", Verb::Read)],
        &random_id(),
    );
    let (status, body) = send(&mut router, "GET", "/items/2", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("shadow_denied=true"), "{body}");
    let (_, body) = send(&mut router, "GET", "/items/1", Some(&token)).await;
    assert!(body.contains("shadow_denied=false"), "{body}");
}

#[tokio::test]
async fn a_stale_revocation_view_denies_in_process_too() {
    let fixture = fixture();
    let stale = Arc::new(RevocationView::new());
    let guard = Guard::new(
        GuardConfig {
            adapter: "items-app".into(),
            max_token_bytes: 16 * 1024,
            max_staleness: Duration::from_millis(50),
            limits: RunLimits::default(),
            cache_capacity: 0,
        },
        Arc::new(RwLock::new(Arc::new(
            fixture.keyring.public_keys().expect("keys"),
        ))),
        stale.clone(),
        PolicySet::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/adapters"),
        )
        .expect("policy"),
    );
    let mut router = app(Arc::new(guard), Mode::Enforce);
    let token = token(&fixture, &[("http://app/items/", Verb::Read)], &random_id());
    let (status, body) = send(&mut router, "GET", "/items/1", Some(&token)).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "never synced: {body}"
    );
    stale.apply(&[], Instant::now());
    assert_eq!(
        send(&mut router, "GET", "/items/1", Some(&token)).await.0,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(
        send(&mut router, "GET", "/items/1", Some(&token)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn hitting_a_datalog_run_limit_is_its_own_deny_reason() {
    let fixture = fixture();
    let limits = RunLimits {
        max_facts: 10_000,
        max_iterations: 100,
        max_time: Duration::from_nanos(1),
    };
    let tight = guard_of(&fixture, limits, 0);
    let token = token(&fixture, &[("http://app/items/", Verb::Read)], &random_id());
    let request = GuardRequest {
        resource: "http://app/items/1".into(),
        verb: Verb::Read,
        environment: "prod".into(),
        attributes: vec![],
    };
    let decision = tight.decide_at(&token, &request, SystemTime::now(), Instant::now());
    assert_eq!(
        decision.outcome,
        capgate::guard::Outcome::Deny {
            code: capgate::guard::DenyCode::PolicyRunLimit,
            reason: "Datalog run limit reached: spent too much time verifying".into()
        }
    );
    // The same request under the normal limits is allowed: the limit, not the policy, denied.
    assert!(fixture
        .guard
        .decide_at(&token, &request, SystemTime::now(), Instant::now())
        .is_allow());
}

/// The in-process layer refuses what the proxy refuses before the service runs: routing
/// and method-override headers, `_method` however encoded, and the token anywhere but its
/// header. The inner service never sees any of these requests.
#[tokio::test]
async fn the_layer_refuses_routing_instructions_and_misplaced_tokens() {
    let fixture = fixture();
    let mut router = app(fixture.guard.clone(), Mode::Enforce);
    let token = token(&fixture, &[("http://app/items/", Verb::Read)], &random_id());
    let cookie = format!("session={token}");
    let in_query = format!("/items/1?access_token={token}");
    type Row<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let rows: Vec<Row> = vec![
        (
            "/items/1".into(),
            vec![("x-original-url", "/items/2")],
            "header_rejected",
        ),
        (
            "/items/1".into(),
            vec![("x-forwarded-prefix", "/admin")],
            "header_rejected",
        ),
        (
            "/items/1".into(),
            vec![("x-http-method-override", "DELETE")],
            "method_override_rejected",
        ),
        (
            "/items/1?_method=DELETE".into(),
            vec![],
            "method_override_rejected",
        ),
        (
            "/items/1?%5Fmethod=DELETE".into(),
            vec![],
            "method_override_rejected",
        ),
        (
            "/items/1?a=1;_METHOD=delete".into(),
            vec![],
            "method_override_rejected",
        ),
        (in_query, vec![], "token_misplaced"),
        (
            "/items/1".into(),
            vec![("cookie", cookie.as_str())],
            "token_misplaced",
        ),
        (
            "/items/1".into(),
            vec![("x-api-key", token.as_str())],
            "token_misplaced",
        ),
    ];
    for (uri, headers, code) in rows {
        let mut request = Request::builder()
            .method("GET")
            .uri(uri.as_str())
            .header("authorization", format!("Bearer {token}"));
        for (name, value) in &headers {
            request = request.header(*name, *value);
        }
        let response = router
            .call(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{uri} {headers:?}: {problem}"
        );
        assert_eq!(problem["code"], code, "{uri} {headers:?}");
    }
    // The same request without the extras is served.
    let (status, body) = send(&mut router, "GET", "/items/1?verbose=1", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The mapper reads the one canonical path the guard judges, as at the proxy: a dot segment
/// or an encoded slash is refused before any mapping, so a mapper that reads a prefix cannot
/// be walked out of it; a path in any other spelling than its canonical one is refused too
/// (the router in front of the layer has routed on the raw path already).
#[tokio::test]
async fn the_layer_judges_one_canonical_path() {
    let fixture = fixture();
    let mut router = app(fixture.guard.clone(), Mode::Enforce);
    let token = token(&fixture, &[("http://app/items/", Verb::Read)], &random_id());
    for target in [
        "/items/../admin",
        "/items/%2e%2e/admin",
        "/items/1%2Fsecret",
        "//items//42",
        "/items/%34%32",
    ] {
        let (status, body) = send(&mut router, "GET", target, Some(&token)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{target}: {body}");
        assert!(
            body.contains("\"code\":\"path_rejected\""),
            "{target}: {body}"
        );
    }
    let (status, body) = send(&mut router, "GET", "/items/42?x=1", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("item 42 decision "), "{body}");
}

/// Keeps the operations approvals were asked for.
#[derive(Default)]
struct AskingLedger {
    asked: std::sync::Mutex<Vec<Operation>>,
}

#[async_trait::async_trait]
impl Ledger for AskingLedger {
    async fn request_approval(
        &self,
        _: &str,
        operation: &Operation,
    ) -> Result<String, LedgerDenial> {
        self.asked.lock().expect("lock").push(operation.clone());
        Ok("approval-1".into())
    }
    async fn consume_approval(&self, _: &str, _: &str, _: &str) -> Result<(), LedgerDenial> {
        Err(LedgerDenial {
            code: LedgerCode::ApprovalNotFound,
            reason: "no approvals in this test".into(),
        })
    }
    async fn count(&self, _: &str, _: Verb) -> Result<(), LedgerDenial> {
        Ok(())
    }
    async fn audit(&self, _: AuditEvent) -> Result<(), LedgerDenial> {
        Ok(())
    }
}

/// An approval asked through the layer is bound to the request's body, as at the proxy: the
/// operation an operator sees carries the body's SHA-256, so an approval of one body cannot
/// be spent on another.
#[tokio::test]
async fn an_approval_asked_through_the_layer_binds_the_body() {
    let fixture = fixture();
    let approvals = biscuit_auth::KeyPair::new();
    let view = Arc::new(ContainmentView::new());
    view.set_document(ContainmentDocument::new(
        &ContainmentConfig::default(),
        &approvals.public(),
    ))
    .expect("containment");
    let guard = guard_of(&fixture, RunLimits::default(), 100).with_containment(view);
    let ledger = Arc::new(AskingLedger::default());
    let mut router = app_with(Arc::new(guard), Mode::Enforce, Some(ledger.clone()));
    let token = token(
        &fixture,
        &[("http://app/items/", Verb::Delete)],
        &random_id(),
    );
    let (status, body) = send_body(
        &mut router,
        "DELETE",
        "/items/1",
        Some(&token),
        "{\"cascade\":true}",
    )
    .await;
    assert_ne!(status, StatusCode::OK, "{body}");
    assert!(body.contains("approval"), "{body}");
    let asked = ledger.asked.lock().expect("lock").clone();
    assert_eq!(asked.len(), 1, "one approval asked");
    // sha256 of `{"cascade":true}`
    assert_eq!(
        asked[0].detail.get("body_sha256").map(String::as_str),
        Some("371d3d17e553de53d34616e5f8eb8642601e17774c704489fe23b5c6ff50c32a"),
        "{:?}",
        asked[0].detail
    );
}

/// The layer can take the proxy's own route table instead of a hand-written mapper: the same
/// routes, resources and attributes as `capgate proxy http`, a method or path no route names
/// denied before the guard is asked.
#[tokio::test]
async fn the_layer_can_judge_by_the_proxys_route_table() {
    use capgate::adapters::http::routes::{RouteConfig, RouteTable};
    let fixture = fixture();
    let route = |method: &str, verb| RouteConfig {
        method: method.into(),
        path: "/items/{id}".into(),
        resource: "http://app/items/{id}".into(),
        verb,
        mode: None,
    };
    let table = RouteTable::new(&[route("GET", Verb::Read)]).expect("routes");
    let layer = GuardLayer::with_routes(fixture.guard.clone(), table, "prod").expect("layer");
    let mut router = Router::new()
        .route(
            "/items/{id}",
            get(|Path(id): Path<String>| async move { format!("item {id}") })
                .delete(|| async { "deleted" }),
        )
        .layer(layer);
    let token = token(
        &fixture,
        &[
            ("http://app/items/", Verb::Read),
            ("http://app/items/", Verb::Delete),
        ],
        &random_id(),
    );
    let (status, body) = send(&mut router, "GET", "/items/7", Some(&token)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "item 7"));
    let (status, body) = send(&mut router, "DELETE", "/items/7", Some(&token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("\"code\":\"no_route\""), "{body}");

    let overriding = RouteConfig {
        mode: Some(Mode::Shadow),
        ..route("GET", Verb::Read)
    };
    let table = RouteTable::new(&[overriding]).expect("routes");
    let refused = GuardLayer::with_routes(fixture.guard.clone(), table, "prod")
        .err()
        .expect("a route's own mode is the proxy's");
    assert!(
        refused.to_string().contains("applies at the proxy only"),
        "{refused}"
    );
}
