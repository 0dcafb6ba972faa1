//! Capgate's Biscuit tokens: minting (broker only), offline attenuation (any holder),
//! verification (guard), inspection (humans), and the root keys that sign them.
//!
//! The authority block states who (`agent`, `session`), what (`right(resource, verb,
//! environment)`) and until when (a signed `time` check). Its block context carries the same
//! summary in a compact signed form so verifiers need no Datalog run to read it.

mod attenuate;
mod inspect;
pub mod keys;
mod mint;
mod profile;
mod verify;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde::{Deserialize, Serialize};

pub use attenuate::{attenuate, Attenuation};
pub use inspect::{inspect, Inspection};
pub use keys::{KeyError, KeySetDocument, Keyring, PublicKeySet, PublishedKey};
pub use mint::{mint, GrantedRight, MintError, TokenSpec};
pub use profile::DatalogProfile;
pub use verify::{peek_expiry, verify, AuditMemo, VerifiedToken};

/// Why a token was refused before any policy ran. `PartialEq` so tests assert the exact reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejected {
    #[error("token is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("token is not a well-formed Capgate biscuit")]
    Malformed,
    #[error("token names no root key id")]
    MissingKeyId,
    #[error("token is signed by unknown root key {0}")]
    UnknownRootKey(u32),
    #[error("token's root key {0} is retired")]
    RetiredRootKey(u32),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
}

impl TokenRejected {
    /// Stable machine-readable code: the guard's deny code for it (one table, there).
    pub fn code(&self) -> &'static str {
        crate::guard::DenyCode::from(self).as_str()
    }
}

/// The signed summary stored as the authority block's context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthorityContext {
    /// Token format version.
    pub capgate: u32,
    pub agent: String,
    pub session: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// How many calls the token may make in all, across adapters (absent: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u64>,
}

pub(crate) const FORMAT_VERSION: u32 = 1;

/// URL-safe base64 with padding, as biscuit writes it, and nothing else when decoding: no
/// missing padding, no whitespace, no stray trailing bits. One token has one spelling, so the
/// text a cache or a log keys on is the token.
pub(crate) const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// The last instant Capgate reads from a token or a store: 9999-12-31T23:59:59Z. RFC 3339
/// cannot print a later one, and `SystemTime` holds it on every platform; a token whose
/// context expires later is malformed (the broker never mints one).
pub const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn unix_seconds_now() -> u64 {
    unix_seconds(SystemTime::now())
}

/// Saturates at [`MAX_UNIX_SECONDS`]: `UNIX_EPOCH + secs` panics once `secs` overflows
/// `SystemTime`, and times past the bound cannot be printed.
pub fn from_unix_seconds(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.min(MAX_UNIX_SECONDS))
}

/// RFC 3339 to the second, for any `SystemTime`: humantime panics on a time before the epoch
/// and cannot print one after [`MAX_UNIX_SECONDS`], so the time is clamped to that range.
pub fn rfc3339(t: SystemTime) -> String {
    let t = t.clamp(UNIX_EPOCH, from_unix_seconds(MAX_UNIX_SECONDS));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The token's wire form: URL-safe base64 of the biscuit's bytes.
pub fn encode(token: &biscuit_auth::Biscuit) -> Result<String, biscuit_auth::error::Token> {
    Ok(BASE64.encode(token.to_vec()?))
}

/// The bytes of a token in its wire form (no verification).
pub fn decode_token_bytes(token: &str) -> Result<Vec<u8>, TokenRejected> {
    decode_base64(token)
}

pub(crate) fn decode_base64(token: &str) -> Result<Vec<u8>, TokenRejected> {
    BASE64
        .decode(token.as_bytes())
        .map_err(|_| TokenRejected::Malformed)
}

/// Random identifier for sessions and decisions: 128 bits, hex.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).unwrap_or_else(|_| {
        // The OS RNG failing is unrecoverable for a security service; refuse to continue.
        panic!("operating system random number generator is unavailable")
    });
    hex::encode(bytes)
}
