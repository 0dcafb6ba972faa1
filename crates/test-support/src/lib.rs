//! Helpers shared by the workspace's tests: deterministic inputs, and an in-process token
//! issuer with the views a guard reads (keys, a synchronised revocation view, a containment
//! document), so adapter tests can decide real tokens without a broker.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use capgate_core::containment::audit::AuditEvent;
use capgate_core::containment::{ContainmentConfig, ContainmentDocument, Operation};
use capgate_core::guard::containment::{Ledger, LedgerCode, LedgerDenial};
use capgate_core::guard::{ContainmentView, KeyView};
use capgate_core::revocation::RevocationView;
use capgate_core::scope::Verb;
use capgate_core::token::{
    encode, mint, GrantedRight, KeySetDocument, PublicKeySet, PublishedKey, TokenSpec,
};

/// A small deterministic generator (xorshift64) for fuzz-style tests: the same seed gives the
/// same inputs on every run, so a failure can be replayed.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// A root key (id 1) standing in for the broker's, and what an adapter would have synced.
pub struct Issuer {
    keypair: biscuit_auth::KeyPair,
}

impl Default for Issuer {
    fn default() -> Self {
        Issuer::new()
    }
}

impl Issuer {
    pub fn new() -> Issuer {
        Issuer {
            keypair: biscuit_auth::KeyPair::new(),
        }
    }

    /// The published key set with this issuer's key, as the adapter's sync keeps it.
    pub fn key_view(&self) -> KeyView {
        let keys = PublicKeySet::from_document(&KeySetDocument {
            active_key_id: 1,
            keys: vec![PublishedKey {
                key_id: 1,
                algorithm: "ed25519".into(),
                public_key: self.keypair.public().to_string(),
                created_at: "2026-01-01T00:00:00Z".into(),
                verify_until: None,
            }],
        })
        .expect("a well-formed key set");
        Arc::new(RwLock::new(Arc::new(keys)))
    }

    /// A revocation view that synchronised just now and revokes nothing.
    pub fn synced_revocations(&self) -> Arc<RevocationView> {
        let view = Arc::new(RevocationView::new());
        view.apply(&[], Instant::now());
        view
    }

    /// The default containment document, approvals signed by this issuer's key.
    pub fn containment(&self) -> Arc<ContainmentView> {
        let view = Arc::new(ContainmentView::new());
        view.set_document(ContainmentDocument::new(
            &ContainmentConfig::default(),
            &self.keypair.public(),
        ))
        .expect("the default containment document");
        view
    }

    /// A token for `agent` with these (resource, verb) rights in `environment`, valid for ten
    /// minutes.
    pub fn token(&self, agent: &str, environment: &str, rights: &[(&str, Verb)]) -> String {
        let now = SystemTime::now();
        let spec = TokenSpec {
            agent: agent.into(),
            session_id: "0000000000000000000000000000000b".into(),
            rights: rights
                .iter()
                .map(|(resource, verb)| GrantedRight {
                    resource: resource.parse().expect("a resource pattern"),
                    verb: *verb,
                    environment: environment.into(),
                })
                .collect(),
            issued_at: now - Duration::from_secs(5),
            expires_at: now + Duration::from_secs(600),
            row_budget: None,
            use_budget: None,
        };
        encode(&mint(&spec, 1, &self.keypair).expect("mint")).expect("encode")
    }
}

/// A ledger with no broker behind it: every obligation fails (`broker_unreachable`), which
/// tests of reads and denials never reach, and tests of writes show as a deny.
pub struct NoBroker;

#[async_trait]
impl Ledger for NoBroker {
    async fn request_approval(&self, _: &str, _: &Operation) -> Result<String, LedgerDenial> {
        Err(unreachable_broker())
    }
    async fn consume_approval(&self, _: &str, _: &str, _: &str) -> Result<(), LedgerDenial> {
        Err(unreachable_broker())
    }
    async fn count(&self, _: &str, _: Verb) -> Result<(), LedgerDenial> {
        Err(unreachable_broker())
    }
    async fn audit(&self, _: AuditEvent) -> Result<(), LedgerDenial> {
        Err(unreachable_broker())
    }
}

fn unreachable_broker() -> LedgerDenial {
    LedgerDenial {
        code: LedgerCode::BrokerUnreachable,
        reason: "no broker in this test".into(),
    }
}
