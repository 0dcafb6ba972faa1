//! Verification: size, expiry, root key and signature, cheapest first, then canonical form.
//!
//! The expiry peek reads the authority context before any signature work so that replays of
//! old tokens cost almost nothing; the peeked value is never trusted for an allow: the signed
//! context is read again after verification, and the signed `time` check runs in Datalog.

use std::cell::Cell;
use std::time::SystemTime;

use biscuit_auth::format::schema;
use biscuit_auth::Biscuit;
use prost::Message;

use super::{decode_base64, from_unix_seconds, AuthorityContext, PublicKeySet, TokenRejected};
use super::{FORMAT_VERSION, MAX_UNIX_SECONDS};

/// A token whose signature chain verified against a published root key. Only [`verify`] makes
/// one; outside the core its fields cannot be read or set, so no adapter can pass off an
/// unverified token as verified.
///
/// ```compile_fail,E0451
/// let forged = capgate_core::token::VerifiedToken {
///     biscuit: unimplemented!(),
///     key_id: 0,
///     agent: "deploy-bot".into(),
///     session: String::new(),
///     expires_at: std::time::SystemTime::now(),
///     revocation_ids: Vec::new(),
///     use_budget: None,
///     profile: unimplemented!(),
///     audit_memo: Default::default(),
/// };
/// ```
///
/// ```compile_fail,E0616
/// fn widen(token: &mut capgate_core::token::VerifiedToken) {
///     token.agent = "someone-else".into();
/// }
/// ```
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub(crate) biscuit: Biscuit,
    pub(crate) key_id: u32,
    pub(crate) agent: String,
    pub(crate) session: String,
    pub(crate) expires_at: SystemTime,
    /// One per block, hex; revoking any of them revokes this token and its descendants.
    pub(crate) revocation_ids: Vec<String>,
    /// The authority block's use budget: calls allowed in all, shared by attenuated copies.
    pub(crate) use_budget: Option<u64>,
    /// What the token's Datalog can depend on (its dates, whether it reads attributes).
    pub(crate) profile: super::DatalogProfile,
    /// What every audit record of this token repeats, computed on first use: hashing the text
    /// and printing the blocks cost more than a cached decision.
    pub(crate) audit_memo: std::sync::OnceLock<AuditMemo>,
}

/// What adapters and the broker may know of a verified token. The fields stay private so that
/// only verification (in this crate) makes one, and adapters ask questions instead of reading
/// the token's Datalog themselves.
impl VerifiedToken {
    pub fn biscuit(&self) -> &Biscuit {
        &self.biscuit
    }

    /// The root key that signed it.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The issuance session it (and every token attenuated from it) belongs to.
    pub fn session(&self) -> &str {
        &self.session
    }

    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// One per block, hex; revoking any of them revokes this token and its descendants.
    pub fn revocation_ids(&self) -> &[String] {
        &self.revocation_ids
    }

    /// The authority block's use budget: calls allowed in all, shared by attenuated copies.
    pub fn use_budget(&self) -> Option<u64> {
        self.use_budget
    }

    /// The `right(resource, verb, environment)` facts of the authority block: what the broker
    /// granted, before any attenuation narrowed it. Unreadable facts are left out (a right this
    /// cannot read is one an adapter cannot offer; the guard still decides every call).
    pub fn granted_rights(&self) -> Vec<super::GrantedRight> {
        let facts: Vec<(String, String, String)> = self
            .authority_query("right_of($r, $v, $e) <- right($r, $v, $e)")
            .unwrap_or_default();
        facts
            .into_iter()
            .filter_map(|(resource, verb, environment)| {
                Some(super::GrantedRight {
                    resource: crate::scope::ResourcePattern::parse(&resource).ok()?,
                    verb: verb.parse().ok()?,
                    environment,
                })
            })
            .collect()
    }

