//! What the audit trail keeps of a token: each block's Datalog with which block is which
//! (authority, attenuation, third party and its signing key), the revocation ids and a
//! SHA-256 of the token text. Enough to replay a decision and to recognise the token, never
//! enough to present it: a record holding the token itself would let anyone who reads the
//! trail replay it while it lives.
//!
//! `rebuild` turns a record back into a token that biscuit's authorizer evaluates with the
//! same block scoping: the blocks are re-signed by throwaway keys made for the replay, and
//! every `trusting <key>` that named an original third-party key is rewritten to name its
//! throwaway stand-in. The rebuilt token verifies under no real key.

use std::collections::HashMap;

use biscuit_auth::builder::{BlockBuilder, Rule, Scope};
use biscuit_auth::{Biscuit, KeyPair, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    Authority,
    Attenuation,
    /// Signed by an external key (the broker's approval key for approval blocks).
    ThirdParty,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockRecord {
    pub kind: BlockKind,
    /// The block's Datalog as biscuit prints it.
    pub source: String,
    /// For a third-party block, the key that signed it (`ed25519/…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_key: Option<String>,
}

/// The SHA-256 of the token text as presented, hex: identifies it without holding it.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Every block of a verified token, in order. `None` if biscuit cannot print one (then the
/// record keeps the digest only, and a replay skips it).
pub fn blocks_of(biscuit: &Biscuit) -> Option<Vec<BlockRecord>> {
    (0..biscuit.block_count())
        .map(|index| {
            let source = biscuit.print_block_source(index).ok()?;
            let external = biscuit.block_external_key(index).ok()?;
            let kind = match (index, external) {
                (0, _) => BlockKind::Authority,
                (_, Some(_)) => BlockKind::ThirdParty,
                (_, None) => BlockKind::Attenuation,
            };
            Some(BlockRecord {
                kind,
                source,
                external_key: external.map(|k| k.to_string()),
            })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebuildError {
    #[error("a token record without blocks")]
    Empty,
    #[error("block {index} is {kind:?}, where only the first block is the authority block")]
    Misplaced { index: usize, kind: BlockKind },
    #[error("block {index} cannot be parsed: {why}")]
    Source { index: usize, why: String },
    #[error("block {index} names no usable signing key: {why}")]
    ExternalKey { index: usize, why: String },
    #[error("the token cannot be rebuilt: {0}")]
    Biscuit(String),
}

/// The original third-party keys of a record, in the form `trusting` clauses print them.
pub fn external_keys(blocks: &[BlockRecord]) -> Vec<String> {
    blocks
        .iter()
        .filter_map(|b| b.external_key.clone())
        .collect()
}

/// Rebuilds a token with the recorded blocks, their order and their scoping.
pub fn rebuild(blocks: &[BlockRecord]) -> Result<Biscuit, RebuildError> {
    let first = blocks.first().ok_or(RebuildError::Empty)?;
    if first.kind != BlockKind::Authority {
        return Err(RebuildError::Misplaced {
            index: 0,
            kind: first.kind,
        });
    }
    // One stand-in per distinct original signer, so "trusting K" still means one signer.
    let mut stand_ins: HashMap<PublicKey, KeyPair> = HashMap::new();
    for (index, block) in blocks.iter().enumerate() {
        if let Some(key) = &block.external_key {
            let original: PublicKey = key.parse().map_err(|e| RebuildError::ExternalKey {
                index,
                why: format!("{e}"),
            })?;
            stand_ins.entry(original).or_default();
        }
    }
    let substitutes: HashMap<PublicKey, PublicKey> = stand_ins
        .iter()
        .map(|(original, pair)| (*original, pair.public()))
        .collect();
    let biscuit_error = |e: biscuit_auth::error::Token| RebuildError::Biscuit(e.to_string());
    let authority = parse(0, &first.source, &substitutes)?;
    let mut token = Biscuit::builder()
        .merge(authority)
        .build(&KeyPair::new())
        .map_err(biscuit_error)?;
    for (index, block) in blocks.iter().enumerate().skip(1) {
        let builder = parse(index, &block.source, &substitutes)?;
        token = match (block.kind, &block.external_key) {
            (BlockKind::Attenuation, None) => token.append(builder).map_err(biscuit_error)?,
            (BlockKind::ThirdParty, Some(key)) => {
                let signer = key
                    .parse::<PublicKey>()
                    .ok()
                    .and_then(|original| stand_ins.get(&original))
                    .ok_or_else(|| RebuildError::ExternalKey {
                        index,
                        why: "no stand-in key".into(),
                    })?;
                let signed = token
                    .third_party_request()
                    .and_then(|request| request.create_block(&signer.private(), builder))
                    .map_err(biscuit_error)?;
                token
                    .append_third_party(signer.public(), signed)
                    .map_err(biscuit_error)?
            }
            (kind, _) => return Err(RebuildError::Misplaced { index, kind }),
        };
    }
    Ok(token)
}

/// Parses recorded block source and points its `trusting` clauses at the stand-in keys.
fn parse(
    index: usize,
    source: &str,
    substitutes: &HashMap<PublicKey, PublicKey>,
) -> Result<BlockBuilder, RebuildError> {
    #[allow(
        clippy::disallowed_methods,
        reason = "block source printed by biscuit from a verified token, read back from the \
                  operator-only trail for an offline replay; no request data is formatted in"
    )]
    let mut block = BlockBuilder::new()
        .code(source)
        .map_err(|e| RebuildError::Source {
            index,
            why: e.to_string(),
        })?;
    substitute(&mut block.scopes, substitutes);
    for rule in &mut block.rules {
        substitute_rule(rule, substitutes);
    }
    for check in &mut block.checks {
        for query in &mut check.queries {
            substitute_rule(query, substitutes);
        }
    }
    Ok(block)
}

fn substitute_rule(rule: &mut Rule, substitutes: &HashMap<PublicKey, PublicKey>) {
    substitute(&mut rule.scopes, substitutes);
}

fn substitute(scopes: &mut [Scope], substitutes: &HashMap<PublicKey, PublicKey>) {
    for scope in scopes {
        if let Scope::PublicKey(key) = scope {
            if let Some(stand_in) = substitutes.get(key) {
                *key = *stand_in;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use biscuit_auth::builder::{fact, string};

    /// A token with an authority block, an attenuation block trusting a third party, and a
    /// block signed by that third party: the rebuilt token gives the same answers.
    #[test]
    fn a_rebuilt_token_keeps_block_scoping() {
        let root = KeyPair::new();
        let approver = KeyPair::new();
        let authority = BlockBuilder::new()
            .fact(fact("right", &[string("r")]))
            .expect("fact");
        let token = Biscuit::builder()
            .merge(authority)
            .build(&root)
            .expect("token");
        let mut params = HashMap::new();
        params.insert("approver".to_owned(), approver.public());
        let attenuation = BlockBuilder::new()
            .code_with_params(
                "check if approved(\"r\") trusting {approver};",
                HashMap::new(),
                params,
            )
            .expect("attenuation");
        let token = token.append(attenuation).expect("append");
        let approval = BlockBuilder::new()
            .fact(fact("approved", &[string("r")]))
            .expect("fact");
        let signed = token
            .third_party_request()
            .expect("request")
            .create_block(&approver.private(), approval)
            .expect("signed");
        let token = token
            .append_third_party(approver.public(), signed)
            .expect("third party");
        let blocks = blocks_of(&token).expect("blocks");
        assert_eq!(
            blocks.iter().map(|b| b.kind).collect::<Vec<_>>(),
            [
                BlockKind::Authority,
                BlockKind::Attenuation,
                BlockKind::ThirdParty
            ]
        );
        let rebuilt = rebuild(&blocks).expect("rebuild");
        let authorize = |token: &Biscuit, code: &str| {
            #[allow(clippy::disallowed_methods, reason = "fixed test policy")]
            let builder = biscuit_auth::AuthorizerBuilder::new().code(code);
            builder
                .and_then(|b| b.build(token))
                .and_then(|mut a| a.authorize())
                .is_ok()
        };
        for code in [
            "allow if right(\"r\");",
            // The third-party fact is invisible to the authorizer's default scope...
            "allow if approved(\"r\");",
        ] {
            assert_eq!(authorize(&token, code), authorize(&rebuilt, code), "{code}");
        }
        assert!(authorize(&rebuilt, "allow if right(\"r\");"));
        assert!(!authorize(&rebuilt, "allow if approved(\"r\");"));
        // ...and a third-party block signed by someone else fails the attenuation's check.
        let mut forged = blocks.clone();
        forged[2].external_key = Some(KeyPair::new().public().to_string());
        let forged = rebuild(&forged).expect("rebuild");
        assert!(!authorize(&forged, "allow if right(\"r\");"));
        // The record never holds anything that verifies as the token.
        let text = serde_json::to_string(&blocks).expect("json");
        let encoded = crate::token::encode(&token).expect("encode");
        assert!(!text.contains(&encoded[..32]));
    }
}
