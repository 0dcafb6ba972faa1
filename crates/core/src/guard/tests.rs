//! The guard's own rules, decided in-process: every way a token fails is its own deny code,
//! an allow wraps exactly its payload, an allow's obligations are fulfilled through the ledger
//! (and a ledger failure is a deny), a batch passes only whole, and an operation prepared for
//! later runs keeps its approval for them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::containment::{Ledger, LedgerCode, LedgerDenial};
use super::*;
use crate::containment::audit::AuditEvent;
use crate::containment::{ContainmentConfig, ContainmentDocument, Operation};
use crate::policy::{PolicyFile, PolicySet};
use crate::revocation::{Revocation, RevocationKind};
use crate::token::{
    encode, mint, GrantedRight, KeySetDocument, PublicKeySet, PublishedKey, TokenSpec,
};

const KEY_ID: u32 = 1;
const SESSION: &str = "0000000000000000000000000000000a";
/// The repository's adapter policy, in the words a policy file would use.
const POLICY: &str = r#"
allow if resource($r), verb($v), environment($e), right($r, $v, $e);
allow if resource($r), verb($v), environment($e), right($p, $v, $e), $p.ends_with("/"), $r.starts_with($p);
"#;

struct Fixture {
    guard: Guard,
    keypair: biscuit_auth::KeyPair,
    revocations: Arc<RevocationView>,
}

fn fixture(containment: bool, synced: bool) -> Fixture {
    let keypair = biscuit_auth::KeyPair::new();
    let keys: KeyView = Arc::new(RwLock::new(Arc::new(
        PublicKeySet::from_document(&KeySetDocument {
            active_key_id: KEY_ID,
            keys: vec![PublishedKey {
                key_id: KEY_ID,
                algorithm: "ed25519".into(),
                public_key: keypair.public().to_string(),
                created_at: "2026-01-01T00:00:00Z".into(),
                verify_until: None,
            }],
        })
        .expect("keys"),
    )));
    let revocations = Arc::new(RevocationView::new());
    if synced {
        revocations.apply(&[], Instant::now());
    }
    let policy = PolicySet::from_files(vec![PolicyFile {
        path: PathBuf::from("adapter.dl"),
        source: POLICY.into(),
    }])
    .expect("policy");
    let mut guard = Guard::new(
        GuardConfig {
            adapter: "unit".into(),
            max_token_bytes: 16 * 1024,
            max_staleness: Duration::from_secs(60),
            limits: RunLimits::default(),
            cache_capacity: 16,
        },
        keys,
        revocations.clone(),
        policy,
    );
    if containment {
        let view = Arc::new(ContainmentView::new());
        view.set_document(ContainmentDocument::new(
            &ContainmentConfig::default(),
            &keypair.public(),
        ))
        .expect("containment");
        guard = guard.with_containment(view);
    }
    Fixture {
        guard,
        keypair,
        revocations,
    }
}

fn token_from(keypair: &biscuit_auth::KeyPair, rights: &[(&str, Verb)], ttl: u64) -> String {
    let now = SystemTime::now();
    let spec = TokenSpec {
        agent: "unit-bot".into(),
        session_id: SESSION.into(),
        rights: rights
            .iter()
            .map(|(resource, verb)| GrantedRight {
                resource: resource.parse().expect("pattern"),
                verb: *verb,
                environment: "staging".into(),
            })
            .collect(),
        issued_at: now - Duration::from_secs(5),
        expires_at: now + Duration::from_secs(ttl),
        row_budget: None,
        use_budget: None,
    };
    encode(&mint(&spec, KEY_ID, keypair).expect("mint")).expect("encode")
}

fn op(resource: &str, verb: Verb) -> Request {
    Request {
        resource: resource.into(),
        verb,
        environment: "staging".into(),
        attributes: vec![],
    }
}

fn code_of(decision: &Decision) -> &'static str {
    match &decision.outcome {
        Outcome::Deny { code, .. } => code.as_str(),
        Outcome::Allow => "allow",
        Outcome::ApprovalRequired { .. } => "approval_required",
    }
}

/// Keeps what the guard asked of it; refuses audits when told to.
#[derive(Default)]
struct RecordingLedger {
    audited: Mutex<Vec<AuditEvent>>,
    approvals_requested: Mutex<usize>,
    refuse_audit: bool,
}

#[async_trait]
impl Ledger for RecordingLedger {
    async fn request_approval(&self, _: &str, _: &Operation) -> Result<String, LedgerDenial> {
        *self.approvals_requested.lock().expect("lock") += 1;
        Ok("approval-1".into())
    }
    async fn consume_approval(&self, _: &str, _: &str, _: &str) -> Result<(), LedgerDenial> {
        Ok(())
    }
    async fn count(&self, _: &str, _: Verb) -> Result<(), LedgerDenial> {
        Ok(())
    }
    async fn audit(&self, event: AuditEvent) -> Result<(), LedgerDenial> {
        if self.refuse_audit {
            return Err(LedgerDenial {
                code: LedgerCode::AuditUnavailable,
                reason: "the audit trail is unreachable".into(),
            });
        }
        self.audited.lock().expect("lock").push(event);
        Ok(())
    }
}

