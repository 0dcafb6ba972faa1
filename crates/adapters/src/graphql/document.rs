//! A GraphQL document, parsed and validated against the upstream's schema with
//! `apollo-compiler`, turned into the root-field invocations of the operation the request
//! selects. Fragments and inline fragments on the root type are expanded, every alias is its
//! own invocation, `@skip`/`@include` are ignored (a field that might run counts as run), and
//! arguments are taken after variable coercion and substitution, so the values judged are
//! the values the upstream will see.

use std::collections::{BTreeMap, HashMap};

use apollo_compiler::ast::{OperationType, Value as AstValue};
use apollo_compiler::executable::{ExecutableDocument, Fragment, Selection, SelectionSet};
use apollo_compiler::parser::Parser;
use apollo_compiler::response::JsonMap;
use apollo_compiler::validation::Valid;
use apollo_compiler::{Node, Schema};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::request::GraphqlRequest;
use super::Refusal;

/// Bounds on what one document may ask for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Selection depth, fragments expanded.
    #[serde(default = "Limits::default_depth")]
    pub max_depth: usize,
    /// Aliased fields in the document.
    #[serde(default = "Limits::default_aliases")]
    pub max_aliases: usize,
    /// Root-field invocations of the selected operation, fragments expanded.
    #[serde(default = "Limits::default_root_fields")]
    pub max_root_fields: usize,
    /// Lexical tokens the parser reads before giving up.
    #[serde(default = "Limits::default_tokens")]
    pub max_tokens: usize,
    /// Parser nesting (selection sets, values) before giving up.
    #[serde(default = "Limits::default_recursion")]
    pub max_recursion: usize,
    /// Requests in one batch (a JSON array).
    #[serde(default = "Limits::default_batch")]
    pub max_batch: usize,
    /// Request body bytes.
    #[serde(default = "Limits::default_body")]
    pub max_body: usize,
}

impl Limits {
    fn default_depth() -> usize {
        15
    }
    fn default_aliases() -> usize {
        30
    }
    fn default_root_fields() -> usize {
        20
    }
    fn default_tokens() -> usize {
        20_000
    }
    fn default_recursion() -> usize {
        64
    }
    fn default_batch() -> usize {
        10
    }
    fn default_body() -> usize {
        256 << 10
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: Self::default_depth(),
            max_aliases: Self::default_aliases(),
            max_root_fields: Self::default_root_fields(),
            max_tokens: Self::default_tokens(),
            max_recursion: Self::default_recursion(),
            max_batch: Self::default_batch(),
            max_body: Self::default_body(),
        }
    }
}

/// Which root type a field belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Root {
    Query,
    Mutation,
    Subscription,
}

impl Root {
    pub fn as_str(self) -> &'static str {
        match self {
            Root::Query => "query",
            Root::Mutation => "mutation",
            Root::Subscription => "subscription",
        }
    }
}

impl From<OperationType> for Root {
    fn from(kind: OperationType) -> Self {
        match kind {
            OperationType::Query => Root::Query,
            OperationType::Mutation => Root::Mutation,
            OperationType::Subscription => Root::Subscription,
        }
    }
}

/// One root field as the upstream will execute it.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub root: Root,
    pub field: String,
    /// The response key, when aliased (formatting: not part of what an approval binds).
    pub alias: Option<String>,
    /// Arguments as given (schema defaults are the upstream's business), variables
    /// substituted, keys sorted.
    pub arguments: BTreeMap<String, Value>,
}

/// Parses `request.query` against `schema`, selects its operation and lists its root-field
/// invocations.
pub fn invocations(
    schema: &Valid<Schema>,
    request: &GraphqlRequest,
    limits: &Limits,
) -> Result<(Root, Vec<Invocation>), Refusal> {
    let mut parser = Parser::new()
        .token_limit(limits.max_tokens)
        .recursion_limit(limits.max_recursion);
    let ast = parser.parse_ast(request.query.as_str(), "request.graphql");
    if parser.tokens_reached() >= limits.max_tokens {
        return Err(Refusal::ParserLimit("token"));
    }
    if parser.recursion_reached() >= limits.max_recursion {
        return Err(Refusal::ParserLimit("nesting"));
    }
    let ast = ast.map_err(|e| Refusal::Syntax(first_error(&e.errors)))?;
    let document = ast
        .to_executable_validate(schema)
        .map_err(|e| Refusal::Invalid(first_error(&e.errors)))?;
    let operation = document
        .operations
        .get(request.operation_name.as_deref())
        .map_err(|_| match &request.operation_name {
            Some(name) => Refusal::OperationUnknown(name.chars().take(100).collect()),
            None => Refusal::OperationAmbiguous,
        })?;
    let root = Root::from(operation.operation_type);
    if root == Root::Subscription {
        return Err(Refusal::Subscription);
    }
    let aliases = count_aliases(&document);
    if aliases > limits.max_aliases {
        return Err(Refusal::TooManyAliases(aliases, limits.max_aliases));
    }
    let mut depths = HashMap::new();
    let depth = depth(&document, &operation.selection_set, &mut depths, 0);
    if depth > limits.max_depth {
        return Err(Refusal::TooDeep(depth, limits.max_depth));
    }
    let values: JsonMap = serde_json::from_value(Value::Object(request.variables.clone()))
        .map_err(|e| Refusal::Variables(e.to_string()))?;
    let coerced = apollo_compiler::request::coerce_variable_values(schema, operation, &values)
        .map_err(|e| Refusal::Variables(e.message().to_string()))?;
    let variables: Map<String, Value> = serde_json::to_value(coerced.into_inner())
        .ok()
        .and_then(|v| match v {
            Value::Object(map) => Some(map),
            _ => None,
        })
        .ok_or_else(|| Refusal::Variables("variables did not coerce to an object".into()))?;
    let mut found = Vec::new();
    collect_root(
        &document,
        &operation.selection_set,
        root,
        &variables,
        limits.max_root_fields,
        0,
        &mut found,
    )?;
    Ok((root, found))
}

