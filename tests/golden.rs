//! Golden vectors: tokens minted once with a published test key, committed with the decisions
//! they must produce at a fixed time. Any change to the token format, the authority block or
//! the adapter policy that changes a decision fails here, so it is always a conscious one.
//! Regenerate (and review the diff) with: cargo test --test golden -- --ignored

mod common;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capgate::config::RunLimits;
use capgate::containment::{ContainmentConfig, ContainmentDocument};
use capgate::guard::{ContainmentView, Guard, GuardConfig, Outcome, Request};
use capgate::policy::PolicySet;
use capgate::revocation::RevocationView;
use capgate::scope::Verb;
use capgate::token::{
    attenuate, encode, mint, Attenuation, GrantedRight, KeySetDocument, PublicKeySet, PublishedKey,
    TokenSpec,
};
use serde::{Deserialize, Serialize};

const KEY_ID: u32 = 7;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 2026-06-01T00:00:00Z: inside every golden token's lifetime.
const NOW: u64 = 1_780_272_000;

#[derive(Debug, Serialize, Deserialize)]
struct Case {
    token: String,
    resource: String,
    verb: Verb,
    environment: String,
    /// "allow" or the deny code.
    expect: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Vectors {
    public_key: String,
    tokens: std::collections::BTreeMap<String, String>,
    cases: Vec<Case>,
}

fn guard(public_key: &str) -> Guard {
    let document = KeySetDocument {
        active_key_id: KEY_ID,
        keys: vec![PublishedKey {
            key_id: KEY_ID,
            algorithm: "ed25519".into(),
            public_key: public_key.into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            verify_until: None,
        }],
    };
    let keys = Arc::new(RwLock::new(Arc::new(
        PublicKeySet::from_document(&document).expect("keys"),
    )));
    let view = Arc::new(RevocationView::new());
    view.apply(&[], Instant::now() + Duration::from_secs(3600));
    let containment = Arc::new(ContainmentView::new());
    let approval: biscuit_auth::PublicKey = public_key.parse().expect("key");
    containment
        .set_document(ContainmentDocument::new(
            &ContainmentConfig::default(),
            &approval,
        ))
        .expect("doc");
    Guard::new(
        GuardConfig {
            adapter: "golden".into(),
            max_token_bytes: 16 * 1024,
            max_staleness: Duration::from_secs(7200),
            limits: RunLimits::default(),
            cache_capacity: 0,
        },
        keys,
        view,
        PolicySet::load_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies/adapters"))
            .expect("policy"),
    )
    .with_containment(containment)
}

#[test]
fn golden_tokens_still_produce_their_decisions() {
    let text = std::fs::read_to_string(dir().join("vectors.json")).expect("vectors.json");
    let vectors: Vectors = serde_json::from_str(&text).expect("vectors");
    let guard = guard(&vectors.public_key);
    for case in &vectors.cases {
        let token = &vectors.tokens[&case.token];
        let request = Request {
            resource: case.resource.clone(),
            verb: case.verb,
            environment: case.environment.clone(),
            attributes: vec![],
        };
        let decision = guard.decide_at(token, &request, at(NOW), Instant::now());
        let got = match &decision.outcome {
            Outcome::Allow => "allow".to_owned(),
            Outcome::Deny { code, .. } => code.as_str().to_owned(),
            Outcome::ApprovalRequired { .. } => "approval_required".to_owned(),
        };
        assert_eq!(
            got, case.expect,
            "{} {} {} with {}",
            case.verb, case.resource, case.environment, case.token
        );
    }
    // The authority block's Datalog, exactly as committed.
    let inspection = capgate::token::inspect(&vectors.tokens["deploy"], None).expect("inspect");
    let expected =
        std::fs::read_to_string(dir().join("deploy.authority.dl")).expect("authority source");
    assert_eq!(inspection.blocks[0].source.trim(), expected.trim());
}

#[test]
#[ignore = "writes new golden vectors; run on purpose and review the diff"]
fn regenerate_golden_vectors() {
    let keypair = biscuit_auth::KeyPair::new();
    let right = |r: &str, v: Verb, e: &str| GrantedRight {
        resource: r.parse().expect("pattern"),
        verb: v,
        environment: e.into(),
    };
    let spec = TokenSpec {
        agent: "golden-bot".into(),
        session_id: "00000000000000000000000000000001".into(),
        rights: vec![
            right("pg://staging/", Verb::Write, "staging"),
            right("http://railway/volumes/", Verb::Read, "prod"),
            right("http://railway/volumes/vol_1", Verb::Delete, "prod"),
        ],
        issued_at: at(1_767_225_600),  // 2026-01-01
        expires_at: at(1_893_456_000), // 2030-01-01
        row_budget: None,
        use_budget: None,
    };
    let deploy = encode(&mint(&spec, KEY_ID, &keypair).expect("mint")).expect("encode");
    let narrowed = attenuate(
        &deploy,
        &Attenuation {
            resource: Some("pg://staging/public.bookings".parse().expect("p")),
            verbs: vec![Verb::Read, Verb::Write],
            expires_at: None,
        },
    )
    .expect("attenuate");
    let case = |token: &str, resource: &str, verb, environment: &str, expect: &str| Case {
        token: token.into(),
        resource: resource.into(),
        verb,
        environment: environment.into(),
        expect: expect.into(),
    };
    let cases = vec![
        case(
            "deploy",
            "pg://staging/public.bookings",
            Verb::Write,
            "staging",
            "allow",
        ),
        case(
            "deploy",
            "pg://staging/public.bookings",
            Verb::Write,
            "prod",
            "policy_denied",
        ),
        case(
            "deploy",
            "pg://prod/public.bookings",
            Verb::Write,
            "prod",
            "policy_denied",
        ),
        case(
            "deploy",
            "http://railway/volumes/vol_9",
            Verb::Read,
            "prod",
            "allow",
        ),
        case(
            "deploy",
            "http://railway/backups/bk_1",
            Verb::Read,
            "prod",
            "policy_denied",
        ),
        case(
            "deploy",
            "http://railway/volumes/vol_1",
            Verb::Delete,
            "prod",
            "approval_required",
        ),
        case(
            "deploy",
            "http://railway/volumes/vol_2",
            Verb::Delete,
            "prod",
            "policy_denied",
        ),
        case(
            "narrowed",
            "pg://staging/public.bookings",
            Verb::Write,
            "staging",
            "allow",
        ),
        case(
            "narrowed",
            "pg://staging/public.guests",
            Verb::Write,
            "staging",
            "policy_denied",
        ),
        case(
            "narrowed",
            "http://railway/volumes/vol_9",
            Verb::Read,
            "prod",
            "policy_denied",
        ),
    ];
    let vectors = Vectors {
        public_key: keypair.public().to_string(),
        tokens: [
            ("deploy".to_owned(), deploy.clone()),
            ("narrowed".to_owned(), narrowed),
        ]
        .into_iter()
        .collect(),
        cases,
    };
    std::fs::write(
        dir().join("vectors.json"),
        serde_json::to_string_pretty(&vectors).expect("json"),
    )
    .expect("write");
    let inspection = capgate::token::inspect(&deploy, None).expect("inspect");
    std::fs::write(
        dir().join("deploy.authority.dl"),
        format!("{}\n", inspection.blocks[0].source.trim()),
    )
    .expect("write");
}

/// Thousands of mutated tokens: the guard never panics, and nothing but the untouched token
/// is ever allowed.
#[test]
fn mutated_tokens_are_never_allowed() {
    let text = std::fs::read_to_string(dir().join("vectors.json")).expect("vectors.json");
    let vectors: Vectors = serde_json::from_str(&text).expect("vectors");
    let guard = guard(&vectors.public_key);
    let original = vectors.tokens["deploy"].clone();
    let request = Request {
        resource: "pg://staging/public.bookings".into(),
        verb: Verb::Write,
        environment: "staging".into(),
        attributes: vec![],
    };
    assert!(guard
        .decide_at(&original, &request, at(NOW), Instant::now())
        .is_allow());
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/ ";
    let mut next = common::xorshift(0xDEAD_BEEF_CAFE_F00D);
    let mut codes: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for i in 0..3000 {
        let mut bytes = original.clone().into_bytes();
        for _ in 0..=(next() % 3) {
            let at = (next() % bytes.len() as u64) as usize;
            match next() % 4 {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, alphabet[(next() % alphabet.len() as u64) as usize]),
                _ => bytes[at] = alphabet[(next() % alphabet.len() as u64) as usize],
            }
        }
        let mutated = String::from_utf8_lossy(&bytes).into_owned();
        if mutated == original {
            continue;
        }
        let decision = guard.decide_at(&mutated, &request, at(NOW), Instant::now());
        assert!(!decision.is_allow(), "mutation {i} was allowed: {mutated}");
        if let Outcome::Deny { code, .. } = decision.outcome {
            *codes.entry(code.as_str()).or_insert(0) += 1;
        }
    }
    // Many mutations must get past decoding, so the signature check is really exercised.
    assert!(
        codes.get("token_bad_signature").copied().unwrap_or(0) > 100,
        "{codes:?}"
    );
}