    /// Does any granted right whose verb satisfies `verb` reach into `root` (cover it, equal
    /// it, or name something inside it)? Unparseable verbs count as `admin`: doubt widens.
    pub fn grants_within(&self, root: &str, verb: impl Fn(crate::scope::Verb) -> bool) -> bool {
        let facts: Vec<(String, String)> = self
            .authority_query("data($r, $v) <- right($r, $v, $e)")
            .unwrap_or_default();
        let inside = format!("{root}/");
        facts.iter().any(|(resource, v)| {
            verb(v.parse().unwrap_or(crate::scope::Verb::Admin))
                && (resource.starts_with(&inside)
                    || resource == root
                    || root.starts_with(resource.as_str()))
        })
    }

    /// The most rows one write may change (`row_budget(n)` in the authority block), if stated.
    pub fn row_budget(&self) -> Option<u64> {
        let budgets: Vec<(i64,)> = self.authority_query("data($n) <- row_budget($n)")?;
        budgets.into_iter().map(|(n,)| n.max(0) as u64).min()
    }

    /// Facts of the authority block, queried without any check or policy.
    fn authority_query<R, E>(&self, rule: &str) -> Option<Vec<R>>
    where
        R: TryFrom<biscuit_auth::builder::Fact, Error = E>,
        E: Into<biscuit_auth::error::Token>,
    {
        let mut authorizer = biscuit_auth::AuthorizerBuilder::new()
            .build(&self.biscuit)
            .ok()?;
        let rule: biscuit_auth::builder::Rule = rule.try_into().ok()?;
        authorizer.query(rule).ok()
    }
}

