//! The guard against a bare biscuit-auth parse + verify + authorize of the same two-block
//! token and request: cold (no cache), warm with the verified-token cache only, and warm with
//! the decision cache too (the Datalog verdict reused). Printed as ratios, with decisions per
//! second. Goals: cold <= 1.2x, warm <= 0.2x of bare biscuit, a warm decision <= 5 us.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use biscuit_auth::builder::{date, string, Term};
use biscuit_auth::{AuthorizerBuilder, Biscuit};
use capgate::config::RunLimits;
use capgate::containment::{ContainmentConfig, ContainmentDocument};
use capgate::guard::{ContainmentView, Guard, GuardConfig, Request};
use capgate::policy::PolicySet;
use capgate::revocation::RevocationView;
use capgate::scope::Verb;
use capgate::token::{attenuate, mint, random_id, Attenuation, GrantedRight, Keyring, TokenSpec};

const POLICY: &str = r#"
allow if resource($r), verb($v), environment($e), right($r, $v, $e);
allow if resource($r), verb($v), environment($e), right($p, $v, $e), $p.ends_with("/"), $r.starts_with($p);
"#;

fn time_per_op(iterations: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..iterations / 10 {
        f(); // warm up
    }
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    start.elapsed() / iterations
}

fn guard(keyring: &Keyring, cache_capacity: usize) -> Guard {
    let view = Arc::new(RevocationView::new());
    view.apply(&[], Instant::now() + Duration::from_secs(3600));
    Guard::new(
        GuardConfig {
            adapter: "bench".into(),
            max_token_bytes: 16 * 1024,
            max_staleness: Duration::from_secs(7200),
            limits: RunLimits::default(),
            cache_capacity,
        },
        Arc::new(RwLock::new(Arc::new(keyring.public_keys().expect("keys")))),
        view,
        PolicySet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/adapters"))
            .expect("policy"),
    )
    .with_containment(containment(keyring))
}

/// Deletes need approval; the benchmarked write needs none (but carries an audit obligation).
fn containment(keyring: &Keyring) -> Arc<ContainmentView> {
    let view = Arc::new(ContainmentView::new());
    view.set_document(ContainmentDocument::new(
        &ContainmentConfig::default(),
        &keyring.approval_key().public(),
    ))
    .expect("document");
    view
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (keyring, _) = Keyring::open_or_create(dir.path()).expect("keys");
    let now = SystemTime::now();
    let spec = TokenSpec {
        row_budget: None,
        use_budget: None,
        agent: "deploy-bot".into(),
        session_id: random_id(),
        rights: vec![
            GrantedRight {
                resource: "pg://staging/".parse().expect("r"),
                verb: Verb::Write,
                environment: "staging".into(),
            },
            GrantedRight {
                resource: "http://railway-staging/volumes/".parse().expect("r"),
                verb: Verb::Read,
                environment: "staging".into(),
            },
        ],
        issued_at: now,
        expires_at: now + Duration::from_secs(3600),
    };
    let authority = mint(&spec, keyring.active_key_id(), keyring.signing_key()).expect("mint");
    let token = attenuate(
        &capgate::token::encode(&authority).expect("encode"),
        &Attenuation {
            verbs: vec![Verb::Write, Verb::Read],
            ..Default::default()
        },
    )
    .expect("second block");
    let request = Request {
        resource: "pg://staging/public.bookings".into(),
        verb: Verb::Write,
        environment: "staging".into(),
        attributes: vec![],
    };
    let public = keyring.signing_key().public();

    let bare = || {
        let biscuit = Biscuit::from_base64(&token, public).expect("verify");
        let params: HashMap<String, Term> = HashMap::from([
            ("time".into(), date(&SystemTime::now())),
            ("resource".into(), string(&request.resource)),
            ("verb".into(), string("write")),
            ("environment".into(), string("staging")),
        ]);
        #[allow(
            clippy::disallowed_methods,
            reason = "benchmark baseline, constant source"
        )]
        let mut authorizer = AuthorizerBuilder::new()
            .code_with_params(
                "time({time}); resource({resource}); verb({verb}); environment({environment});",
                params,
                HashMap::new(),
            )
            .and_then(|b| b.code(POLICY))
            .map(|b| b.set_limits(RunLimits::default().to_biscuit()))
            .and_then(|b| b.build(&biscuit))
            .expect("authorizer");
        black_box(authorizer.authorize().expect("allow"));
    };
    let cold_guard = guard(&keyring, 0);
    let verified_only_guard = guard(&keyring, 1000).with_decision_cache(0);
    let warm_guard = guard(&keyring, 1000);
    let cold = || {
        assert!(cold_guard
            .decide_at(&token, &request, SystemTime::now(), Instant::now())
            .is_allow())
    };
    let verified_only = || {
        assert!(verified_only_guard
            .decide_at(&token, &request, SystemTime::now(), Instant::now())
            .is_allow())
    };
    let warm = || {
        assert!(warm_guard
            .decide_at(&token, &request, SystemTime::now(), Instant::now())
            .is_allow())
    };

    // What recording a decision costs: the token's digest alone (a token that never
    // verified), and digest + blocks' Datalog + revocation ids, serialised as the spool does.
    let decision = warm_guard.decide_at(&token, &request, SystemTime::now(), Instant::now());
    let verified = warm_guard.verify_token(&token).expect("verified");
    let record = |verified: Option<&capgate::token::VerifiedToken>| {
        let event = capgate::guard::decision_event("bench", &request, &decision, &token, verified);
        black_box(serde_json::to_vec(&event).expect("json"));
    };

    let n = 3000;
    let digest_t = time_per_op(n, || record(None));
    let blocks_t = time_per_op(n, || record(Some(&verified)));
    let bare_t = time_per_op(n, bare);
    let cold_t = time_per_op(n, cold);
    let verified_only_t = time_per_op(n, verified_only);
    let warm_t = time_per_op(n, warm);
    let ratio = |t: Duration| t.as_secs_f64() / bare_t.as_secs_f64();
    println!("two-block token, {} bytes", token.len());
    println!(
        "bare biscuit parse+verify+authorize: {:>8.1} us",
        bare_t.as_secs_f64() * 1e6
    );
    println!(
        "guard, cold (no cache):              {:>8.1} us  ratio {:.2}x (goal <= 1.2x)",
        cold_t.as_secs_f64() * 1e6,
        ratio(cold_t)
    );
    println!(
        "guard, verified-token cache only:    {:>8.1} us  ratio {:.2}x",
        verified_only_t.as_secs_f64() * 1e6,
        ratio(verified_only_t)
    );
    println!(
        "guard, warm (both caches):           {:>8.1} us  ratio {:.2}x (goal <= 0.2x, <= 5 us)",
        warm_t.as_secs_f64() * 1e6,
        ratio(warm_t)
    );
    println!(
        "audit record of a decision: digest only {:.1} us, digest + blocks {:.1} us",
        digest_t.as_secs_f64() * 1e6,
        blocks_t.as_secs_f64() * 1e6
    );
    println!(
        "guard decisions/s on one core: cold {:.0}, verified-token cache {:.0}, warm {:.0}",
        1.0 / cold_t.as_secs_f64(),
        1.0 / verified_only_t.as_secs_f64(),
        1.0 / warm_t.as_secs_f64()
    );
}
