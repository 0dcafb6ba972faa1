//! The local revocation view every guard consults: a set of revoked token ids, sessions and
//! agents, fed in the background from the broker's feed (or the store), never fetched on the
//! request path. A view that has not been refreshed within its bound is a deny.
//!
//! The feed names the store's generation and newest cursor. A view that sees the generation
//! change, or the cursor fall behind its own, knows the store lost entries it holds or will
//! never send entries it lacks: it drops everything, reads the feed again from the start and
//! denies every token (`FeedReset`) until it has caught up.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::token::VerifiedToken;

/// How old an adapter's revocation view may grow before it denies everything, unless the
/// adapter's configuration says otherwise; the broker's health reports staleness against it.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// A biscuit revocation id: that token and everything attenuated from it.
    Token,
    /// Every token of one issuance session.
    Session,
    /// Every token of an agent, and no new ones (kill switch).
    Agent,
}

impl RevocationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::Token => "token",
            RevocationKind::Session => "session",
            RevocationKind::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "token" => Some(RevocationKind::Token),
            "session" => Some(RevocationKind::Session),
            "agent" => Some(RevocationKind::Agent),
            _ => None,
        }
    }
}

/// One entry of the revocation feed; `cursor` is strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub cursor: u64,
    pub kind: RevocationKind,
    pub value: String,
    pub reason: String,
    pub revoked_by: String,
    pub revoked_at: u64,
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationDenial {
    #[error("revocation view has never been synchronised")]
    NeverSynced,
    #[error("revocation view is {age_ms} ms old (bound {bound_ms} ms)")]
    Stale { age_ms: u128, bound_ms: u128 },
    #[error("token revoked ({})", .0.as_str())]
    Revoked(RevocationKind),
    #[error("the revocation feed was reset (store lost or replaced); resynchronising")]
    FeedReset,
}

/// What a feed page did to the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedApplied {
    /// Applied; the view follows the feed.
    Applied,
    /// The store is not the one the view followed: dropped, to be read again from cursor 0.
    Reset,
}

#[derive(Default)]
struct ViewState {
    tokens: HashSet<String>,
    sessions: HashSet<String>,
    agents: HashSet<String>,
    cursor: u64,
    fresh_as_of: Option<Instant>,
    /// The store generation the entries came from.
    generation: Option<String>,
    /// Dropped and not yet caught up again: every check denies.
    resetting: bool,
}

#[derive(Default)]
pub struct RevocationView {
    state: RwLock<ViewState>,
    /// Times the view was dropped to be read again, for `/metrics`.
    resyncs: AtomicU64,
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

    /// Applies one page of the broker's feed: entries after this view's cursor, the store's
    /// `generation` and its newest cursor `head`.
    pub fn apply_feed(
        &self,
        generation: &str,
        head: u64,
        entries: &[Revocation],
        fresh_as_of: Instant,
    ) -> FeedApplied {
        {
            let Ok(mut state) = self.state.write() else {
                return FeedApplied::Reset;
            };
            let other_store = state.generation.as_deref().is_some_and(|g| g != generation);
            if other_store || head < state.cursor {
                tracing::warn!(
                    old = ?state.generation, new = generation, head, cursor = state.cursor,
                    "revocation feed reset: dropping the view and reading it again"
                );
                self.resyncs.fetch_add(1, Ordering::Relaxed);
                *state = ViewState {
                    generation: Some(generation.to_owned()),
                    resetting: true,
                    fresh_as_of: state.fresh_as_of,
                    ..ViewState::default()
                };
                return FeedApplied::Reset;
            }
            state.generation = Some(generation.to_owned());
        }
        self.apply(entries, fresh_as_of);
        if let Ok(mut state) = self.state.write() {
            if state.resetting && state.cursor >= head {
                state.resetting = false;
            }
        }
        FeedApplied::Applied
    }

