//! What each fuzz target does with one input: calls Capgate's public library functions the way
//! a request does, and asserts the properties that must hold for any input (beyond "does not
//! panic"). Shared by the libFuzzer targets in `fuzz_targets/` and by the main crate's
//! `tests/fuzz_regressions.rs`, which replays the committed seeds and regressions under plain
//! `cargo test`, so a crash once found stays fixed without running a fuzzer.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use capgate::adapters::http::path::canonicalize;
use capgate::adapters::http::routes::{RouteConfig, RouteTable};
use capgate::adapters::pg::classify::{classify, Limits, NameChange};
use capgate::adapters::pg::wire;
use capgate::guard::{Guard, GuardConfig, Request};
use capgate::policy::{PolicyFile, PolicySet};
use capgate::revocation::RevocationView;
use capgate::scope::{ResourcePattern, Verb};
use capgate::token::{KeySetDocument, PublicKeySet, PublishedKey};
use futures_util::FutureExt;

/// Largest token the guard takes, as the adapters configure it.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The golden vectors' key id and clock (2026-06-01T00:00:00Z, inside their lifetime).
const GOLDEN_KEY_ID: u32 = 7;
const GOLDEN_NOW: u64 = 1_780_272_000;
/// Largest frame the pg target accepts; the proxy's default is larger, but a smaller cap
/// reaches the "too large" branch with inputs libFuzzer can build.
const MAX_FRAME_BYTES: usize = 64 * 1024;

fn golden_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(GOLDEN_NOW)
}

struct TokenFixture {
    keys: PublicKeySet,
    guard: Guard,
    request: Request,
    /// The authority block's revocation id of the golden tokens: no other authority block
    /// can verify under the golden key without its private half.
    golden_authority: String,
}

fn token_fixture() -> &'static TokenFixture {
    static FIXTURE: OnceLock<TokenFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let vectors: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/golden/vectors.json"))
                .expect("golden vectors");
        let public_key = vectors["public_key"].as_str().expect("public key");
        let document = KeySetDocument {
            active_key_id: GOLDEN_KEY_ID,
            keys: vec![PublishedKey {
                key_id: GOLDEN_KEY_ID,
                algorithm: "ed25519".into(),
                public_key: public_key.into(),
                created_at: "2026-01-01T00:00:00Z".into(),
                verify_until: None,
            }],
        };
        let keys = PublicKeySet::from_document(&document).expect("golden key");
        let view = Arc::new(RevocationView::new());
        view.apply(&[], Instant::now() + Duration::from_secs(365 * 86_400));
        let policy = PolicySet::from_files(vec![PolicyFile {
            path: "policies/adapters/default.dl".into(),
            source: include_str!("../../policies/adapters/default.dl").into(),
        }])
        .expect("adapter policy");
        let guard = Guard::new(
            GuardConfig {
                adapter: "fuzz".into(),
                max_token_bytes: MAX_TOKEN_BYTES,
                max_staleness: Duration::from_secs(365 * 86_400),
                limits: capgate::config::RunLimits::default(),
                // Every input takes the full verification path, never a cache hit.
                cache_capacity: 0,
            },
            Arc::new(RwLock::new(Arc::new(keys.clone()))),
            view,
            policy,
        );
        let deploy = vectors["tokens"]["deploy"].as_str().expect("deploy token");
        let golden_authority = capgate::token::verify(deploy, &keys, MAX_TOKEN_BYTES, golden_now())
            .expect("the golden token verifies")
            .revocation_ids()
            .first()
            .cloned()
            .expect("authority revocation id");
        TokenFixture {
            keys,
            guard,
            request: Request {
                resource: "http://railway/volumes/vol_9".into(),
                verb: Verb::Read,
                environment: "prod".into(),
                attributes: vec![],
            },
            golden_authority,
        }
    })
}

