//! Tool -> (resource, verb): the resource templates of the gateway's configuration, filled
//! from a call's arguments by JSON pointer, and the question `tools/list` asks of them
//! ("could any call of this tool name a resource this right covers?").
//!
//! A placeholder takes one value of a deliberately small alphabet (letters, digits, `.`,
//! `_`, `~`, `-`; no dot segments), so an argument can never add a path segment, escape a
//! prefix, or be spelled two ways: anything else is refused, not encoded.

use serde_json::Value;

use capgate_core::scope::{ResourcePattern, Verb};

/// Longest value one placeholder takes.
const MAX_VALUE_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed `{{` in resource template {0:?}")]
    Unclosed(String),
    #[error("placeholder `{{{0}}}` is not a JSON pointer (it must start with `/`)")]
    NotAPointer(String),
    #[error("two placeholders without a literal between them in {0:?}")]
    Adjacent(String),
    #[error("resource template {template:?}: {why}")]
    Invalid { template: String, why: String },
}

/// Why a call's arguments could not fill the template: always a deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgumentRejected {
    #[error("argument {0} is missing")]
    Missing(String),
    #[error("argument {0} must be a string or an integer")]
    NotScalar(String),
    #[error(
        "argument {0} must be 1 to 128 characters of letters, digits, '.', '_', '~' or '-', and not a dot segment"
    )]
    BadValue(String),
    #[error("the filled resource is not a valid resource name: {0}")]
    BadResource(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Pointer(String),
}

/// `http://railway/volumes/{/volume_id}`: literals and JSON-pointer placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceTemplate {
    text: String,
    parts: Vec<Part>,
}

impl ResourceTemplate {
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let literal = &rest[..open];
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| TemplateError::Unclosed(text.to_owned()))?;
            let pointer = &after[..close];
            if !pointer.starts_with('/') {
                return Err(TemplateError::NotAPointer(pointer.to_owned()));
            }
            if literal.is_empty() && matches!(parts.last(), Some(Part::Pointer(_))) {
                return Err(TemplateError::Adjacent(text.to_owned()));
            }
            if !literal.is_empty() {
                parts.push(Part::Literal(literal.to_owned()));
            }
            parts.push(Part::Pointer(pointer.to_owned()));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let template = ResourceTemplate {
            text: text.to_owned(),
            parts,
        };
        // A sample rendering must be a valid resource: catches bad schemes and dot segments
        // in the literals at load time rather than on every call.
        let sample: String = template
            .parts
            .iter()
            .map(|part| match part {
                Part::Literal(l) => l.as_str(),
                Part::Pointer(_) => "x",
            })
            .collect();
        ResourcePattern::parse(&sample).map_err(|e| TemplateError::Invalid {
            template: text.to_owned(),
            why: e.to_string(),
        })?;
        if sample.ends_with('/') {
            return Err(TemplateError::Invalid {
                template: text.to_owned(),
                why: "a tool names one resource, not a prefix (ends with /)".into(),
            });
        }
        Ok(template)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The JSON pointers its placeholders read.
    pub fn pointers(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Pointer(pointer) => Some(pointer.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The resource this call names. Only values of the small alphabet are accepted.
    pub fn render(&self, arguments: &Value) -> Result<String, ArgumentRejected> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(literal) => out.push_str(literal),
                Part::Pointer(pointer) => {
                    let value = arguments
                        .pointer(pointer)
                        .ok_or_else(|| ArgumentRejected::Missing(pointer.clone()))?;
                    let value = match value {
                        Value::String(s) => s.clone(),
                        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                        _ => return Err(ArgumentRejected::NotScalar(pointer.clone())),
                    };
                    if !valid_value(&value) {
                        return Err(ArgumentRejected::BadValue(pointer.clone()));
                    }
                    out.push_str(&value);
                }
            }
        }
        ResourcePattern::parse(&out).map_err(|e| ArgumentRejected::BadResource(e.to_string()))?;
        Ok(out)
    }

    /// Could some call render a resource that `pattern` covers? (`tools/list` shows a tool
    /// only then.)
    pub fn reachable_by(&self, pattern: &ResourcePattern) -> bool {
        could_match(&self.parts, pattern.as_str(), pattern.is_prefix())
    }
}

pub(super) fn value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-')
}

pub(super) fn valid_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_VALUE_LEN
        && value != "."
        && value != ".."
        && value.chars().all(value_char)
}

/// Whether `s` can be the whole of a rendering of `parts` (or, with `prefix`, the start of
/// one).
fn could_match(parts: &[Part], s: &str, prefix: bool) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return s.is_empty();
    };
    if prefix && s.is_empty() {
        return true;
    }
    match first {
        Part::Literal(literal) => {
            if prefix && s.len() < literal.len() {
                literal.starts_with(s)
            } else {
                s.strip_prefix(literal.as_str())
                    .is_some_and(|after| could_match(rest, after, prefix))
            }
        }
        Part::Pointer(_) => {
            let run = s.find(|c: char| !value_char(c)).unwrap_or(s.len());
            let run = run.min(MAX_VALUE_LEN);
            (1..=run).any(|k| could_match(rest, &s[k..], prefix))
        }
    }
}

