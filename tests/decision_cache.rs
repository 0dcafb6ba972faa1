//! The guard's decision cache keeps a Datalog allow only while nothing can change it: each
//! test warms the cache with an allow, changes one thing the decision depends on, and shows
//! the next decision follows the change at once, with the reason of the deny.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capgate::config::RunLimits;
use capgate::containment::{ContainmentConfig, ContainmentDocument};
use capgate::guard::{ContainmentView, Decision, Guard, GuardConfig, KeyView, Outcome, Request};
use capgate::policy::PolicySet;
use capgate::revocation::RevocationView;
use capgate::scope::Verb;
use capgate::store::{Revocation, RevocationKind};
use capgate::token::{
    attenuate, encode, mint, Attenuation, GrantedRight, KeySetDocument, PublicKeySet, PublishedKey,
    TokenSpec,
};

const KEY_ID: u32 = 1;
/// 2026-06-01T00:00:00Z.
const NOW: u64 = 1_780_272_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

struct Fixture {
    guard: Guard,
    keys: KeyView,
    public_key: String,
    containment: Arc<ContainmentView>,
    revocations: Arc<RevocationView>,
    keypair: biscuit_auth::KeyPair,
}

fn key_set(public_key: &str, verify_until: Option<&str>) -> Arc<PublicKeySet> {
    Arc::new(
        PublicKeySet::from_document(&KeySetDocument {
            active_key_id: KEY_ID,
            keys: vec![PublishedKey {
                key_id: KEY_ID,
                algorithm: "ed25519".into(),
                public_key: public_key.into(),
                created_at: "2026-01-01T00:00:00Z".into(),
                verify_until: verify_until.map(str::to_owned),
            }],
        })
        .expect("keys"),
    )
}

fn repository_policy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies/adapters")
}

fn fixture(policy_dir: &Path) -> Fixture {
    let keypair = biscuit_auth::KeyPair::new();
    let public_key = keypair.public().to_string();
    let keys: KeyView = Arc::new(RwLock::new(key_set(&public_key, None)));
    let revocations = Arc::new(RevocationView::new());
    revocations.apply(&[], Instant::now() + Duration::from_secs(3600));
    let containment = Arc::new(ContainmentView::new());
    containment
        .set_document(ContainmentDocument::new(
            &ContainmentConfig::default(),
            &keypair.public(),
        ))
        .expect("containment");
    let guard = Guard::new(
        GuardConfig {
            adapter: "cache-test".into(),
            max_token_bytes: 16 * 1024,
            max_staleness: Duration::from_secs(7200),
            limits: RunLimits::default(),
            cache_capacity: 100,
        },
        keys.clone(),
        revocations.clone(),
        PolicySet::load_dir(policy_dir).expect("policy"),
    )
    .with_containment(containment.clone());
    Fixture {
        guard,
        keys,
        public_key,
        containment,
        revocations,
        keypair,
    }
}

impl Fixture {
    fn token(&self, rights: &[(&str, Verb)]) -> String {
        let spec = TokenSpec {
            agent: "cache-bot".into(),
            session_id: "00000000000000000000000000000007".into(),
            rights: rights
                .iter()
                .map(|(resource, verb)| GrantedRight {
                    resource: resource.parse().expect("pattern"),
                    verb: *verb,
                    environment: "staging".into(),
                })
                .collect(),
            issued_at: at(NOW - 60),
            expires_at: at(NOW + 86_400),
            row_budget: None,
            use_budget: None,
        };
        encode(&mint(&spec, KEY_ID, &self.keypair).expect("mint")).expect("encode")
    }

    fn decide(&self, token: &str, request: &Request, secs: u64) -> Decision {
        self.guard
            .decide_at(token, request, at(secs), Instant::now())
    }
}

fn request(resource: &str, verb: Verb) -> Request {
    Request {
        resource: resource.into(),
        verb,
        environment: "staging".into(),
        attributes: vec![],
    }
}