#[tokio::test]
async fn an_allow_wraps_exactly_its_payload_and_names_its_decision() {
    let f = fixture(true, true);
    let token = token_from(&f.keypair, &[("pg://staging/", Verb::Read)], 600);
    let authorized = f
        .guard
        .authorize(
            &token,
            &[op("pg://staging/public.t", Verb::Read)],
            "SELECT 1",
            Enforcement::Enforce(None),
        )
        .await
        .expect("a read the token grants");
    assert_eq!(*authorized.get(), "SELECT 1");
    assert!(!authorized.decision_id().is_empty());
    let denied = f
        .guard
        .authorize(
            &token,
            &[op("pg://prod/public.t", Verb::Read)],
            "SELECT 1",
            Enforcement::Enforce(None),
        )
        .await
        .expect_err("another environment's resource");
    assert_eq!(code_of(&denied), "policy_denied");
}

#[test]
fn every_token_failure_is_its_own_deny_code() {
    let f = fixture(true, true);
    let read = op("pg://staging/public.t", Verb::Read);
    assert_eq!(
        code_of(&f.guard.decide("not a token", &read)),
        "token_malformed"
    );
    let stranger = biscuit_auth::KeyPair::new();
    let forged = token_from(&stranger, &[("pg://staging/", Verb::Read)], 600);
    assert_eq!(
        code_of(&f.guard.decide(&forged, &read)),
        "token_bad_signature"
    );
    let token = token_from(&f.keypair, &[("pg://staging/", Verb::Read)], 600);
    let later = SystemTime::now() + Duration::from_secs(3600);
    let expired = f.guard.decide_at(&token, &read, later, Instant::now());
    assert_eq!(code_of(&expired), "token_expired");
    f.revocations.apply(
        &[Revocation {
            cursor: 1,
            kind: RevocationKind::Session,
            value: SESSION.into(),
            reason: "unit test".into(),
            revoked_by: "operator".into(),
            revoked_at: 0,
            expires_at: None,
        }],
        Instant::now(),
    );
    assert_eq!(code_of(&f.guard.decide(&token, &read)), "token_revoked");
}

#[test]
fn a_view_that_never_synchronised_denies_everything() {
    let f = fixture(true, false);
    let token = token_from(&f.keypair, &[("pg://staging/", Verb::Read)], 600);
    let decision = f
        .guard
        .decide(&token, &op("pg://staging/public.t", Verb::Read));
    assert_eq!(code_of(&decision), "revocation_feed_stale");
}

#[test]
fn without_containment_only_reads_are_decided() {
    let f = fixture(false, true);
    let token = token_from(&f.keypair, &[("pg://staging/", Verb::Write)], 600);
    let decision = f
        .guard
        .decide(&token, &op("pg://staging/public.t", Verb::Write));
    assert_eq!(code_of(&decision), "containment_unavailable");
}

