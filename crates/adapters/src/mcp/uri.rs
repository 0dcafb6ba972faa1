//! Resource URIs an agent asks to read, matched against the configured URI templates
//! (`railway://volumes/{volume_id}/logs`) and prefixes (`railway://docs/`). A match yields
//! the values a resource template is filled from (`{"volume_id": "vol_1"}`), so a read is
//! decided like a tool call; anything that matches nothing is unmapped.
//!
//! A template variable takes one value of the same small alphabet tool arguments do, and the
//! text after a prefix is segments of it: an encoded slash, a dot segment or a query can never
//! reach a resource the match did not name. A template is refused at load if its matches could
//! be split two ways.

use serde_json::{Map, Value};

use super::mapping::{valid_value, value_char};

/// Longest URI decided on; longer ones are refused before any matching.
pub const MAX_URI_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriPatternError {
    #[error("{0:?} is not scheme://… (a URI template or prefix names one scheme)")]
    NoScheme(String),
    #[error("unclosed or stray brace in URI template {0:?}")]
    Brace(String),
    #[error(
        "variable {{{0}}}: a name is letters, digits and '_' (RFC 6570 operators are not supported)"
    )]
    BadVariable(String),
    #[error("variable {{{0}}} is named twice")]
    Repeated(String),
    #[error(
        "variable {{{0}}} must be followed by the end or by a literal starting with a character a value cannot hold (such as '/'): otherwise a URI could be split two ways"
    )]
    Unbounded(String),
    #[error("a URI prefix must end with '/'")]
    PrefixWithoutSlash,
}

/// Why a URI that reached a mapping is refused: always a deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriRejected {
    #[error("the URI is longer than 2048 bytes")]
    TooLong,
    #[error(
        "after {prefix} a URI is segments of 1 to 128 letters, digits, '.', '_', '~' or '-' separated by '/', without dot segments"
    )]
    BadRemainder { prefix: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Variable(String),
}

/// `railway://volumes/{volume_id}/logs`: literals and simple variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriTemplate {
    text: String,
    parts: Vec<Part>,
}