fn first_error(errors: &apollo_compiler::validation::DiagnosticList) -> String {
    let message = errors
        .iter()
        .next()
        .map(|d| d.error.to_string())
        .unwrap_or_else(|| "unknown error".into());
    message.chars().take(300).collect()
}

/// Aliases written in the document (each once, however often its fragment is spread: the
/// point is to bound what one field may be asked for under many names).
fn count_aliases(document: &ExecutableDocument) -> usize {
    fn walk(set: &SelectionSet) -> usize {
        set.selections
            .iter()
            .map(|selection| match selection {
                Selection::Field(field) => {
                    usize::from(field.alias.is_some()) + walk(&field.selection_set)
                }
                Selection::InlineFragment(inline) => walk(&inline.selection_set),
                Selection::FragmentSpread(_) => 0,
            })
            .sum()
    }
    let operations: usize = document
        .operations
        .iter()
        .map(|o| walk(&o.selection_set))
        .sum();
    let fragments: usize = document
        .fragments
        .values()
        .map(|f| walk(&f.selection_set))
        .sum();
    operations.saturating_add(fragments)
}

/// Depth with fragments expanded, each fragment's depth computed once (a document spreading
/// fragments into fragments would otherwise cost exponential time). Validation has already
/// refused fragment cycles; `guard` bounds the recursion anyway.
fn depth(
    document: &ExecutableDocument,
    set: &SelectionSet,
    fragments: &mut HashMap<String, usize>,
    guard: usize,
) -> usize {
    if guard > 256 {
        return usize::MAX;
    }
    let mut deepest = 0;
    for selection in &set.selections {
        let here = match selection {
            Selection::Field(field) if field.selection_set.selections.is_empty() => 1,
            Selection::Field(field) => {
                depth(document, &field.selection_set, fragments, guard + 1).saturating_add(1)
            }
            Selection::InlineFragment(inline) => {
                depth(document, &inline.selection_set, fragments, guard + 1)
            }
            Selection::FragmentSpread(spread) => {
                let name = spread.fragment_name.as_str();
                match fragments.get(name) {
                    Some(known) => *known,
                    None => {
                        let computed = document
                            .fragments
                            .get(name)
                            .map(|f: &Node<Fragment>| {
                                depth(document, &f.selection_set, fragments, guard + 1)
                            })
                            .unwrap_or(usize::MAX);
                        fragments.insert(name.to_owned(), computed);
                        computed
                    }
                }
            }
        };
        deepest = deepest.max(here);
    }
    deepest
}

/// The root fields of `set`, fragments and inline fragments expanded, in document order.
fn collect_root(
    document: &ExecutableDocument,
    set: &SelectionSet,
    root: Root,
    variables: &Map<String, Value>,
    max: usize,
    nesting: usize,
    found: &mut Vec<Invocation>,
) -> Result<(), Refusal> {
    if nesting > 64 {
        return Err(Refusal::TooDeep(nesting, 64));
    }
    for selection in &set.selections {
        match selection {
            Selection::Field(field) => {
                if found.len() >= max {
                    return Err(Refusal::TooManyRootFields(found.len() + 1, max));
                }
                let arguments = field
                    .arguments
                    .iter()
                    .map(|argument| {
                        (
                            argument.name.to_string(),
                            to_json(&argument.value, variables),
                        )
                    })
                    .collect();
                found.push(Invocation {
                    root,
                    field: field.name.to_string(),
                    alias: field.alias.as_ref().map(|a| a.to_string()),
                    arguments,
                });
            }
            Selection::InlineFragment(inline) => collect_root(
                document,
                &inline.selection_set,
                root,
                variables,
                max,
                nesting + 1,
                found,
            )?,
            Selection::FragmentSpread(spread) => {
                let fragment = document
                    .fragments
                    .get(spread.fragment_name.as_str())
                    .ok_or_else(|| {
                        Refusal::Invalid(format!("unknown fragment {}", spread.fragment_name))
                    })?;
                collect_root(
                    document,
                    &fragment.selection_set,
                    root,
                    variables,
                    max,
                    nesting + 1,
                    found,
                )?
            }
        }
    }
    Ok(())
}

/// A literal or variable, as JSON. Variables absent from the (coerced) request are null:
/// that is what the upstream executes with.
fn to_json(value: &AstValue, variables: &Map<String, Value>) -> Value {
    match value {
        AstValue::Null => Value::Null,
        AstValue::Enum(name) => Value::String(name.to_string()),
        AstValue::Variable(name) => variables.get(name.as_str()).cloned().unwrap_or(Value::Null),
        AstValue::String(text) => Value::String(text.clone()),
        AstValue::Float(float) => float
            .try_to_f64()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(float.as_str().to_owned())),
        AstValue::Int(int) => int
            .as_str()
            .parse::<i64>()
            .map(|i| Value::Number(i.into()))
            .unwrap_or_else(|_| Value::String(int.as_str().to_owned())),
        AstValue::Boolean(b) => Value::Bool(*b),
        AstValue::List(items) => {
            Value::Array(items.iter().map(|item| to_json(item, variables)).collect())
        }
        AstValue::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(name, value)| (name.to_string(), to_json(value, variables)))
                .collect(),
        ),
    }
}

/// JSON with object keys sorted at every level: the form approvals and policies see, so the
/// same arguments always read the same.
pub fn canonical(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let mut out = Map::new();
                for (key, value) in entries {
                    out.insert(key.clone(), sorted(value));
                }
                Value::Object(out)
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}
