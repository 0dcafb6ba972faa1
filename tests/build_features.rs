//! The test suite is meant to run with every adapter built: without `--features pg` the
//! PostgreSQL adapter's tests would not compile in (`pg_proxy`) or would find `capgate proxy pg`
//! refusing to start (`pg_approvals`, `golden`, ...). Say so once, plainly, instead.

#[test]
fn every_adapter_is_built_for_the_tests() {
    assert!(
        cfg!(feature = "pg"),
        "the tests ran without the PostgreSQL adapter: run `cargo test --workspace --all-features` \
         (README's test command; building pg_query needs libclang-dev)"
    );
}
