//! The local revocation view every guard consults: a set of revoked token ids, sessions and
//! agents, fed in the background from the broker's feed (or the store), never fetched on the
//! request path. A view that has not been refreshed within its bound is a deny.

use std::collections::HashSet;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::store::{Revocation, RevocationKind};
use crate::token::VerifiedToken;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationDenial {
    #[error("revocation view has never been synchronised")]
    NeverSynced,
    #[error("revocation view is {age_ms} ms old (bound {bound_ms} ms)")]
    Stale { age_ms: u128, bound_ms: u128 },
    #[error("token revoked ({})", .0.as_str())]
    Revoked(RevocationKind),
}

#[derive(Default)]
struct ViewState {
    tokens: HashSet<String>,
    sessions: HashSet<String>,
    agents: HashSet<String>,
    cursor: u64,
    fresh_as_of: Option<Instant>,
}

#[derive(Default)]
pub struct RevocationView {
    state: RwLock<ViewState>,
}

impl RevocationView {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds feed entries and records that the view reflects the source as of `fresh_as_of`
    /// (the moment the request that fetched them was sent, so the bound stays conservative).
    pub fn apply(&self, entries: &[Revocation], fresh_as_of: Instant) {
        let Ok(mut state) = self.state.write() else {
            return; // a poisoned view never becomes fresh again, so it keeps denying
        };
        for entry in entries {
            let set = match entry.kind {
                RevocationKind::Token => &mut state.tokens,
                RevocationKind::Session => &mut state.sessions,
                RevocationKind::Agent => &mut state.agents,
            };
            set.insert(entry.value.clone());
            state.cursor = state.cursor.max(entry.cursor);
        }
        if state.fresh_as_of.is_none_or(|t| t < fresh_as_of) {
            state.fresh_as_of = Some(fresh_as_of);
        }
    }

    pub fn cursor(&self) -> u64 {
        self.state.read().map(|s| s.cursor).unwrap_or(0)
    }

    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.state
            .read()
            .ok()
            .and_then(|s| s.fresh_as_of)
            .map(|t| now.saturating_duration_since(t))
    }

    pub fn check(
        &self,
        token: &VerifiedToken,
        bound: Duration,
        now: Instant,
    ) -> Result<(), RevocationDenial> {
        let state = self
            .state
            .read()
            .map_err(|_| RevocationDenial::NeverSynced)?;
        let fresh = state.fresh_as_of.ok_or(RevocationDenial::NeverSynced)?;
        let age = now.saturating_duration_since(fresh);
        if age > bound {
            return Err(RevocationDenial::Stale {
                age_ms: age.as_millis(),
                bound_ms: bound.as_millis(),
            });
        }
        if state.agents.contains(&token.agent) {
            return Err(RevocationDenial::Revoked(RevocationKind::Agent));
        }
        if state.sessions.contains(&token.session) {
            return Err(RevocationDenial::Revoked(RevocationKind::Session));
        }
        if token
            .revocation_ids
            .iter()
            .any(|id| state.tokens.contains(id))
        {
            return Err(RevocationDenial::Revoked(RevocationKind::Token));
        }
        Ok(())
    }
}