#[tokio::test]
async fn a_write_is_allowed_only_once_its_obligations_are_fulfilled() {
    let f = fixture(true, true);
    let token = token_from(&f.keypair, &[("pg://staging/", Verb::Write)], 600);
    let write = op("pg://staging/public.t", Verb::Write);
    let without_ledger = f
        .guard
        .authorize(
            &token,
            std::slice::from_ref(&write),
            (),
            Enforcement::Enforce(None),
        )
        .await
        .expect_err("no ledger to record the write");
    assert_eq!(code_of(&without_ledger), "obligations_unfulfilled");

    let ledger = RecordingLedger::default();
    f.guard
        .authorize(
            &token,
            std::slice::from_ref(&write),
            (),
            Enforcement::Enforce(Some(&ledger)),
        )
        .await
        .expect("recorded, then allowed");
    assert_eq!(ledger.audited.lock().expect("lock").len(), 1);

    let down = RecordingLedger {
        refuse_audit: true,
        ..Default::default()
    };
    let denied = f
        .guard
        .authorize(
            &token,
            std::slice::from_ref(&write),
            (),
            Enforcement::Enforce(Some(&down)),
        )
        .await
        .expect_err("unrecordable");
    assert_eq!(code_of(&denied), "audit_unavailable");
    let Outcome::Deny { reason, .. } = &denied.outcome else {
        unreachable!()
    };
    assert!(
        reason.contains("the audit trail is unreachable (audit_unavailable)"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_batch_passes_whole_or_not_at_all() {
    let f = fixture(true, true);
    let token = token_from(&f.keypair, &[("http://railway/volumes/", Verb::Read)], 600);
    let ledger = RecordingLedger::default();
    let both = [
        op("http://railway/volumes/v1", Verb::Read),
        op("http://railway/volumes/v2", Verb::Read),
    ];
    let authorized = f
        .guard
        .authorize(&token, &both, "query", Enforcement::Enforce(Some(&ledger)))
        .await
        .expect("both reads granted");
    assert_eq!(authorized.decision_id().split(',').count(), 2);
    let mixed = [
        op("http://railway/volumes/v1", Verb::Read),
        op("http://railway/volumes/v1", Verb::Delete),
    ];
    let denied = f
        .guard
        .authorize(
            &token,
            &mixed,
            "mutation",
            Enforcement::Enforce(Some(&ledger)),
        )
        .await
        .expect_err("one operation is not granted");
    assert_eq!(code_of(&denied), "policy_denied");
    let empty = f
        .guard
        .authorize(&token, &[], "nothing", Enforcement::Enforce(Some(&ledger)))
        .await
        .expect_err("nothing to authorise");
    assert_eq!(code_of(&empty), "policy_denied");
}

#[tokio::test]
async fn a_prepared_operation_leaves_its_approval_for_each_run() {
    let f = fixture(true, true);
    let token = token_from(&f.keypair, &[("pg://staging/", Verb::Delete)], 600);
    let delete = op("pg://staging/public.bookings", Verb::Delete);
    let ledger = RecordingLedger::default();
    let prepared = f
        .guard
        .authorize_staged(
            &token,
            &[(delete.clone(), Stage::Prepare)],
            "Parse",
            &ledger,
        )
        .await
        .expect("granted but for the approval, which waits for the run");
    assert_eq!(*prepared.get(), "Parse");
    assert_eq!(*ledger.approvals_requested.lock().expect("lock"), 0);
    assert!(ledger.audited.lock().expect("lock").is_empty());

    let run = f
        .guard
        .authorize_staged(&token, &[(delete.clone(), Stage::Run)], "Execute", &ledger)
        .await
        .expect_err("a run needs the approval");
    assert_eq!(run.index, 0);
    assert_eq!(code_of(&run.decision), "approval_required");
    assert_eq!(*ledger.approvals_requested.lock().expect("lock"), 1);

    // Preparing is no way around a deny: an operation the token lacks fails at either stage.
    let drop = op("pg://staging", Verb::Admin);
    let refused = f
        .guard
        .authorize_staged(
            &token,
            &[(delete, Stage::Prepare), (drop, Stage::Prepare)],
            "Parse",
            &ledger,
        )
        .await
        .expect_err("admin is not granted");
    assert_eq!(
        (refused.index, code_of(&refused.decision)),
        (1, "policy_denied")
    );
}

#[test]
fn a_request_that_touches_nothing_still_needs_a_valid_token() {
    let f = fixture(true, true);
    let token = token_from(&f.keypair, &[("pg://staging/", Verb::Read)], 600);
    let allowed = f
        .guard
        .authorize_token(&token, "SELECT 1")
        .expect("a valid token");
    assert_eq!(*allowed.get(), "SELECT 1");
    let stranger = biscuit_auth::KeyPair::new();
    let forged = token_from(&stranger, &[("pg://staging/", Verb::Read)], 600);
    let refused = f
        .guard
        .authorize_token(&forged, "SELECT 1")
        .expect_err("a forged token");
    assert_eq!(code_of(&refused), "token_bad_signature");
}

#[tokio::test]
async fn shadow_mode_lets_a_request_through_carrying_the_deny_it_would_have_had() {
    let f = fixture(true, true);
    let token = token_from(&f.keypair, &[("http://railway/volumes/", Verb::Read)], 600);
    let ledger = RecordingLedger::default();
    let both = [
        op("http://railway/volumes/v1", Verb::Read),
        op("http://railway/backups/b1", Verb::Read),
    ];
    let shadowed = f
        .guard
        .authorize(&token, &both, "query", Enforcement::Shadow(Some(&ledger)))
        .await
        .expect("shadow mode lets it through");
    let would_have = shadowed
        .shadow_deny()
        .expect("the second read is not granted");
    assert_eq!(code_of(would_have), "policy_denied");
    let enforced = f
        .guard
        .authorize(&token, &both, "query", Enforcement::Enforce(Some(&ledger)))
        .await
        .expect_err("enforce mode denies the same request");
    assert_eq!(code_of(&enforced), "policy_denied");
    // A write in shadow mode still goes through only once its record is stored.
    let write = [op("http://railway/volumes/v1", Verb::Write)];
    let unrecorded = f
        .guard
        .authorize(&token, &write, "mutation", Enforcement::Shadow(None))
        .await
        .expect_err("no ledger to record the write");
    assert_eq!(code_of(&unrecorded), "obligations_unfulfilled");
}
