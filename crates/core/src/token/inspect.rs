//! Human-readable view of a token: blocks, facts, checks, expiry, key id, revocation ids.
//! Inspection never decides anything; it says whether the signature was checked.

use std::fmt;
use std::time::SystemTime;

use biscuit_auth::UnverifiedBiscuit;
use serde::Serialize;

use super::verify::{peek_expiry, verify_bytes};
use super::{decode_base64, rfc3339, PublicKeySet, TokenRejected};

#[derive(Debug, Clone, Serialize)]
pub struct BlockView {
    pub index: usize,
    /// Datalog source: facts, rules and checks of the block.
    pub source: String,
    /// Public key of a third-party block's signer.
    pub external_key: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub root_key_id: Option<u32>,
    pub agent: Option<String>,
    pub session: Option<String>,
    pub expires_at: String,
    pub expired: bool,
    pub revocation_ids: Vec<String>,
    /// "verified with key N", "not checked (no keys given)" or the rejection.
    pub signature: String,
    pub blocks: Vec<BlockView>,
}

/// Fails on what is not a Capgate token at all (no readable, in-range authority context), as
/// the guard would; a bad signature is shown, not failed on.
pub fn inspect(token: &str, keys: Option<&PublicKeySet>) -> Result<Inspection, TokenRejected> {
    let bytes = decode_base64(token)?;
    let unverified = UnverifiedBiscuit::from(&bytes).map_err(|_| TokenRejected::Malformed)?;
    let now = SystemTime::now();
    let expiry = peek_expiry(&bytes)?;
    let external_keys = unverified.external_public_keys();
    let mut blocks = Vec::new();
    for index in 0..unverified.block_count() {
        let source = unverified
            .print_block_source(index)
            .map_err(|_| TokenRejected::Malformed)?;
        blocks.push(BlockView {
            index,
            source,
            external_key: external_keys
                .get(index)
                .and_then(|k| k.as_ref())
                .map(|k| k.to_string()),
        });
    }
    let (signature, agent, session) = match keys {
        None => ("not checked (no keys given)".to_owned(), None, None),
        Some(keys) => match verify_bytes(&bytes, keys, now) {
            Ok(verified) => (
                format!("verified with root key {}", verified.key_id),
                Some(verified.agent),
                Some(verified.session),
            ),
            Err(rejected) => (format!("REJECTED: {rejected}"), None, None),
        },
    };
    Ok(Inspection {
        root_key_id: unverified.root_key_id(),
        agent,
        session,
        expires_at: rfc3339(expiry),
        expired: expiry <= now,
        revocation_ids: unverified
            .revocation_identifiers()
            .iter()
            .map(hex::encode)
            .collect(),
        signature,
        blocks,
    })
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unknown = "?".to_owned();
        writeln!(
            f,
            "root key id: {}",
            self.root_key_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| "none".into())
        )?;
        writeln!(f, "signature:   {}", self.signature)?;
        writeln!(
            f,
            "agent:       {}",
            self.agent.as_ref().unwrap_or(&unknown)
        )?;
        writeln!(
            f,
            "session:     {}",
            self.session.as_ref().unwrap_or(&unknown)
        )?;
        writeln!(
            f,
            "expires at:  {}{}",
            self.expires_at,
            if self.expired { " (EXPIRED)" } else { "" }
        )?;
        for block in &self.blocks {
            let label = if block.index == 0 {
                "authority".to_owned()
            } else {
                format!("block {}", block.index)
            };
            writeln!(f)?;
            match &block.external_key {
                Some(key) => writeln!(f, "── {label} (third party, signed by {key}) ──")?,
                None => writeln!(f, "── {label} ──")?,
            }
            if let Some(id) = self.revocation_ids.get(block.index) {
                writeln!(f, "revocation id: {id}")?;
            }
            writeln!(f, "{}", block.source.trim_end())?;
        }
        Ok(())
    }
}
