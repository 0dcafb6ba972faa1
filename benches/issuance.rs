//! Token issuance at library level: grant policy evaluation and minting, as the broker does
//! them per request. Prints tokens per second alongside criterion's timings.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use capgate::config::BrokerConfig;
use capgate::identity::{AuthMethod, ClaimValue, Identity};
use capgate::policy::{GrantEvaluator, PolicySet};
use capgate::scope::Scope;
use capgate::token::{mint, random_id, GrantedRight, TokenSpec};
use criterion::{criterion_group, criterion_main, Criterion};

fn spec() -> TokenSpec {
    let now = SystemTime::now();
    TokenSpec {
        row_budget: None,
        use_budget: None,
        agent: "deploy-bot".into(),
        session_id: random_id(),
        rights: [
            "pg://staging/:write",
            "pg://prod/public.bookings:read",
            "http://railway/volumes/:read",
        ]
        .iter()
        .map(|s| {
            let scope: Scope = s.parse().expect("scope");
            GrantedRight {
                resource: scope.resource,
                verb: scope.verb,
                environment: "staging".into(),
            }
        })
        .collect(),
        issued_at: now,
        expires_at: now + Duration::from_secs(600),
    }
}

fn evaluator() -> GrantEvaluator {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = BrokerConfig::load(&root.join("capgate.toml")).expect("capgate.toml");
    let policy = PolicySet::load_dir(&root.join("policies")).expect("policies");
    GrantEvaluator::new(policy, config.grant_settings())
}

fn issuance(c: &mut Criterion) {
    let key = biscuit_auth::KeyPair::new();
    let spec = spec();
    let evaluator = evaluator();
    let identity = Identity {
        agent: "deploy-bot".into(),
        method: AuthMethod::ApiKey,
        claims: vec![("team".into(), ClaimValue::Str("platform".into()))],
    };
    let scopes: Vec<Scope> = ["pg://staging/:write", "pg://prod/public.bookings:read"]
        .iter()
        .map(|s| s.parse().expect("scope"))
        .collect();

    c.bench_function("mint+serialize (3 rights)", |b| {
        b.iter(|| {
            mint(&spec, 1, &key)
                .expect("mint")
                .to_base64()
                .expect("b64")
        })
    });
    c.bench_function("grant policy evaluation (2 scopes)", |b| {
        b.iter(|| {
            evaluator
                .evaluate(&identity, &scopes, None, SystemTime::now())
                .expect("eval")
        })
    });

    // A plain throughput figure for the closing note: full library-level issuance per second.
    let n = 2000;
    let start = Instant::now();
    for _ in 0..n {
        let decision = evaluator
            .evaluate(&identity, &scopes, None, SystemTime::now())
            .expect("eval");
        assert!(decision.all_granted());
        mint(&spec, 1, &key)
            .expect("mint")
            .to_base64()
            .expect("b64");
    }
    let per_second = n as f64 / start.elapsed().as_secs_f64();
    println!("issuance (policy + mint + encode): {per_second:.0} tokens/s on one core");
}

criterion_group!(benches, issuance);
criterion_main!(benches);
