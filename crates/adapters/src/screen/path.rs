//! Request-target hygiene: one canonical meaning per request, decided before route matching,
//! and the only form that is forwarded upstream. Ambiguous encodings are rejected rather than
//! guessed at: an upstream that decodes differently from us must never see a different path.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("request target is not an origin-form path")]
    NotOriginForm,
    #[error("path has an invalid percent-encoding or is not UTF-8")]
    BadEncoding,
    #[error("path segment has an encoded slash or backslash")]
    EncodedSeparator,
    #[error("path has a dot segment")]
    DotSegment,
    #[error("path has a control character, NUL or ';'")]
    ForbiddenCharacter,
    #[error("path is longer than {0} bytes")]
    TooLong(usize),
}

pub const MAX_PATH_BYTES: usize = 4096;

/// Characters left unencoded when the canonical path is rebuilt: RFC 3986 unreserved plus a
/// few sub-delimiters common in API ids.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':')
    .remove(b'@')
    .remove(b'+')
    .remove(b',')
    .remove(b'=');

/// A path reduced to its decoded segments and the one encoding that goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    pub segments: Vec<String>,
    pub encoded: String,
}

/// Decodes and validates `raw` (the path part of an origin-form target, without query).
/// Duplicate and trailing slashes collapse; dot segments, encoded separators, control
/// characters and `;` path parameters are refused.
pub fn canonicalize(raw: &str) -> Result<CanonicalPath, PathError> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(MAX_PATH_BYTES));
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let mut segments = Vec::new();
    for raw_segment in raw.split('/').filter(|s| !s.is_empty()) {
        if raw_segment.contains(';') || raw_segment.contains('\\') {
            return Err(PathError::ForbiddenCharacter);
        }
        let decoded = percent_decode_str(raw_segment)
            .decode_utf8()
            .map_err(|_| PathError::BadEncoding)?;
        if has_invalid_escape(raw_segment) {
            return Err(PathError::BadEncoding);
        }
        if decoded.contains('/') || decoded.contains('\\') {
            return Err(PathError::EncodedSeparator);
        }
        if decoded.chars().any(|c| c.is_control() || c == ';') {
            return Err(PathError::ForbiddenCharacter);
        }
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
        segments.push(decoded.into_owned());
    }
    let encoded = if segments.is_empty() {
        "/".to_owned()
    } else {
        segments
            .iter()
            .map(|s| format!("/{}", utf8_percent_encode(s, SEGMENT)))
            .collect()
    };
    // Re-encoding can triple a segment (`}` becomes `%7D`): the form forwarded upstream is
    // held to the same limit, so it is itself a path this function accepts.
    if encoded.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(MAX_PATH_BYTES));
    }
    Ok(CanonicalPath { segments, encoded })
}

/// `%` not followed by two hex digits: decoders disagree on these, so refuse them.
fn has_invalid_escape(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    bytes.iter().enumerate().any(|(i, b)| {
        *b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equivalent_spellings_become_one_canonical_path() {
        for raw in [
            "/v2/volumes/vol_1",
            "//v2///volumes/vol_1/",
            "/v2/%76olumes/vol%5F1",
            "/v2/volumes/vol_1//",
        ] {
            let path = canonicalize(raw).expect(raw);
            assert_eq!(path.segments, ["v2", "volumes", "vol_1"], "{raw}");
            assert_eq!(path.encoded, "/v2/volumes/vol_1", "{raw}");
        }
    }

    /// One row per known trick; each must be refused outright.
    #[test]
    fn ambiguous_paths_are_refused() {
        let rows = [
            ("/v2/volumes/../backups/bk_1", PathError::DotSegment),
            ("/v2/volumes/%2e%2e/backups", PathError::DotSegment),
            ("/v2/volumes/.%2E/backups", PathError::DotSegment),
            ("/v2/volumes/./vol_1", PathError::DotSegment),
            (
                "/v2/volumes/vol_1%2f..%2fbackups",
                PathError::EncodedSeparator,
            ),
            ("/v2/volumes/vol_1%2F", PathError::EncodedSeparator),
            ("/v2/volumes/vol%5c1", PathError::EncodedSeparator),
            ("/v2/volumes\\..\\backups", PathError::ForbiddenCharacter),
            ("/v2/volumes;x=1/vol_1", PathError::ForbiddenCharacter),
            ("/v2/volumes/vol_1%3b", PathError::ForbiddenCharacter),
            ("/v2/volumes/vol%00_1", PathError::ForbiddenCharacter),
            ("/v2/volumes/vol%0a", PathError::ForbiddenCharacter),
            ("/v2/volumes/vol%zz", PathError::BadEncoding),
            ("/v2/volumes/vol%", PathError::BadEncoding),
            ("/v2/volumes/%ff%fe", PathError::BadEncoding),
            ("v2/volumes", PathError::NotOriginForm),
            ("http://evil/v2/volumes", PathError::NotOriginForm),
        ];
        for (raw, expected) in rows {
            assert_eq!(canonicalize(raw), Err(expected.clone()), "{raw}");
        }
        assert_eq!(
            canonicalize(&format!("/{}", "a".repeat(5000))),
            Err(PathError::TooLong(MAX_PATH_BYTES))
        );
    }

    #[test]
    fn reserved_characters_are_re_encoded() {
        let path = canonicalize("/files/a%20b%3Fc%23d").expect("path");
        assert_eq!(path.segments, ["files", "a b?c#d"]);
        assert_eq!(path.encoded, "/files/a%20b%3Fc%23d");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// Random targets: never a panic, and whatever is accepted is free of separators, dot
    /// segments and control characters in every segment.
    #[test]
    fn random_paths_canonicalise_safely() {
        let alphabet = b"/.%2fFeE5cC0aA;\\\x00\n vx_-~";
        let mut next = capgate_test_support::xorshift(0x1234_5678_9ABC_DEF1);
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let raw: String = std::iter::once('/')
                .chain(
                    (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char),
                )
                .collect();
            if let Ok(path) = canonicalize(&raw) {
                for segment in &path.segments {
                    assert!(!segment.contains('/') && !segment.contains('\\'), "{raw:?}");
                    assert!(segment != "." && segment != "..", "{raw:?}");
                    assert!(!segment.chars().any(char::is_control), "{raw:?}");
                }
                assert_eq!(
                    canonicalize(&path.encoded).map(|p| p.segments),
                    Ok(path.segments.clone()),
                    "canonical form is stable: {raw:?}"
                );
            }
        }
    }
}
