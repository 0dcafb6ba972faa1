//! Root fields to guard operations: configuration maps a field (`Mutation.volumeDelete`) to a
//! resource template (`railway://volumes/{volumeId}`) and a verb. Query fields without a rule
//! are `read` on the configured query resource; a mutation field without a rule is refused,
//! never given a default. Introspection (`__schema`, `__type`) is allowed or refused by
//! configuration; `__typename` is a read of the schema resource.

use std::collections::BTreeMap;

use apollo_compiler::ast::OperationType;
use apollo_compiler::validation::Valid;
use apollo_compiler::Schema;
use serde::Deserialize;
use serde_json::Value;

use super::document::{canonical, Invocation, Root};
use super::Refusal;
use capgate_core::scope::{ResourcePattern, Verb};

/// One root field's rule, as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    /// `Mutation.volumeDelete` or `Query.volumes`.
    pub field: String,
    /// The resource name; `{arg}` or `{input.field}` are filled from the invocation's
    /// arguments (after variable substitution), `{$environment}` with the environment the
    /// resource lives in (so a right for staging never names a production resource).
    pub resource: String,
    pub verb: Verb,
    /// A resolver (`[graphql.resolvers.NAME]`) that asks the provider which environment the
    /// resource lives in. Without one, the proxy's configured environment is used.
    #[serde(default)]
    pub environment: Option<String>,
}

/// Whether `__schema` and `__type` may be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Introspection {
    Allow,
    #[default]
    Deny,
}

/// A field's operation before its environment is known.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub resource: String,
    pub verb: Verb,
    /// The resolver to ask, if the field has one.
    pub resolver: Option<String>,
    /// Policy attributes and what an approval binds: the field, its root and its arguments
    /// (each as canonical JSON), never the alias or the document's formatting.
    pub attributes: Vec<(String, String)>,
    /// The invocation's arguments, for the resolver.
    pub arguments: BTreeMap<String, Value>,
    pub field: String,
}

#[derive(Debug)]
struct Rule {
    template: Vec<Part>,
    verb: Verb,
    resolver: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Argument(Vec<String>),
    /// `{$environment}`: the Capgate environment, known once resolved.
    Environment,
}

/// Where the environment goes in a rendered resource until it is known.
pub const ENVIRONMENT_SLOT: &str = "{$environment}";

/// The compiled rules.
#[derive(Debug)]
pub struct FieldMap {
    rules: BTreeMap<(Root, String), Rule>,
    query_resource: Vec<Part>,
    schema_resource: String,
    introspection: Introspection,
}

impl FieldMap {
    /// Compiles and checks the rules against `schema`: each field must exist on its root type,
    /// each `{arg}` must be one of its arguments, each resolver must be known.
    pub fn new(
        schema: &Valid<Schema>,
        rules: &[FieldRule],
        query_resource: &str,
        schema_resource: &str,
        introspection: Introspection,
        resolvers: &[&str],
    ) -> Result<Self, String> {
        let mut compiled = BTreeMap::new();
        for rule in rules {
            let (root, field) = match rule.field.split_once('.') {
                Some(("Query", field)) => (Root::Query, field),
                Some(("Mutation", field)) => (Root::Mutation, field),
                _ => {
                    return Err(format!(
                        "field {}: write Query.name or Mutation.name",
                        rule.field
                    ))
                }
            };
            let kind = match root {
                Root::Query => OperationType::Query,
                _ => OperationType::Mutation,
            };
            let definition = schema
                .root_operation(kind)
                .and_then(|name| schema.type_field(name.as_str(), field).ok())
                .ok_or_else(|| format!("field {}: not in the schema", rule.field))?;
            let template = parse_template(&rule.resource)
                .ok_or_else(|| format!("field {}: unbalanced braces in resource", rule.field))?;
            for part in &template {
                if let Part::Argument(path) = part {
                    let first = path.first().map(String::as_str).unwrap_or_default();
                    if !definition.arguments.iter().any(|a| a.name == first) {
                        return Err(format!(
                            "field {}: resource names {{{}}}, which is not one of its arguments",
                            rule.field,
                            path.join(".")
                        ));
                    }
                }
            }
            check_template(&template).map_err(|e| format!("field {}: {e}", rule.field))?;
            if let Some(resolver) = &rule.environment {
                if !resolvers.contains(&resolver.as_str()) {
                    return Err(format!(
                        "field {}: no resolver named {resolver}",
                        rule.field
                    ));
                }
            }
            let previous = compiled.insert(
                (root, field.to_owned()),
                Rule {
                    template,
                    verb: rule.verb,
                    resolver: rule.environment.clone(),
                },
            );
            if previous.is_some() {
                return Err(format!("field {}: configured twice", rule.field));
            }
        }
        let query_resource =
            parse_template(query_resource).ok_or("query_resource: unbalanced braces".to_owned())?;
        if query_resource
            .iter()
            .any(|p| matches!(p, Part::Argument(a) if a.len() != 1 || a[0] != "field"))
        {
            return Err("query_resource may only name {field}".into());
        }
        check_template(&query_resource).map_err(|e| format!("query_resource: {e}"))?;
        ResourcePattern::parse(&schema_resource.replace(ENVIRONMENT_SLOT, "x"))
            .map_err(|e| format!("schema_resource: {e}"))?;
        Ok(FieldMap {
            rules: compiled,
            query_resource,
            schema_resource: schema_resource.to_owned(),
            introspection,
        })
    }

