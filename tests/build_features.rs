//! The test suite is meant to run with every adapter built: without `--features pg` the
//! PostgreSQL adapter's tests would not compile in (`pg_proxy`, `fuzz_regressions`,
//! `incident_replay`) or would find `capgate proxy pg` refusing to start (`pg_approvals`, ...).
//! Say so once, plainly, instead of letting them vanish.

#[cfg(not(feature = "pg"))]
#[test]
fn every_adapter_is_built_for_the_tests() {
    panic!(
        "the tests ran without the PostgreSQL adapter: run `scripts/test` \
         (cargo test --workspace --all-features; building pg_query needs libclang-dev)"
    );
}