impl UriTemplate {
    pub fn parse(text: &str) -> Result<Self, UriPatternError> {
        if !has_scheme(text) {
            return Err(UriPatternError::NoScheme(text.to_owned()));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(at) if rest.as_bytes()[at] == b'}' => {
                    return Err(UriPatternError::Brace(text.to_owned()))
                }
                Some(open) => {
                    if open > 0 {
                        parts.push(Part::Literal(rest[..open].to_owned()));
                    }
                    let after = &rest[open + 1..];
                    let close = after
                        .find('}')
                        .ok_or_else(|| UriPatternError::Brace(text.to_owned()))?;
                    let name = &after[..close];
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(UriPatternError::BadVariable(name.to_owned()));
                    }
                    parts.push(Part::Variable(name.to_owned()));
                    rest = &after[close + 1..];
                }
                None => {
                    parts.push(Part::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, part) in parts.iter().enumerate() {
            let Part::Variable(name) = part else { continue };
            if !names.insert(name.as_str()) {
                return Err(UriPatternError::Repeated(name.clone()));
            }
            // A value ends at the first character it cannot hold; that must be where the
            // next literal starts, or the split would be a guess.
            let bounded = match parts.get(i + 1) {
                None => true,
                Some(Part::Literal(next)) => next.chars().next().is_some_and(|c| !value_char(c)),
                Some(Part::Variable(_)) => false,
            };
            if !bounded {
                return Err(UriPatternError::Unbounded(name.clone()));
            }
        }
        Ok(UriTemplate {
            text: text.to_owned(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Variable(name) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The variables' values if `uri` is exactly a rendering of this template.
    pub fn matches(&self, uri: &str) -> Option<Map<String, Value>> {
        let mut values = Map::new();
        let mut rest = uri;
        for part in &self.parts {
            match part {
                Part::Literal(literal) => rest = rest.strip_prefix(literal.as_str())?,
                Part::Variable(name) => {
                    let end = rest.find(|c: char| !value_char(c)).unwrap_or(rest.len());
                    let value = &rest[..end];
                    if !valid_value(value) {
                        return None;
                    }
                    values.insert(name.clone(), Value::String(value.to_owned()));
                    rest = &rest[end..];
                }
            }
        }
        rest.is_empty().then_some(values)
    }
}

/// `railway://docs/`: every URI under it, read as one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriPrefix(String);

impl UriPrefix {
    pub fn parse(text: &str) -> Result<Self, UriPatternError> {
        if !has_scheme(text) {
            return Err(UriPatternError::NoScheme(text.to_owned()));
        }
        if !text.ends_with('/') {
            return Err(UriPatternError::PrefixWithoutSlash);
        }
        Ok(UriPrefix(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `None` if `uri` is not under the prefix; a refusal if it is but the rest is not plain
    /// segments (what an upstream might normalise out of the prefix).
    pub fn matches(&self, uri: &str) -> Option<Result<(), UriRejected>> {
        let rest = uri.strip_prefix(self.0.as_str())?;
        let plain = !rest.is_empty() && rest.split('/').all(valid_value);
        Some(if plain {
            Ok(())
        } else {
            Err(UriRejected::BadRemainder {
                prefix: self.0.clone(),
            })
        })
    }
}

fn has_scheme(text: &str) -> bool {
    text.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && !rest.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(s: &str) -> UriTemplate {
        UriTemplate::parse(s).expect("template")
    }

    #[test]
    fn a_template_yields_its_variables_values() {
        let t = template("railway://volumes/{volume_id}/logs");
        assert_eq!(
            t.matches("railway://volumes/vol_1/logs").map(Value::Object),
            Some(json!({"volume_id": "vol_1"}))
        );
        let two = template("railway://{env}/volumes/{id}");
        assert_eq!(
            two.matches("railway://prod/volumes/7").map(Value::Object),
            Some(json!({"env": "prod", "id": "7"}))
        );
    }

    #[test]
    fn uris_that_do_not_render_the_template_exactly_do_not_match() {
        let t = template("railway://volumes/{volume_id}/logs");
        for uri in [
            "railway://volumes/vol_1/logs?tail=all",
            "railway://volumes/vol_1/logs/",
            "railway://volumes/vol_1%2F..%2Fvol_2/logs",
            "railway://volumes/../logs",
            "railway://volumes//logs",
            "railway://volumes/vol 1/logs",
            "RAILWAY://volumes/vol_1/logs",
            "railway://volumes/vol_1/logs#x",
            "railway://volumes/a/b/logs",
        ] {
            assert_eq!(t.matches(uri), None, "{uri}");
        }
        let long = format!("railway://volumes/{}/logs", "v".repeat(129));
        assert_eq!(t.matches(&long), None);
    }

    #[test]
    fn templates_that_could_split_a_uri_two_ways_are_refused_at_load() {
        for (text, expected) in [
            ("railway://{a}-{b}", UriPatternError::Unbounded("a".into())),
            ("railway://{a}{b}", UriPatternError::Unbounded("a".into())),
            ("railway://{a}/{a}", UriPatternError::Repeated("a".into())),
            (
                "railway://{+path}",
                UriPatternError::BadVariable("+path".into()),
            ),
            (
                "railway://{a",
                UriPatternError::Brace("railway://{a".into()),
            ),
            (
                "railway://a}",
                UriPatternError::Brace("railway://a}".into()),
            ),
            (
                "volumes/{a}",
                UriPatternError::NoScheme("volumes/{a}".into()),
            ),
        ] {
            assert_eq!(UriTemplate::parse(text), Err(expected), "{text}");
        }
    }

    #[test]
    fn a_prefix_admits_plain_segments_only() {
        let p = UriPrefix::parse("railway://docs/").expect("prefix");
        assert_eq!(p.matches("railway://other/x"), None);
        assert_eq!(
            p.matches("railway://docs/runbooks/restore.md"),
            Some(Ok(()))
        );
        for uri in [
            "railway://docs/",
            "railway://docs/../secrets",
            "railway://docs/a/./b",
            "railway://docs//etc",
            "railway://docs/a/",
            "railway://docs/%2e%2e/x",
            "railway://docs/a?b",
            "railway://docs/a b",
        ] {
            assert!(matches!(p.matches(uri), Some(Err(_))), "{uri}");
        }
        assert_eq!(
            UriPrefix::parse("railway://docs"),
            Err(UriPatternError::PrefixWithoutSlash)
        );
    }
}
