//! Offline attenuation: any holder can append a block that narrows resource, verb or lifetime.
//!
//! Appended blocks can only add checks that must also pass. Facts they state (a forged
//! `right(..)`, say) are invisible to the adapters' policies, which trust only the authority
//! block and themselves, so a block can never widen a token.

use std::collections::HashMap;
use std::time::SystemTime;

use biscuit_auth::builder::{date, string, BlockBuilder, Term};
use biscuit_auth::UnverifiedBiscuit;

use super::mint::string_set;
use super::{decode_base64, TokenRejected, BASE64};
use crate::scope::{ResourcePattern, Verb};
use base64::Engine;

#[derive(Debug, Clone, Default)]
pub struct Attenuation {
    /// Only this resource, or only resources under this prefix.
    pub resource: Option<ResourcePattern>,
    /// Only these verbs (empty: no verb restriction).
    pub verbs: Vec<Verb>,
    /// No use after this instant.
    pub expires_at: Option<SystemTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum AttenuateError {
    #[error("nothing to narrow: give a resource, a verb or a TTL")]
    NothingToNarrow,
    #[error(transparent)]
    Token(#[from] TokenRejected),
    #[error("cannot append block: {0}")]
    Biscuit(#[from] biscuit_auth::error::Token),
}

/// Returns the attenuated token in base64. Needs no key: the holder may not have one.
pub fn attenuate(token: &str, narrowing: &Attenuation) -> Result<String, AttenuateError> {
    if narrowing.resource.is_none() && narrowing.verbs.is_empty() && narrowing.expires_at.is_none()
    {
        return Err(AttenuateError::NothingToNarrow);
    }
    let bytes = decode_base64(token)?;
    let unverified = UnverifiedBiscuit::from(&bytes).map_err(|_| TokenRejected::Malformed)?;
    let block = narrowing_block(narrowing)?;
    let attenuated = unverified.append(block)?;
    Ok(BASE64.encode(attenuated.to_vec()?))
}

fn narrowing_block(narrowing: &Attenuation) -> Result<BlockBuilder, biscuit_auth::error::Token> {
    let mut block = BlockBuilder::new();
    if let Some(resource) = &narrowing.resource {
        let (source, term) = if resource.is_prefix() {
            (
                "check if resource($resource), $resource.starts_with({prefix});",
                ("prefix", string(resource.as_str())),
            )
        } else {
            (
                "check if resource({resource});",
                ("resource", string(resource.as_str())),
            )
        };
        block = with_params(block, source, [term])?;
    }
    if !narrowing.verbs.is_empty() {
        let verbs = string_set(narrowing.verbs.iter().map(|v| v.as_str()));
        block = with_params(
            block,
            "check if verb($verb), {verbs}.contains($verb);",
            [("verbs", verbs)],
        )?;
    }
    if let Some(expiry) = narrowing.expires_at {
        block = with_params(
            block,
            "check if time($time), $time <= {expiry};",
            [("expiry", date(&expiry))],
        )?;
    }
    Ok(block)
}

fn with_params<const N: usize>(
    block: BlockBuilder,
    source: &str,
    params: [(&str, Term); N],
) -> Result<BlockBuilder, biscuit_auth::error::Token> {
    let params: HashMap<String, Term> = params
        .into_iter()
        .map(|(name, term)| (name.to_owned(), term))
        .collect();
    block.code_with_params(source, params, HashMap::new())
}