    /// The operation an invocation asks for, or why it is refused.
    pub fn pending(&self, invocation: &Invocation) -> Result<Pending, Refusal> {
        let field = invocation.field.as_str();
        let mut attributes = vec![
            (
                "graphql_root".to_owned(),
                invocation.root.as_str().to_owned(),
            ),
            ("graphql_field".to_owned(), field.to_owned()),
        ];
        for (name, value) in &invocation.arguments {
            attributes.push((format!("graphql_argument:{name}"), canonical(value)));
        }
        let pending = |resource: String, verb, resolver: Option<String>| Pending {
            resource,
            verb,
            resolver,
            attributes: attributes.clone(),
            arguments: invocation.arguments.clone(),
            field: field.to_owned(),
        };
        match field {
            "__typename" => return Ok(pending(self.schema_resource.clone(), Verb::Read, None)),
            "__schema" | "__type" => {
                return match self.introspection {
                    Introspection::Allow => {
                        Ok(pending(self.schema_resource.clone(), Verb::Read, None))
                    }
                    Introspection::Deny => Err(Refusal::Introspection(field.to_owned())),
                }
            }
            _ => {}
        }
        match self.rules.get(&(invocation.root, field.to_owned())) {
            Some(rule) => {
                let resource = render(&rule.template, field, &invocation.arguments)?;
                Ok(pending(resource, rule.verb, rule.resolver.clone()))
            }
            None if invocation.root == Root::Query => {
                let resource = self
                    .query_resource
                    .iter()
                    .map(|part| match part {
                        Part::Literal(text) => text.as_str(),
                        Part::Argument(_) => field,
                        Part::Environment => ENVIRONMENT_SLOT,
                    })
                    .collect();
                Ok(pending(resource, Verb::Read, None))
            }
            None => Err(Refusal::UnmappedMutation(field.to_owned())),
        }
    }
}

fn parse_template(text: &str) -> Option<Vec<Part>> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}')? + open;
        if open > 0 {
            parts.push(Part::Literal(rest[..open].to_owned()));
        }
        let inner = &rest[open + 1..close];
        if inner == "$environment" {
            parts.push(Part::Environment);
        } else {
            let path: Vec<String> = inner.split('.').map(str::to_owned).collect();
            if path.iter().any(|p| p.is_empty() || p.contains('$')) {
                return None;
            }
            parts.push(Part::Argument(path));
        }
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return None;
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_owned()));
    }
    Some(parts)
}

/// With placeholder values, the template must make a valid concrete resource name.
fn check_template(template: &[Part]) -> Result<(), String> {
    let sample: String = template
        .iter()
        .map(|part| match part {
            Part::Literal(text) => text.as_str(),
            Part::Argument(_) | Part::Environment => "x",
        })
        .collect();
    if ResourcePattern::parse(&sample).is_err() || sample.ends_with('/') {
        return Err("the resource template does not make a valid resource name".into());
    }
    Ok(())
}

fn render(
    template: &[Part],
    field: &str,
    arguments: &BTreeMap<String, Value>,
) -> Result<String, Refusal> {
    let mut out = String::new();
    for part in template {
        match part {
            Part::Literal(text) => out.push_str(text),
            Part::Environment => out.push_str(ENVIRONMENT_SLOT),
            Part::Argument(path) => {
                let refuse = |why: &str| Refusal::Argument {
                    field: field.to_owned(),
                    argument: path.join("."),
                    why: why.to_owned(),
                };
                let value = lookup(arguments, path).ok_or_else(|| refuse("missing"))?;
                let text = match value {
                    Value::String(text) => text.clone(),
                    Value::Number(number) => number.to_string(),
                    _ => return Err(refuse("not a string or number")),
                };
                if !is_safe_segment(&text) {
                    return Err(refuse(
                        "only letters, digits and -_.~:@ may name a resource",
                    ));
                }
                out.push_str(&text);
            }
        }
    }
    Ok(out)
}

/// An argument, or a field inside an input-object argument.
pub fn lookup<'a>(arguments: &'a BTreeMap<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = arguments.get(first)?;
    for key in rest {
        value = value.get(key)?;
    }
    Some(value)
}

/// Values become part of a resource name, so only plain id characters are accepted (as the
/// HTTP route table accepts path parameters).
fn is_safe_segment(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.~:@".contains(c))
}
