//! Helpers shared by the workspace's unit tests.

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
