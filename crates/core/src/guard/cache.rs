//! Verified-token cache: signature checks dominate a biscuit authorisation, so a token whose
//! signature chain verified is remembered, keyed by its text, until it expires. Verification
//! accepts only a token's one canonical spelling, so only that spelling is ever an entry and
//! no re-encoding of a cached token can be found under its own key.
//! Only the signature work is skipped: expiry, key validity, revocation and the
//! request-dependent Datalog still run on every call.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::token::VerifiedToken;

pub struct VerifiedCache {
    entries: RwLock<HashMap<Box<str>, Arc<VerifiedToken>>>,
    capacity: usize,
}

impl VerifiedCache {
    pub fn new(capacity: usize) -> Self {
        VerifiedCache {
            entries: RwLock::new(HashMap::new()),
            capacity,
        }
    }

    /// The cached verification of exactly this token, if it has not expired.
    pub fn get(&self, token: &str, now: SystemTime) -> Option<Arc<VerifiedToken>> {
        let entries = self.entries.read().ok()?;
        entries
            .get(token)
            .filter(|verified| verified.expires_at > now)
            .cloned()
    }

    pub fn insert(&self, token: &str, verified: Arc<VerifiedToken>, now: SystemTime) {
        if self.capacity == 0 {
            return;
        }
        let Ok(mut entries) = self.entries.write() else {
            return;
        };
        if entries.len() >= self.capacity {
            entries.retain(|_, v| v.expires_at > now);
        }
        // Still full of live tokens: skip caching rather than evict at random; only speed is lost.
        if entries.len() < self.capacity {
            entries.insert(token.into(), verified);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.read().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