/// Token decode and verification, the guard's whole decision, inspection and attenuation.
/// The first byte picks how the rest becomes a token: even, its bytes in canonical base64
/// (so the fuzzer mutates the protobuf itself); odd, the rest as token text (so it mutates
/// the spelling).
pub fn token(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        base64::engine::general_purpose::URL_SAFE.encode(rest)
    } else {
        match std::str::from_utf8(rest) {
            Ok(text) => text.to_owned(),
            Err(_) => return,
        }
    };
    let fixture = token_fixture();
    decide_token(fixture, &token);
    if let Ok(inspection) = capgate::token::inspect(&token, Some(&fixture.keys)) {
        let _ = inspection.to_string();
    }
    let narrowing = capgate::token::Attenuation {
        verbs: vec![Verb::Read],
        ..Default::default()
    };
    // Attenuation needs no key and re-serialises what it parsed, so a re-spelling of a valid
    // token comes out as a valid (narrower) token: allowed is fine, but only ever for the
    // golden authority block, in canonical form.
    if let Ok(narrowed) = capgate::token::attenuate(&token, &narrowing) {
        decide_token(fixture, &narrowed);
    }
}

/// Verification and the guard's decision for one token text, with what must hold of them:
/// only a canonical spelling of a token carrying the golden authority block verifies, and
/// nothing that does not verify is allowed.
fn decide_token(fixture: &TokenFixture, token: &str) {
    let verified = capgate::token::verify(token, &fixture.keys, MAX_TOKEN_BYTES, golden_now());
    if let Ok(verified) = &verified {
        let canonical = capgate::token::encode(verified.biscuit()).expect("re-encode");
        assert_eq!(canonical, token, "a non-canonical spelling verified");
        assert!(verified.expires_at() > golden_now());
        assert_eq!(
            verified.revocation_ids().first(),
            Some(&fixture.golden_authority),
            "an authority block other than the golden one verified"
        );
    }
    let decision = fixture
        .guard
        .decide_at(token, &fixture.request, golden_now(), Instant::now());
    if decision.is_allow() {
        assert!(verified.is_ok(), "allowed a token that does not verify");
    }
}

fn route_table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let route = |method: &str, path: &str, resource: &str, verb| RouteConfig {
            method: method.into(),
            path: path.into(),
            resource: resource.into(),
            verb,
            mode: None,
        };
        RouteTable::new(&[
            route("GET", "/v2/volumes", "http://railway/volumes", Verb::Read),
            route(
                "GET",
                "/v2/volumes/{id}",
                "http://railway/volumes/{id}",
                Verb::Read,
            ),
            route(
                "POST",
                "/v2/volumes/{id}/data",
                "http://railway/volumes/{id}",
                Verb::Write,
            ),
            route(
                "DELETE",
                "/v2/volumes/{id}",
                "http://railway/volumes/{id}",
                Verb::Delete,
            ),
            route(
                "GET",
                "/v2/backups/{id}",
                "http://railway/backups/{id}",
                Verb::Read,
            ),
            route(
                "PUT",
                "/v2/staging-volumes/{id}",
                "http://railway-staging/volumes/{id}",
                Verb::Write,
            ),
        ])
        .expect("routes")
    })
}

/// An HTTP request line (`METHOD target`) through what the proxy does before the guard:
/// parse the target, refuse absolute form, canonicalise the path, match the route table.
pub fn http_request(data: &[u8]) {
    let Some(space) = data.iter().position(|b| *b == b' ') else {
        return;
    };
    let (method, target) = (&data[..space], &data[space + 1..]);
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    if uri.scheme().is_some() || uri.authority().is_some() {
        return; // the proxy refuses absolute and authority form before canonicalising
    }
    let Ok(path) = canonicalize(uri.path()) else {
        return;
    };
    for segment in &path.segments {
        assert!(!segment.is_empty(), "{path:?}");
        assert!(segment != "." && segment != "..", "{path:?}");
        assert!(
            !segment.contains(['/', '\\', ';']) && !segment.chars().any(char::is_control),
            "{path:?}"
        );
    }
    // The encoded form is what goes upstream: a valid target that means the same segments.
    assert!(
        http::Uri::try_from(path.encoded.as_str()).is_ok(),
        "{path:?}"
    );
    assert_eq!(
        canonicalize(&path.encoded).map(|again| again.segments),
        Ok(path.segments.clone()),
        "canonical form is stable"
    );
    if let Some(matched) = route_table().find(&method, &path.segments) {
        assert!(
            ResourcePattern::parse(&matched.resource).is_ok(),
            "{matched:?}"
        );
        // A resource is named by the route that matched, never reached from another one.
        let backups = matched.resource.starts_with("http://railway/backups/");
        assert_eq!(
            backups,
            path.segments.get(1).map(String::as_str) == Some("backups"),
            "{matched:?} from {path:?}"
        );
        assert_eq!(
            matched.resource.starts_with("http://railway/volumes/")
                || matched.resource == "http://railway/volumes",
            path.segments.get(1).map(String::as_str) == Some("volumes"),
            "{matched:?} from {path:?}"
        );
    }
}

