//! Verification: size, expiry, root key and signature, cheapest first.
//!
//! The expiry peek reads the authority context before any signature work so that replays of
//! old tokens cost almost nothing; the peeked value is never trusted for an allow: the signed
//! context is read again after verification, and the signed `time` check runs in Datalog.

use std::cell::Cell;
use std::time::SystemTime;

use biscuit_auth::format::schema;
use biscuit_auth::Biscuit;
use prost::Message;

use super::FORMAT_VERSION;
use super::{decode_base64, from_unix_seconds, AuthorityContext, PublicKeySet, TokenRejected};

/// A token whose signature chain verified against a published root key.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub biscuit: Biscuit,
    pub key_id: u32,
    pub agent: String,
    pub session: String,
    pub expires_at: SystemTime,
    /// One per block, hex; revoking any of them revokes this token and its descendants.
    pub revocation_ids: Vec<String>,
    /// The authority block's use budget: calls allowed in all, shared by attenuated copies.
    pub use_budget: Option<u64>,
}

/// Reads the expiry from the (unverified) authority context. Cheap: two protobuf decodes.
pub fn peek_expiry(bytes: &[u8]) -> Result<SystemTime, TokenRejected> {
    let container = schema::Biscuit::decode(bytes).map_err(|_| TokenRejected::Malformed)?;
    let authority = schema::Block::decode(container.authority.block.as_slice())
        .map_err(|_| TokenRejected::Malformed)?;
    let context = parse_context(authority.context.as_deref())?;
    Ok(from_unix_seconds(context.exp))
}

pub fn verify(
    token: &str,
    keys: &PublicKeySet,
    max_bytes: usize,
    now: SystemTime,
) -> Result<VerifiedToken, TokenRejected> {
    if token.len() > max_bytes {
        return Err(TokenRejected::TooLarge { max: max_bytes });
    }
    let bytes = decode_base64(token)?;
    if peek_expiry(&bytes)? <= now {
        return Err(TokenRejected::Expired);
    }
    verify_bytes(&bytes, keys, now)
}

pub(crate) fn verify_bytes(
    bytes: &[u8],
    keys: &PublicKeySet,
    now: SystemTime,
) -> Result<VerifiedToken, TokenRejected> {
    // biscuit's key provider can only answer with its own error type; keep ours aside.
    let key_failure: Cell<Option<TokenRejected>> = Cell::new(None);
    let provider = |id: Option<u32>| {
        keys.lookup(id, now).map_err(|rejected| {
            key_failure.set(Some(rejected));
            biscuit_auth::error::Format::UnknownPublicKey
        })
    };
    let biscuit = Biscuit::from(bytes, provider).map_err(|e| {
        if let Some(rejected) = key_failure.take() {
            return rejected;
        }
        match e {
            biscuit_auth::error::Token::Format(
                biscuit_auth::error::Format::Signature(_)
                | biscuit_auth::error::Format::SealedSignature,
            ) => TokenRejected::BadSignature,
            _ => TokenRejected::Malformed,
        }
    })?;
    let key_id = biscuit.root_key_id().ok_or(TokenRejected::MissingKeyId)?;
    let contexts = biscuit.context();
    let context = parse_context(contexts.first().and_then(|c| c.as_deref()))?;
    let expires_at = from_unix_seconds(context.exp);
    if expires_at <= now {
        return Err(TokenRejected::Expired);
    }
    Ok(VerifiedToken {
        revocation_ids: biscuit
            .revocation_identifiers()
            .iter()
            .map(hex::encode)
            .collect(),
        biscuit,
        key_id,
        use_budget: context.uses,
        agent: context.agent,
        session: context.session,
        expires_at,
    })
}

fn parse_context(context: Option<&str>) -> Result<AuthorityContext, TokenRejected> {
    let context: AuthorityContext = context
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or(TokenRejected::Malformed)?;
    if context.capgate != FORMAT_VERSION {
        return Err(TokenRejected::Malformed);
    }
    Ok(context)
}
