//! The vocabulary of permissions: verbs, resource patterns and scopes.
//!
//! A resource is a URI-like name (`pg://prod/public.bookings`). A pattern names one resource
//! exactly, or, when it ends in `/`, every resource under that prefix. Patterns are validated
//! here once, so every other module can rely on them being well formed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The closed set of things an adapter can ask to do to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Read,
    Write,
    /// Destructive: removes data or infrastructure.
    Delete,
    /// Schema or infrastructure change.
    Admin,
}

impl Verb {
    pub const ALL: [Verb; 4] = [Verb::Read, Verb::Write, Verb::Delete, Verb::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Read => "read",
            Verb::Write => "write",
            Verb::Delete => "delete",
            Verb::Admin => "admin",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("unknown verb {0:?} (expected read, write, delete or admin)")]
    UnknownVerb(String),
    #[error("invalid resource {resource:?}: {why}")]
    InvalidResource { resource: String, why: &'static str },
    #[error("invalid scope {0:?}: expected RESOURCE:VERB, e.g. pg://staging/:write")]
    InvalidScope(String),
}

impl FromStr for Verb {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Verb::ALL
            .into_iter()
            .find(|verb| verb.as_str() == s)
            .ok_or_else(|| ScopeError::UnknownVerb(s.to_owned()))
    }
}

/// Longest resource name accepted anywhere; keeps tokens and Datalog worlds small.
pub const MAX_RESOURCE_LEN: usize = 512;

/// A validated resource name or prefix (`scheme://rest`, trailing `/` = prefix).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ResourcePattern(String);

impl ResourcePattern {
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        let invalid = |why| ScopeError::InvalidResource {
            resource: s.chars().take(80).collect(),
            why,
        };
        if s.len() > MAX_RESOURCE_LEN {
            return Err(invalid("longer than 512 bytes"));
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(invalid("expected scheme://name"));
        };
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '+' || c == '-')
        {
            return Err(invalid("scheme must be lowercase letters, digits, + or -"));
        }
        if rest.is_empty() {
            return Err(invalid("empty name after scheme://"));
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid("contains whitespace or control characters"));
        }
        if s.contains('*') {
            return Err(invalid("wildcards are not supported; end a prefix with /"));
        }
        // Dot segments would let a prefix right reach outside its prefix after normalisation.
        if rest.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(invalid("contains a . or .. segment"));
        }
        if rest.contains("//") {
            return Err(invalid("contains an empty segment"));
        }
        Ok(ResourcePattern(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A pattern ending in `/` names every resource under it.
    pub fn is_prefix(&self) -> bool {
        self.0.ends_with('/')
    }

    /// Does this pattern name `resource` (a concrete resource name)?
    pub fn covers(&self, resource: &str) -> bool {
        if self.is_prefix() {
            resource.starts_with(&self.0)
        } else {
            resource == self.0
        }
    }

    /// Could some resource be named by both patterns?
    pub fn overlaps(&self, other: &ResourcePattern) -> bool {
        self.covers(other.as_str())
            || other.covers(self.as_str())
            || (self.is_prefix() && other.is_prefix() && self.0.starts_with(&other.0))
    }
}

impl TryFrom<String> for ResourcePattern {
    type Error = ScopeError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        ResourcePattern::parse(&value)
    }
}

impl FromStr for ResourcePattern {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResourcePattern::parse(s)
    }
}

impl From<ResourcePattern> for String {
    fn from(value: ResourcePattern) -> Self {
        value.0
    }
}

impl fmt::Display for ResourcePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One permission: a verb on a resource pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    pub resource: ResourcePattern,
    pub verb: Verb,
}

impl Scope {
    pub fn new(resource: ResourcePattern, verb: Verb) -> Self {
        Scope { resource, verb }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.resource, self.verb)
    }
}

/// `RESOURCE:VERB`, split at the last colon so `scheme://` stays intact.
impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (resource, verb) = s
            .rsplit_once(':')
            .filter(|(resource, _)| resource.contains("://"))
            .ok_or_else(|| ScopeError::InvalidScope(s.chars().take(80).collect()))?;
        Ok(Scope {
            resource: ResourcePattern::parse(resource)?,
            verb: verb.parse()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> ResourcePattern {
        ResourcePattern::parse(s).expect("valid pattern")
    }

    #[test]
    fn prefix_and_exact_patterns_cover_what_they_name() {
        let prefix = pattern("pg://staging/");
        assert!(prefix.covers("pg://staging/public.bookings"));
        assert!(prefix.covers("pg://staging/"));
        assert!(!prefix.covers("pg://staging"));
        assert!(!prefix.covers("pg://staging-2/public.bookings"));
        let exact = pattern("http://railway/volumes/vol_1");
        assert!(exact.covers("http://railway/volumes/vol_1"));
        assert!(!exact.covers("http://railway/volumes/vol_10"));
        assert!(!exact.covers("http://railway/volumes/vol_1/"));
    }

    #[test]
    fn overlap_is_symmetric() {
        let cases = [
            ("http://r/", "http://r/backups/bk_1", true),
            ("http://r/backups/", "http://r/", true),
            ("http://r/volumes/", "http://r/backups/", false),
            ("http://r/a", "http://r/a", true),
            ("http://r/a", "http://r/b", false),
        ];
        for (a, b, expected) in cases {
            assert_eq!(pattern(a).overlaps(&pattern(b)), expected, "{a} vs {b}");
            assert_eq!(pattern(b).overlaps(&pattern(a)), expected, "{b} vs {a}");
        }
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for bad in [
            "",
            "staging",
            "pg://",
            "PG://x",
            "pg://a b",
            "pg://a\n",
            "pg://a/*",
            "pg://a/../b",
            "pg://a/./b",
            "pg://a//b",
            &format!("pg://{}", "a".repeat(600)),
        ] {
            assert!(ResourcePattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn scopes_parse_from_cli_form() {
        let scope: Scope = "pg://staging/:write".parse().expect("scope");
        assert_eq!(scope.resource.as_str(), "pg://staging/");
        assert_eq!(scope.verb, Verb::Write);
        assert!("pg://staging/".parse::<Scope>().is_err());
        assert!("pg://x:destroy".parse::<Scope>().is_err());
    }
}
