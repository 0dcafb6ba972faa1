//! The agent's token outside the token header. The proxy strips the token headers; a copy
//! of the token in the query, a cookie, another header or a body would still reach the
//! upstream, and the upstream must never see a Capgate token. A token is looked for in
//! every spelling that reads back as the same secret: URL-safe or standard base64, with or
//! without padding, raw or percent-encoded (up to three times).

use std::borrow::Cow;

use http::header::AUTHORIZATION;
use http::request::Parts;
use percent_encoding::percent_decode;

use crate::TOKEN_HEADER;

/// Shorter strings cannot be a token (the guard refuses them); searching for them would
/// only find coincidences.
pub const MIN_TOKEN_LEN: usize = 32;

/// Rounds of percent-decoding a searched text goes through.
const DECODE_ROUNDS: usize = 3;

/// The forms of one token that are searched for: its base64 without padding, in the URL-safe
/// alphabet it is issued in and in the standard one.
#[derive(Debug, Clone)]
pub struct TokenSpellings {
    spellings: Vec<String>,
}

impl TokenSpellings {
    /// `None` for a string too short to be a token.
    pub fn new(token: &str) -> Option<Self> {
        let core = token.trim().trim_end_matches('=');
        if core.len() < MIN_TOKEN_LEN {
            return None;
        }
        let standard = core.replace('-', "+").replace('_', "/");
        let mut spellings = vec![core.to_owned()];
        if standard != core {
            spellings.push(standard);
        }
        Some(TokenSpellings { spellings })
    }

    pub fn spellings(&self) -> &[String] {
        &self.spellings
    }

    /// Whether `bytes`, as they are or percent-decoded, hold the token.
    pub fn found_in(&self, bytes: &[u8]) -> bool {
        let mut text: Cow<[u8]> = Cow::Borrowed(bytes);
        for _ in 0..=DECODE_ROUNDS {
            if self.found_raw(&text) {
                return true;
            }
            let decoded: Cow<[u8]> = percent_decode(&text).into();
            if decoded.as_ref() == text.as_ref() {
                return false;
            }
            text = Cow::Owned(decoded.into_owned());
        }
        false
    }

    fn found_raw(&self, bytes: &[u8]) -> bool {
        self.spellings
            .iter()
            .any(|s| memchr::memmem::find(bytes, s.as_bytes()).is_some())
    }
}

/// Whether `bytes` hold `token` in any of its spellings: for adapters that read a body
/// themselves (a GraphQL document, a JSON-RPC call) before forwarding it.
pub fn contains_token(bytes: &[u8], token: &str) -> bool {
    TokenSpellings::new(token).is_some_and(|t| t.found_in(bytes))
}

/// Where in the request head the token appears besides the token headers: `path`, `query`,
/// `cookie` or `header <name>`.
pub fn in_head(parts: &Parts, token: &TokenSpellings) -> Option<String> {
    if token.found_in(parts.uri.path().as_bytes()) {
        return Some("path".into());
    }
    if parts
        .uri
        .query()
        .is_some_and(|q| token.found_in(q.as_bytes()))
    {
        return Some("query".into());
    }
    parts.headers.iter().find_map(|(name, value)| {
        if *name == AUTHORIZATION || name.as_str() == TOKEN_HEADER {
            return None;
        }
        token.found_in(value.as_bytes()).then(|| {
            if *name == http::header::COOKIE {
                "cookie".to_owned()
            } else {
                format!("header {name}")
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "CAESnQQKsgMKBWFnZW50CgdvcHMtYm90Cgdz-_ZXNzaW9uCiAzYmMyYTg2YWIz==";

    #[test]
    fn every_spelling_of_the_token_is_found() {
        let core = TOKEN.trim_end_matches('=');
        let standard = core.replace('-', "+").replace('_', "/");
        let encoded: String = TOKEN.bytes().map(|b| format!("%{b:02X}")).collect();
        let twice = encoded.replace('%', "%25");
        for text in [
            format!("a={TOKEN}"),
            format!("a={core}&b=1"),
            standard.clone(),
            encoded.clone(),
            twice,
            format!("{{\"query\":\"{{ login(token: \\\"{core}\\\") }}\"}}"),
        ] {
            assert!(contains_token(text.as_bytes(), TOKEN), "{text}");
        }
        let partial = &core[..core.len() - 1];
        assert!(!contains_token(partial.as_bytes(), TOKEN));
        assert!(!contains_token(b"", TOKEN));
        assert!(!contains_token(b"abc", "abc"), "too short to be a token");
    }

    #[test]
    fn the_head_is_searched_everywhere_but_the_token_headers() {
        let request = |uri: &str, headers: &[(&str, String)]| {
            let mut builder = http::Request::builder().uri(uri);
            builder = builder.header("authorization", format!("Bearer {TOKEN}"));
            builder = builder.header("capgate-token", TOKEN);
            for (name, value) in headers {
                builder = builder.header(*name, value.as_str());
            }
            builder.body(()).expect("request").into_parts().0
        };
        let token = TokenSpellings::new(TOKEN).expect("long enough");
        assert_eq!(in_head(&request("/v2/x?a=1", &[]), &token), None);
        assert_eq!(
            in_head(&request(&format!("/v2/x?t={TOKEN}"), &[]), &token).as_deref(),
            Some("query")
        );
        assert_eq!(
            in_head(
                &request("/v2/x", &[("cookie", format!("s={TOKEN}"))]),
                &token
            )
            .as_deref(),
            Some("cookie")
        );
        assert_eq!(
            in_head(&request("/v2/x", &[("x-api-key", TOKEN.into())]), &token).as_deref(),
            Some("header x-api-key")
        );
    }
}