/// The token as each audit record names it. Verification accepts one spelling per token, so
/// the text (and its digest) is fixed by the verified token.
#[derive(Debug, Clone)]
pub struct AuditMemo {
    pub token_sha256: String,
    pub blocks: Option<serde_json::Value>,
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
    // Signatures cover the blocks, not the container around them: biscuit also accepts
    // re-encodings (unknown fields, padded varints, an out-of-range enum read as its default)
    // of a valid token. Only the bytes that serialising what was verified gives back pass.
    if biscuit.to_vec().ok().as_deref() != Some(bytes) {
        return Err(TokenRejected::Malformed);
    }
    let key_id = biscuit.root_key_id().ok_or(TokenRejected::MissingKeyId)?;
    let contexts = biscuit.context();
    let context = parse_context(contexts.first().and_then(|c| c.as_deref()))?;
    let expires_at = from_unix_seconds(context.exp);
    if expires_at <= now {
        return Err(TokenRejected::Expired);
    }
    Ok(VerifiedToken {
        profile: super::DatalogProfile::of_token(bytes),
        audit_memo: std::sync::OnceLock::new(),
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

/// The authority context, read from unverified bytes by the peek: every value is bounded here,
/// before anything computes with it.
fn parse_context(context: Option<&str>) -> Result<AuthorityContext, TokenRejected> {
    let context: AuthorityContext = context
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or(TokenRejected::Malformed)?;
    if context.capgate != FORMAT_VERSION || context.exp > MAX_UNIX_SECONDS {
        return Err(TokenRejected::Malformed);
    }
    Ok(context)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{inspect, KeySetDocument, PublishedKey, BASE64};
    use base64::Engine;
    use biscuit_auth::builder::{fact, string, BlockBuilder};
    use biscuit_auth::KeyPair;

    const KEY_ID: u32 = 3;

    /// A token whose signed context says `exp`, and the key set that verifies it.
    fn token_expiring_at(exp: u64) -> (String, PublicKeySet) {
        let key = KeyPair::new();
        let context = serde_json::json!({"capgate": 1, "agent": "a", "session": "s", "exp": exp});
        let block = BlockBuilder::new()
            .fact(fact("agent", &[string("a")]))
            .expect("fact")
            .context(context.to_string());
        let biscuit = Biscuit::builder()
            .merge(block)
            .root_key_id(KEY_ID)
            .build(&key)
            .expect("build");
        let keys = PublicKeySet::from_document(&KeySetDocument {
            active_key_id: KEY_ID,
            keys: vec![PublishedKey {
                key_id: KEY_ID,
                algorithm: "ed25519".into(),
                public_key: key.public().to_string(),
                created_at: "2026-01-01T00:00:00Z".into(),
                verify_until: None,
            }],
        })
        .expect("keys");
        (BASE64.encode(biscuit.to_vec().expect("bytes")), keys)
    }

    #[test]
    fn out_of_range_expiries_are_malformed_rather_than_a_panic() {
        let now = SystemTime::now();
        for exp in [u64::MAX, 1 << 63, i64::MAX as u64, 253_402_300_800] {
            let (token, keys) = token_expiring_at(exp);
            let bytes = decode_base64(&token).expect("base64");
            assert_eq!(peek_expiry(&bytes), Err(TokenRejected::Malformed), "{exp}");
            assert_eq!(
                verify(&token, &keys, 16 * 1024, now).err(),
                Some(TokenRejected::Malformed),
                "{exp}"
            );
            assert_eq!(
                verify_bytes(&bytes, &keys, now).err(),
                Some(TokenRejected::Malformed),
                "{exp}"
            );
            assert_eq!(
                inspect(&token, Some(&keys)).err(),
                Some(TokenRejected::Malformed),
                "{exp}"
            );
        }
        // The last second RFC 3339 can print is still a (very long-lived) token.
        let (token, keys) = token_expiring_at(253_402_300_799);
        let verified = verify(&token, &keys, 16 * 1024, now).expect("verifies");
        assert_eq!(
            humantime::format_rfc3339_seconds(verified.expires_at).to_string(),
            "9999-12-31T23:59:59Z"
        );
        let inspection = inspect(&token, Some(&keys)).expect("inspect");
        assert_eq!(inspection.expires_at, "9999-12-31T23:59:59Z");
    }

    /// One spelling per token: every other way to write the same bytes is refused.
    #[test]
    fn only_the_canonical_base64_spelling_decodes() {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for len in 1..=9u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(151) ^ 0xfb).collect();
            let canonical = BASE64.encode(&bytes);
            assert_eq!(decode_base64(&canonical), Ok(bytes.clone()));
            let mut variants = vec![
                format!(" {canonical}"),
                format!("{canonical}\n"),
                format!("{canonical}="),
                canonical.replace('-', "+").replace('_', "/"),
                canonical.trim_end_matches('=').to_owned(),
            ];
            // The last symbol before padding carries unused low bits; setting one keeps the
            // bytes and changes the spelling.
            let data = canonical.trim_end_matches('=');
            if data.len() < canonical.len() {
                let last = data.as_bytes()[data.len() - 1];
                let index = alphabet.iter().position(|c| *c == last).expect("symbol");
                let mut respelled = data[..data.len() - 1].to_owned();
                respelled.push(alphabet[index | 1] as char);
                respelled.push_str(&canonical[data.len()..]);
                variants.push(respelled);
            }
            for variant in variants.into_iter().filter(|v| *v != canonical) {
                assert_eq!(
                    decode_base64(&variant),
                    Err(TokenRejected::Malformed),
                    "{variant:?}"
                );
            }
        }
    }

    #[test]
    fn unix_seconds_from_stores_saturate_at_the_last_printable_second() {
        for secs in [253_402_300_800, i64::MAX as u64, u64::MAX] {
            let at = crate::token::from_unix_seconds(secs);
            assert_eq!(
                humantime::format_rfc3339_seconds(at).to_string(),
                "9999-12-31T23:59:59Z"
            );
        }
        assert_eq!(
            crate::token::unix_seconds(crate::token::from_unix_seconds(1_780_272_000)),
            1_780_272_000
        );
    }
}