fn deny_code(decision: &Decision) -> &'static str {
    match &decision.outcome {
        Outcome::Deny { code, .. } => code.as_str(),
        Outcome::Allow => "allow",
        Outcome::ApprovalRequired { .. } => "approval_required",
    }
}

fn deny_reason(decision: &Decision) -> String {
    match &decision.outcome {
        Outcome::Deny { reason, .. } => reason.clone(),
        other => format!("{other:?}"),
    }
}

#[test]
fn an_attenuated_expiry_ends_a_cached_allow_on_its_second() {
    let f = fixture(&repository_policy());
    let parent = f.token(&[("http://api/volumes/", Verb::Read)]);
    let short = attenuate(
        &parent,
        &Attenuation {
            expires_at: Some(at(NOW + 10)),
            ..Attenuation::default()
        },
    )
    .expect("attenuate");
    let read = request("http://api/volumes/v1", Verb::Read);
    for secs in [NOW, NOW + 5, NOW + 9, NOW + 10] {
        assert!(
            f.decide(&short, &read, secs).is_allow(),
            "at +{}",
            secs - NOW
        );
    }
    assert_eq!(f.guard.decisions().len(), 1, "one operation, one entry");
    // The authority block lives another day; the attenuation block's check ends it now.
    let late = f.decide(&short, &read, NOW + 11);
    assert_eq!(deny_code(&late), "policy_denied");
    assert!(
        late.explanation
            .iter()
            .any(|line| line.contains("attenuation block 1") && line.contains("time")),
        "{:?}",
        late.explanation
    );
    // The parent, cached under its own signature, is unaffected.
    assert!(f.decide(&parent, &read, NOW + 11).is_allow());
}

#[test]
fn tokens_never_share_a_cached_allow() {
    let f = fixture(&repository_policy());
    let wide = f.token(&[("http://api/", Verb::Read)]);
    let other = f.token(&[("http://api/other/", Verb::Read)]);
    let narrowed = attenuate(
        &wide,
        &Attenuation {
            resource: Some("http://api/other/".parse().expect("pattern")),
            ..Attenuation::default()
        },
    )
    .expect("attenuate");
    let read = request("http://api/volumes/v1", Verb::Read);
    assert!(f.decide(&wide, &read, NOW).is_allow());
    assert!(f.decide(&wide, &read, NOW + 1).is_allow());
    for token in [&other, &narrowed] {
        for secs in [NOW + 1, NOW + 2] {
            let decision = f.decide(token, &read, secs);
            assert_eq!(deny_code(&decision), "policy_denied", "{decision:?}");
        }
    }
    // The same token on another resource, verb or environment is a different question.
    let write = request("http://api/volumes/v1", Verb::Write);
    assert_eq!(
        deny_code(&f.decide(&wide, &write, NOW + 2)),
        "policy_denied"
    );
    let prod = Request {
        environment: "prod".into(),
        ..read.clone()
    };
    assert_eq!(deny_code(&f.decide(&wide, &prod, NOW + 2)), "policy_denied");
}