/// A client's byte stream through the PostgreSQL frame decoder: the startup packet, then
/// typed messages framed and split into their strings as the session does.
pub fn pg_frames(data: &[u8]) {
    let mut after_startup = data;
    let messages = match wire::read_startup(&mut after_startup).now_or_never() {
        Some(Ok((_, body))) => {
            if let Ok(parameters) = wire::parse_parameters(&body) {
                assert!(parameters.iter().all(|(key, _)| !key.is_empty()));
            }
            after_startup
        }
        _ => data,
    };
    let mut single = messages;
    let _ = wire::read_message(&mut single, MAX_FRAME_BYTES).now_or_never();

    let mut stream = messages;
    let mut framer = wire::Framer::new(MAX_FRAME_BYTES);
    let mut consumed = 0;
    while let Some(Ok(frame)) = framer.read(&mut stream).now_or_never() {
        assert!(frame.len() >= 5, "a frame has a tag and a length word");
        assert!(frame.len() - 5 <= MAX_FRAME_BYTES);
        consumed += frame.len();
        assert!(consumed <= messages.len());
        let message = wire::message_of(&frame);
        assert_eq!(wire::encode(message.tag, &message.body), frame.to_vec());
        let body = message.body.as_slice();
        match message.tag {
            b'Q' | b'p' => {
                let _ = wire::cstr(body);
            }
            b'P' | b'B' => {
                let _ = wire::cstr(body).and_then(|(_, rest)| wire::cstr(rest));
            }
            b'E' => {
                let _ = wire::cstr(body);
            }
            b'C' | b'D' => {
                if let Some((_, rest)) = body.split_first() {
                    let _ = wire::cstr(rest);
                }
            }
            _ => {}
        }
    }
}

/// SQL text through the classifier (PostgreSQL's parser plus the walk over its tree).
pub fn sql(data: &[u8]) {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits::default();
    if let Ok(statements) = classify(sql, "public", &limits) {
        for statement in &statements {
            let _ = statement.max_verb();
            // PostgreSQL cannot PREPARE an EXECUTE: a statement that does both was misread.
            assert!(
                !matches!(statement.names, Some(NameChange::Prepare(_)))
                    || statement.executes.is_empty(),
                "{statement:?}"
            );
        }
    }
}

/// A small Railway-like schema: enough to reach fragments, aliases, variables, input objects,
/// an opaque JSON scalar, mapped and unmapped mutations.
const GRAPHQL_SCHEMA: &str = r#"
type Query { me: User! project(id: String!): Project! volumeInstance(id: String!): VolumeInstance! }
type Mutation {
  volumeDelete(volumeId: String!): Boolean!
  volumeUpdate(volumeId: String!, input: VolumeUpdateInput!): Volume!
  environmentPatchCommit(environmentId: String!, patch: JSON): String!
  userDelete: Boolean!
  twoFactorInfoDelete: Boolean!
}
type Subscription { logs(id: String!): String! }
type User { id: ID! name: String projects: [Project!]! }
type Project { id: ID! name: String! volumes: [Volume!]! }
type Volume { id: ID! name: String! project: Project! }
type VolumeInstance { id: ID! environmentId: String! volume: Volume! }
input VolumeUpdateInput { name: String }
scalar JSON
"#;