/// The verb a tool's annotations ask for: they may raise the configured verb, never lower
/// it (the spec calls annotations untrusted hints; a server's own warning still counts).
pub fn raised_by_annotations(
    configured: Verb,
    annotations: Option<&rmcp::model::ToolAnnotations>,
) -> Verb {
    let Some(annotations) = annotations else {
        return configured;
    };
    let implied = if annotations.destructive_hint == Some(true) {
        Verb::Delete
    } else if annotations.read_only_hint == Some(false) {
        Verb::Write
    } else {
        Verb::Read
    };
    if rank(implied) > rank(configured) {
        implied
    } else {
        configured
    }
}

fn rank(verb: Verb) -> u8 {
    match verb {
        Verb::Read => 0,
        Verb::Write => 1,
        Verb::Admin => 2,
        Verb::Delete => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(s: &str) -> ResourceTemplate {
        ResourceTemplate::parse(s).expect("template")
    }

    #[test]
    fn placeholders_take_values_from_json_pointers() {
        let t = template("http://railway/volumes/{/volume_id}");
        assert_eq!(
            t.render(&json!({"volume_id": "vol_1"})),
            Ok("http://railway/volumes/vol_1".into())
        );
        let nested = template("http://railway/{/target/env}/volumes/{/target/id}");
        assert_eq!(
            nested.render(&json!({"target": {"env": "prod", "id": 7}})),
            Ok("http://railway/prod/volumes/7".into())
        );
    }

    #[test]
    fn hostile_argument_values_are_refused_never_encoded() {
        let t = template("http://railway/volumes/{/volume_id}");
        for (label, args) in [
            (
                "path segment",
                json!({"volume_id": "vol_1/../backups/bk_1"}),
            ),
            ("dot segment", json!({"volume_id": ".."})),
            ("slash", json!({"volume_id": "vol_1/"})),
            ("empty", json!({"volume_id": ""})),
            ("encoded", json!({"volume_id": "vol%2F1"})),
            ("space", json!({"volume_id": "vol 1"})),
            ("unicode", json!({"volume_id": "vol\u{2215}1"})),
            ("too long", json!({"volume_id": "v".repeat(129)})),
        ] {
            assert_eq!(
                t.render(&args),
                Err(ArgumentRejected::BadValue("/volume_id".into())),
                "{label}"
            );
        }
        assert_eq!(
            t.render(&json!({"volume_id": ["vol_1"]})),
            Err(ArgumentRejected::NotScalar("/volume_id".into()))
        );
        assert_eq!(
            t.render(&json!({"volume_id": 1.5})),
            Err(ArgumentRejected::NotScalar("/volume_id".into()))
        );
        assert_eq!(
            t.render(&json!({"volume": "vol_1"})),
            Err(ArgumentRejected::Missing("/volume_id".into()))
        );
    }

    #[test]
    fn bad_templates_are_refused_at_load() {
        assert!(matches!(
            ResourceTemplate::parse("http://railway/{volume_id}"),
            Err(TemplateError::NotAPointer(_))
        ));
        assert!(matches!(
            ResourceTemplate::parse("http://railway/{/a"),
            Err(TemplateError::Unclosed(_))
        ));
        assert!(matches!(
            ResourceTemplate::parse("http://railway/{/a}{/b}"),
            Err(TemplateError::Adjacent(_))
        ));
        assert!(matches!(
            ResourceTemplate::parse("http://railway/../{/a}"),
            Err(TemplateError::Invalid { .. })
        ));
        assert!(matches!(
            ResourceTemplate::parse("http://railway/volumes/"),
            Err(TemplateError::Invalid { .. })
        ));
    }

    #[test]
    fn listing_asks_whether_any_call_could_reach_a_right() {
        let t = template("http://railway/volumes/{/volume_id}");
        let p = |s: &str| ResourcePattern::parse(s).expect("pattern");
        assert!(t.reachable_by(&p("http://railway/volumes/vol_1")));
        assert!(t.reachable_by(&p("http://railway/volumes/")));
        assert!(t.reachable_by(&p("http://railway/")));
        assert!(t.reachable_by(&p("http://railway/volumes/vol_")));
        assert!(!t.reachable_by(&p("http://railway/backups/")));
        assert!(!t.reachable_by(&p("http://railway/volumes/vol_1/data")));
        assert!(!t.reachable_by(&p("http://railway-staging/volumes/")));
        let fixed = template("http://railway/status");
        assert!(fixed.reachable_by(&p("http://railway/status")));
        assert!(!fixed.reachable_by(&p("http://railway/status2")));
    }

    #[test]
    fn annotations_raise_the_verb_and_never_lower_it() {
        use rmcp::model::ToolAnnotations;
        let destructive = ToolAnnotations::new().destructive(true);
        let read_only = ToolAnnotations::new().read_only(true);
        let writes = ToolAnnotations::new().read_only(false);
        assert_eq!(
            raised_by_annotations(Verb::Read, Some(&destructive)),
            Verb::Delete
        );
        assert_eq!(
            raised_by_annotations(Verb::Read, Some(&writes)),
            Verb::Write
        );
        assert_eq!(
            raised_by_annotations(Verb::Delete, Some(&read_only)),
            Verb::Delete
        );
        assert_eq!(raised_by_annotations(Verb::Write, None), Verb::Write);
    }
}