    /// The broker says its store is lost: drop everything and deny until the feed answers
    /// again and the view has caught up.
    pub fn reset(&self) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut state) = self.state.write() {
            *state = ViewState {
                resetting: true,
                fresh_as_of: state.fresh_as_of,
                ..ViewState::default()
            };
        }
    }

    /// Times the view was dropped and read again from the start.
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// Every revoked (kind, value) the view holds, e.g. to write back into a new store.
    pub fn entries(&self) -> Vec<(RevocationKind, String)> {
        let Ok(state) = self.state.read() else {
            return Vec::new();
        };
        let of = |kind: RevocationKind, set: &HashSet<String>| {
            set.iter()
                .map(move |v| (kind, v.clone()))
                .collect::<Vec<_>>()
        };
        let mut all = of(RevocationKind::Agent, &state.agents);
        all.extend(of(RevocationKind::Session, &state.sessions));
        all.extend(of(RevocationKind::Token, &state.tokens));
        all
    }

    /// Keeps what the view holds but follows a new store from its first cursor.
    pub fn restart_cursor(&self) {
        if let Ok(mut state) = self.state.write() {
            state.cursor = 0;
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
        if state.resetting {
            return Err(RevocationDenial::FeedReset);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cursor: u64, value: &str) -> Revocation {
        Revocation {
            cursor,
            kind: RevocationKind::Session,
            value: value.into(),
            reason: String::new(),
            revoked_by: "alice".into(),
            revoked_at: 0,
            expires_at: None,
        }
    }

    fn denial(view: &RevocationView, session: &str) -> Option<RevocationDenial> {
        let state = view.state.read().expect("state");
        if state.resetting {
            return Some(RevocationDenial::FeedReset);
        }
        state
            .sessions
            .contains(session)
            .then_some(RevocationDenial::Revoked(RevocationKind::Session))
    }

    /// A new generation, or a head below the view's cursor, drops the view and denies until
    /// a page from cursor 0 has caught up with the head again.
    #[test]
    fn a_store_that_lost_entries_resets_the_view_until_it_has_caught_up() {
        let view = RevocationView::new();
        let now = Instant::now();
        assert_eq!(
            view.apply_feed("g1", 2, &[entry(1, "a"), entry(2, "b")], now),
            FeedApplied::Applied
        );
        assert_eq!(view.cursor(), 2);
        assert_eq!(
            denial(&view, "a"),
            Some(RevocationDenial::Revoked(RevocationKind::Session))
        );

        // Same generation, but the store's newest cursor is behind ours: entries were lost.
        assert_eq!(view.apply_feed("g1", 1, &[], now), FeedApplied::Reset);
        assert_eq!(view.cursor(), 0);
        assert_eq!(denial(&view, "x"), Some(RevocationDenial::FeedReset));
        // Caught up again from 0: serves once more, with only what the store now says.
        assert_eq!(
            view.apply_feed("g1", 1, &[entry(1, "c")], now),
            FeedApplied::Applied
        );
        assert_eq!(
            denial(&view, "c"),
            Some(RevocationDenial::Revoked(RevocationKind::Session))
        );
        assert_eq!(denial(&view, "x"), None);

        // Another generation: dropped, and a partial first page keeps it denying.
        assert_eq!(view.apply_feed("g2", 5, &[], now), FeedApplied::Reset);
        assert_eq!(
            view.apply_feed("g2", 5, &[entry(1, "d")], now),
            FeedApplied::Applied
        );
        assert_eq!(denial(&view, "x"), Some(RevocationDenial::FeedReset));
        assert_eq!(
            view.apply_feed("g2", 5, &[entry(4, "e"), entry(5, "f")], now),
            FeedApplied::Applied
        );
        assert_eq!(denial(&view, "x"), None);
        assert_eq!(denial(&view, "c"), None, "the old store's entries are gone");

        // The broker says its store is lost: deny everything until the feed answers again.
        view.reset();
        assert_eq!(denial(&view, "x"), Some(RevocationDenial::FeedReset));
        assert_eq!(view.apply_feed("g3", 0, &[], now), FeedApplied::Applied);
        assert_eq!(denial(&view, "x"), None);
    }
}