/// Mutations the fuzz endpoint maps; every other mutation must be refused.
const GRAPHQL_MAPPED: [&str; 3] = ["volumeDelete", "volumeUpdate", "environmentPatchCommit"];

fn graphql_endpoint() -> &'static capgate::adapters::graphql::Endpoint {
    use capgate::adapters::graphql::{parse_schema, Endpoint, GraphqlConfig, Upstream};
    static ENDPOINT: OnceLock<Endpoint> = OnceLock::new();
    ENDPOINT.get_or_init(|| {
        let config: GraphqlConfig = serde_json::from_value(serde_json::json!({
            "path": "/graphql",
            "schema": "fuzz.graphql",
            "query_resource": "railway://{$environment}/api/{field}",
            "schema_resource": "railway://{$environment}/api/schema",
            "limits": {"max_depth": 8, "max_aliases": 10, "max_root_fields": 8, "max_batch": 4},
            "fields": [
                {"field": "Mutation.volumeDelete", "resource": "railway://{$environment}/volumes/{volumeId}", "verb": "delete"},
                {"field": "Mutation.volumeUpdate", "resource": "railway://{$environment}/volumes/{volumeId}", "verb": "write"},
                {"field": "Mutation.environmentPatchCommit", "resource": "railway://{$environment}/environments/{environmentId}", "verb": "admin"}
            ]
        }))
        .expect("fuzz endpoint config");
        let schema = parse_schema(GRAPHQL_SCHEMA, std::path::Path::new("fuzz.graphql"))
            .expect("fuzz schema");
        let upstream = Upstream {
            url: "http://127.0.0.1:9/graphql".into(),
            credential: (
                http::HeaderName::from_static("authorization"),
                http::HeaderValue::from_static("Bearer fuzz"),
            ),
            timeout: Duration::from_secs(1),
        };
        Endpoint::with_schema(&config, schema, upstream).expect("fuzz endpoint")
    })
}

/// A GraphQL request through the adapter's judging path (decode, parse, validate against the
/// schema, select the operation, expand root fields, map them). The first byte picks the
/// shape: a JSON body, an `application/graphql` body, `GET ?query=`, or the rest sent as the
/// raw JSON body (batches, variables, extensions). Must hold: no panic; no mutation that no
/// rule maps is ever judged allowable; nothing judged from a GET is a mutation.
pub fn graphql_request(data: &[u8]) {
    use http::Method;
    let Some((shape, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let (method, content_type, query, body): (Method, Option<&str>, Option<String>, Vec<u8>) =
        match shape % 4 {
            0 => (
                Method::POST,
                Some("application/json"),
                None,
                serde_json::json!({"query": text}).to_string().into_bytes(),
            ),
            1 => (
                Method::POST,
                Some("application/graphql"),
                None,
                rest.to_vec(),
            ),
            2 => {
                let url = format!("query={}", percent_encode_all(text.as_bytes()));
                (Method::GET, None, Some(url), Vec::new())
            }
            _ => (Method::POST, Some("application/json"), None, rest.to_vec()),
        };
    let Ok(judged) = graphql_endpoint().judge(&method, content_type, query.as_deref(), &body)
    else {
        return;
    };
    for pending in &judged.pending {
        let root = pending
            .attributes
            .iter()
            .find(|(key, _)| key == "graphql_root")
            .map(|(_, value)| value.as_str());
        if root == Some("mutation") && !pending.field.starts_with("__") {
            assert!(
                GRAPHQL_MAPPED.contains(&pending.field.as_str()),
                "unmapped mutation {} judged allowable",
                pending.field
            );
        }
        assert!(
            !(method == Method::GET && root == Some("mutation")),
            "a mutation judged from a GET"
        );
        assert!(
            ResourcePattern::parse(&pending.resource.replace("{$environment}", "prod")).is_ok()
        );
    }
}

fn percent_encode_all(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}
