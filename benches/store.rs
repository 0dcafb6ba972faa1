//! Issuance and guard decisions with the Redis store beside the embedded SQLite store.
//! Issuance touches the store twice (agent revocation check, session record); guard decisions
//! never touch it (they read the local revocation view), which the last line demonstrates.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use capgate::config::BrokerConfig;
use capgate::identity::{AuthMethod, Identity};
use capgate::policy::{GrantEvaluator, PolicySet};
use capgate::scope::Scope;
use capgate::store::{
    NewRevocation, RedisStore, RevocationKind, SessionRecord, SqliteStore, Store,
};
use capgate::token::{mint, random_id, GrantedRight, Keyring, TokenSpec};

async fn issue_many(
    store: &dyn Store,
    evaluator: &GrantEvaluator,
    keyring: &Keyring,
    n: usize,
) -> Duration {
    let identity = Identity {
        agent: "deploy-bot".into(),
        method: AuthMethod::ApiKey,
        claims: vec![],
    };
    let scopes: Vec<Scope> = vec!["pg://staging/:write".parse().expect("scope")];
    let start = Instant::now();
    for _ in 0..n {
        assert!(!store.agent_revoked(&identity.agent).await.expect("store"));
        let now = SystemTime::now();
        let decision = evaluator
            .evaluate(&identity, &scopes, None, now)
            .expect("eval");
        let rights: Vec<GrantedRight> = scopes
            .iter()
            .map(|s| GrantedRight {
                resource: s.resource.clone(),
                verb: s.verb,
                environment: "staging".into(),
            })
            .collect();
        let spec = TokenSpec {
            row_budget: None,
            use_budget: None,
            agent: identity.agent.clone(),
            session_id: random_id(),
            rights,
            issued_at: now,
            expires_at: now + decision.ttl,
        };
        let token = mint(&spec, keyring.active_key_id(), keyring.signing_key()).expect("mint");
        std::hint::black_box(capgate::token::encode(&token).expect("encode"));
        store
            .record_session(SessionRecord {
                session_id: spec.session_id,
                agent: spec.agent,
                key_id: 1,
                issued_at: 0,
                expires_at: capgate::token::unix_seconds_now() + 600,
                rights: String::new(),
            })
            .await
            .expect("record");
    }
    start.elapsed() / n as u32
}

async fn revoke_many(store: &dyn Store, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        store
            .revoke(NewRevocation {
                kind: RevocationKind::Session,
                value: random_id(),
                reason: "bench".into(),
                revoked_by: "bench".into(),
                expires_at: Some(capgate::token::unix_seconds_now() + 60),
            })
            .await
            .expect("revoke");
    }
    start.elapsed() / n as u32
}

#[tokio::main]
async fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = BrokerConfig::load(&root.join("capgate.toml")).expect("config");
    let evaluator = GrantEvaluator::new(
        PolicySet::load_dir(&root.join("policies")).expect("policies"),
        config.grant_settings(),
    );
    let dir = tempfile::tempdir().expect("dir");
    let (keyring, _) = Keyring::open_or_create(dir.path()).expect("keys");
    let sqlite: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("state.db")).expect("sqlite"));
    let prefix = format!("capgate-bench-{}:", random_id());
    let redis: Arc<dyn Store> = Arc::new(
        RedisStore::connect("redis://127.0.0.1:6379", &prefix)
            .await
            .expect("redis on 127.0.0.1:6379"),
    );
    let n = 2000;
    issue_many(sqlite.as_ref(), &evaluator, &keyring, 100).await;
    issue_many(redis.as_ref(), &evaluator, &keyring, 100).await;
    let issue_sqlite = issue_many(sqlite.as_ref(), &evaluator, &keyring, n).await;
    let issue_redis = issue_many(redis.as_ref(), &evaluator, &keyring, n).await;
    let revoke_sqlite = revoke_many(sqlite.as_ref(), 500).await;
    let revoke_redis = revoke_many(redis.as_ref(), 500).await;
    let feed = |store: Arc<dyn Store>| async move {
        let start = Instant::now();
        for _ in 0..200 {
            std::hint::black_box(store.revocations_since(0, 1000).await.expect("feed"));
        }
        start.elapsed() / 200
    };
    let feed_sqlite = feed(sqlite.clone()).await;
    let feed_redis = feed(redis.clone()).await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("{:<44} {:>12} {:>12}", "", "SQLite", "Redis");
    println!(
        "{:<44} {:>9.0} /s {:>9.0} /s",
        "issuance (policy + mint + 2 store calls)",
        1.0 / issue_sqlite.as_secs_f64(),
        1.0 / issue_redis.as_secs_f64()
    );
    println!(
        "{:<44} {:>9.1} us {:>9.1} us",
        "revocation write (durable, published)",
        us(revoke_sqlite),
        us(revoke_redis)
    );
    println!(
        "{:<44} {:>9.1} us {:>9.1} us",
        "feed page of 500 revocations",
        us(feed_sqlite),
        us(feed_redis)
    );
    println!("guard decisions read only the local revocation view: identical for both stores (see `cargo bench --bench guard`)");
}
