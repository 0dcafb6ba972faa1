//! Minting: turns a granted set of rights into a signed authority block. Only the broker calls
//! this; tests and examples go through the same function so they mint real tokens.

use std::collections::HashMap;
use std::time::SystemTime;

use biscuit_auth::builder::{date, fact, int, string, BlockBuilder, Term};
use biscuit_auth::{Biscuit, KeyPair};

use super::{unix_seconds, AuthorityContext, FORMAT_VERSION, MAX_UNIX_SECONDS};
use crate::scope::{ResourcePattern, Verb};

/// One right as it goes into the token: the environment comes from configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GrantedRight {
    pub resource: ResourcePattern,
    pub verb: Verb,
    pub environment: String,
}

#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub agent: String,
    pub session_id: String,
    pub rights: Vec<GrantedRight>,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    /// Most rows one write may change (PostgreSQL adapter); from the grant policy.
    pub row_budget: Option<u64>,
    /// Calls allowed in all (one-shot = 1), counted across adapters.
    pub use_budget: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("cannot build token: {0}")]
    Biscuit(#[from] biscuit_auth::error::Token),
    #[error("cannot encode token summary: {0}")]
    Context(#[from] serde_json::Error),
    #[error("expiry is after 9999-12-31T23:59:59Z, which no verifier accepts")]
    ExpiryOutOfRange,
}

/// Every value enters the block as a typed term, never through formatted Datalog source.
pub fn mint(spec: &TokenSpec, key_id: u32, key: &KeyPair) -> Result<Biscuit, MintError> {
    if unix_seconds(spec.expires_at) > MAX_UNIX_SECONDS {
        return Err(MintError::ExpiryOutOfRange);
    }
    let mut block = BlockBuilder::new()
        .fact(fact("agent", &[string(&spec.agent)]))?
        .fact(fact("session", &[string(&spec.session_id)]))?
        .fact(fact("issued_at", &[date(&spec.issued_at)]))?
        .fact(fact("expires_at", &[date(&spec.expires_at)]))?;
    for right in &spec.rights {
        block = block.fact(fact(
            "right",
            &[
                string(right.resource.as_str()),
                string(right.verb.as_str()),
                string(&right.environment),
            ],
        ))?;
    }
    if let Some(uses) = spec.use_budget {
        block = block.fact(fact(
            "use_budget",
            &[int(i64::try_from(uses).unwrap_or(i64::MAX))],
        ))?;
    }
    if let Some(budget) = spec.row_budget {
        block = block.fact(fact(
            "row_budget",
            &[int(i64::try_from(budget).unwrap_or(i64::MAX))],
        ))?;
    }
    let params = HashMap::from([("expiry".to_owned(), date(&spec.expires_at))]);
    block = block.code_with_params(
        "check if time($time), $time <= {expiry};",
        params,
        HashMap::new(),
    )?;
    let context = AuthorityContext {
        capgate: FORMAT_VERSION,
        agent: spec.agent.clone(),
        session: spec.session_id.clone(),
        exp: unix_seconds(spec.expires_at),
        uses: spec.use_budget,
    };
    let block = block.context(serde_json::to_string(&context)?);
    let token = Biscuit::builder()
        .merge(block)
        .root_key_id(key_id)
        .build(key)?;
    Ok(token)
}

/// A term for a set of strings (verbs in attenuation checks).
pub(crate) fn string_set<'a>(items: impl IntoIterator<Item = &'a str>) -> Term {
    Term::Set(items.into_iter().map(string).collect())
}