#[test]
fn revocation_freeze_and_key_retirement_reach_a_cached_allow_at_once() {
    let f = fixture(&repository_policy());
    let token = f.token(&[("http://api/volumes/", Verb::Write)]);
    let write = request("http://api/volumes/v1", Verb::Write);
    let warm = f.decide(&token, &write, NOW);
    assert!(warm.is_allow(), "{warm:?}");
    assert!(f.decide(&token, &write, NOW + 1).is_allow());

    f.containment.set_frozen(true);
    let frozen = f.decide(&token, &write, NOW + 2);
    assert_eq!(deny_code(&frozen), "frozen", "{frozen:?}");
    f.containment.set_frozen(false);
    assert!(f.decide(&token, &write, NOW + 3).is_allow());

    *f.keys.write().expect("keys") = key_set(&f.public_key, Some("2026-05-31T00:00:00Z"));
    let retired = f.decide(&token, &write, NOW + 4);
    assert_eq!(deny_code(&retired), "token_key_retired", "{retired:?}");
    *f.keys.write().expect("keys") = key_set(&f.public_key, None);
    assert!(f.decide(&token, &write, NOW + 5).is_allow());

    let keys = f.keys.read().expect("keys").clone();
    let verified = capgate::token::verify(&token, &keys, 16 * 1024, at(NOW)).expect("verifies");
    f.revocations.apply(
        &[Revocation {
            cursor: 1,
            kind: RevocationKind::Token,
            value: verified.revocation_ids()[0].clone(),
            reason: "test".into(),
            revoked_by: "operator".into(),
            revoked_at: NOW,
            expires_at: None,
        }],
        Instant::now() + Duration::from_secs(3600),
    );
    let revoked = f.decide(&token, &write, NOW + 6);
    assert_eq!(deny_code(&revoked), "token_revoked", "{revoked:?}");
}

#[test]
fn a_verb_that_needs_approval_is_never_answered_from_the_cache() {
    let f = fixture(&repository_policy());
    let token = f.token(&[("http://api/volumes/", Verb::Delete)]);
    let delete = request("http://api/volumes/v1", Verb::Delete);
    for secs in [NOW, NOW + 1, NOW + 2] {
        let decision = f.decide(&token, &delete, secs);
        assert_eq!(deny_code(&decision), "approval_required", "{decision:?}");
    }
}

/// An operator's policy with its own date and an attribute rule: both key the cache.
fn policy_with(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("0-extra.dl"), extra).expect("write");
    std::fs::copy(
        repository_policy().join("default.dl"),
        dir.path().join("1-default.dl"),
    )
    .expect("copy");
    dir
}

#[test]
fn a_date_in_the_adapter_policy_ends_a_cached_allow() {
    // A change freeze from 2026-06-01T00:01:40Z (NOW + 100), written by the operator.
    let dir = policy_with("deny if time($t), $t >= 2026-06-01T00:01:40Z;\n");
    let f = fixture(dir.path());
    let token = f.token(&[("http://api/", Verb::Read)]);
    let read = request("http://api/volumes/v1", Verb::Read);
    for secs in [NOW, NOW + 50, NOW + 99] {
        assert!(
            f.decide(&token, &read, secs).is_allow(),
            "at +{}",
            secs - NOW
        );
    }
    let after = f.decide(&token, &read, NOW + 100);
    assert_eq!(deny_code(&after), "policy_denied");
    assert!(deny_reason(&after).contains("deny if time"), "{after:?}");
}

#[test]
fn attributes_key_the_cache_when_a_policy_reads_them() {
    let dir = policy_with("deny if attribute(\"path\", \"/volumes/secret\");\n");
    let f = fixture(dir.path());
    let token = f.token(&[("http://api/", Verb::Read)]);
    let with_path = |path: &str| Request {
        attributes: vec![("path".into(), path.into())],
        ..request("http://api/volumes", Verb::Read)
    };
    assert!(f
        .decide(&token, &with_path("/volumes/public"), NOW)
        .is_allow());
    assert!(f
        .decide(&token, &with_path("/volumes/public"), NOW + 1)
        .is_allow());
    let secret = f.decide(&token, &with_path("/volumes/secret"), NOW + 1);
    assert_eq!(deny_code(&secret), "policy_denied", "{secret:?}");

    // The repository's policy reads no attribute: one entry serves every path.
    let plain = fixture(&repository_policy());
    let token = plain.token(&[("http://api/", Verb::Read)]);
    for path in ["/a", "/b", "/c"] {
        assert!(plain.decide(&token, &with_path(path), NOW).is_allow());
    }
    assert_eq!(plain.guard.decisions().len(), 1);
}
