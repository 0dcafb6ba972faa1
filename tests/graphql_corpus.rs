//! Railway's own traffic through the GraphQL adapter's judging path: the 133 documents its
//! CLI sends, with variables made from their declared types, against Railway's schema and
//! the rules of `examples/railway-graphql.toml`. Every document must parse and validate;
//! queries are reads; a mutation is either mapped or refused as unmapped, never defaulted.
//! Then the same path under mutated documents and request bodies: no panic, and never an
//! allowed mutation that no rule maps.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use apollo_compiler::schema::ExtendedType;
use apollo_compiler::Schema;
use capgate::adapters::graphql::{Endpoint, GraphqlConfig, Refusal, Upstream};
use capgate::scope::Verb;
use common::graphql::railway_data;
use common::repo;
use http::{HeaderName, HeaderValue, Method};
use serde_json::{json, Map, Value};

#[derive(serde::Deserialize)]
struct ExampleFile {
    graphql: Vec<GraphqlConfig>,
}

fn example(data: &Path) -> (GraphqlConfig, Endpoint) {
    let text = std::fs::read_to_string(repo().join("examples/railway-graphql.toml")).expect("read");
    let file: ExampleFile = toml::from_str(&text).expect("example parses");
    let mut config = file.graphql.into_iter().next().expect("one endpoint");
    config.schema = data.join("schema.json");
    let upstream = Upstream {
        url: "http://127.0.0.1:9/graphql/v2".into(),
        credential: (
            HeaderName::from_static("authorization"),
            HeaderValue::from_static("Bearer unused"),
        ),
        timeout: Duration::from_secs(1),
    };
    let endpoint = Endpoint::new(&config, Path::new("."), upstream).expect("example endpoint");
    (config, endpoint)
}

fn schema(data: &Path) -> apollo_compiler::validation::Valid<Schema> {
    capgate::adapters::graphql::load_schema(&data.join("schema.json")).expect("schema")
}

/// A value of a GraphQL input type, made up: ids are strings of safe characters.
fn sample(schema: &Schema, ty: &apollo_compiler::ast::Type, depth: usize) -> Value {
    use apollo_compiler::ast::Type;
    match ty {
        Type::List(inner) | Type::NonNullList(inner) => json!([sample(schema, inner, depth)]),
        Type::Named(name) | Type::NonNullNamed(name) => match name.as_str() {
            "Int" => json!(1),
            "Float" => json!(1.5),
            "Boolean" => json!(true),
            "String" | "ID" => json!("id_1"),
            other => match schema.types.get(other) {
                Some(ExtendedType::Enum(e)) => e
                    .values
                    .keys()
                    .next()
                    .map(|v| json!(v.as_str()))
                    .unwrap_or(Value::Null),
                Some(ExtendedType::InputObject(object)) if depth < 6 => {
                    let mut out = Map::new();
                    for (field, definition) in &object.fields {
                        if definition.ty.is_non_null() && definition.default_value.is_none() {
                            out.insert(
                                field.to_string(),
                                sample(schema, &definition.ty, depth + 1),
                            );
                        }
                    }
                    Value::Object(out)
                }
                Some(ExtendedType::Scalar(_)) => match other {
                    "DateTime" => json!("2026-01-01T00:00:00Z"),
                    "JSON" | "EnvironmentConfig" | "ServiceInstanceLimitsInput" => json!({}),
                    _ => json!("id_1"),
                },
                _ => Value::Null,
            },
        },
    }
}

fn variables_for(schema: &apollo_compiler::validation::Valid<Schema>, text: &str) -> Value {
    let document = apollo_compiler::ExecutableDocument::parse(schema, text, "doc.graphql")
        .map_err(|e| e.errors.to_string())
        .expect("parses");
    let mut variables = Map::new();
    for operation in document.operations.iter() {
        for variable in &operation.variables {
            if variable.ty.is_non_null() && variable.default_value.is_none() {
                variables.insert(variable.name.to_string(), sample(schema, &variable.ty, 0));
            }
        }
    }
    Value::Object(variables)
}

fn documents(data: &Path) -> Vec<(String, String)> {
    let mut docs: Vec<(String, String)> = std::fs::read_dir(data.join("operations"))
        .expect("operations")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "graphql"))
        .map(|p| {
            (
                p.file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                std::fs::read_to_string(&p).expect("read"),
            )
        })
        .collect();
    docs.sort();
    docs
}

fn mapped_mutations(config: &GraphqlConfig) -> BTreeSet<String> {
    config
        .fields
        .iter()
        .filter_map(|r| r.field.strip_prefix("Mutation.").map(str::to_owned))
        .collect()
}

#[test]
fn railways_own_documents_are_judged_as_configured() {
    let Some(data) = railway_data() else { return };
    let (config, endpoint) = example(&data);
    let schema = schema(&data);
    let mapped = mapped_mutations(&config);
    let docs = documents(&data);
    assert_eq!(docs.len(), 133, "the CLI's 133 documents");
    let (mut queries, mut mapped_docs, mut unmapped_docs) = (0, 0, Vec::new());
    let mut verbs: BTreeMap<String, String> = BTreeMap::new();
    for (name, text) in &docs {
        let body = json!({"query": text, "variables": variables_for(&schema, text)}).to_string();
        let judged = endpoint.judge(
            &Method::POST,
            Some("application/json"),
            None,
            body.as_bytes(),
        );
        let is_mutation = text.trim_start().starts_with("mutation");
        match judged {
            Ok(judged) if !is_mutation => {
                assert!(
                    judged.pending.iter().all(|p| p.verb == Verb::Read),
                    "{name}: a query that is not a read: {:?}",
                    judged.pending
                );
                queries += 1;
            }
            Ok(judged) => {
                for pending in &judged.pending {
                    assert!(
                        mapped.contains(&pending.field),
                        "{name}: {} allowed unmapped",
                        pending.field
                    );
                    verbs.insert(pending.field.clone(), pending.verb.to_string());
                }
                mapped_docs += 1;
            }
            Err(Refusal::UnmappedMutation(field)) if is_mutation => {
                assert!(
                    !mapped.contains(&field),
                    "{name}: {field} is mapped yet refused"
                );
                unmapped_docs.push(format!("{name} ({field})"));
            }
            Err(refusal) => panic!("{name}: refused {} ({refusal})", refusal.code()),
        }
    }
    println!(
        "Railway CLI documents: {} total, {queries} queries (all read), {mapped_docs} mutations mapped, {} mutations refused as unmapped",
        docs.len(),
        unmapped_docs.len()
    );
    println!("mapped: {verbs:?}");
    println!("refused as unmapped: {}", unmapped_docs.join(", "));
    assert_eq!(queries + mapped_docs + unmapped_docs.len(), docs.len());
    for (field, verb) in [
        ("volumeDelete", "delete"),
        ("volumeInstanceBackupDelete", "delete"),
        ("serviceDelete", "delete"),
        ("environmentDelete", "delete"),
        ("projectScheduleDelete", "delete"),
        ("environmentPatchCommit", "admin"),
    ] {
        assert_eq!(verbs.get(field).map(String::as_str), Some(verb), "{field}");
    }
}

/// Method, Content-Type, URL query and body of one request.
type Shape<'a> = (Method, Option<&'a str>, Option<String>, Vec<u8>);

#[test]
fn mutated_documents_never_panic_and_never_allow_an_unmapped_mutation() {
    let Some(data) = railway_data() else { return };
    let (config, endpoint) = example(&data);
    let schema = schema(&data);
    let mapped = mapped_mutations(&config);
    let mutation_fields: Vec<String> = schema
        .get_object("Mutation")
        .map(|m| m.fields.keys().map(|k| k.to_string()).collect())
        .unwrap_or_default();
    let docs = documents(&data);
    let mut next = common::xorshift(0x9e37_79b9_7f4a_7c15);
    let (mut allowed, mut refused) = (0usize, BTreeMap::<&str, usize>::new());
    let started = std::time::Instant::now();
    for round in 0..3000 {
        let (_, base) = &docs[(next() as usize) % docs.len()];
        let mut text = base.clone();
        match next() % 7 {
            // Swap a root field for a random mutation field.
            0 => {
                let field = &mutation_fields[(next() as usize) % mutation_fields.len()];
                text = format!("mutation {{ x{round}: {field} }}");
            }
            // Wrap the document's operation in a fragment on Mutation.
            1 => {
                let field = &mutation_fields[(next() as usize) % mutation_fields.len()];
                text =
                    format!("mutation {{ ...F }} fragment F on Mutation {{ {field}(id: \"a\") }}");
            }
            // Flip a byte.
            2 if !text.is_empty() => {
                let mut bytes = text.into_bytes();
                let at = (next() as usize) % bytes.len();
                bytes[at] = (next() % 128) as u8;
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            // Truncate.
            3 => {
                let cut = (next() as usize) % (text.len() + 1);
                text = text.chars().take(cut).collect();
            }
            // Splice two documents.
            4 => {
                let (_, other) = &docs[(next() as usize) % docs.len()];
                text.push_str(other);
            }
            // Nest deeply.
            5 => {
                let n = (next() % 200) as usize;
                text = format!("{}{}", "{ me ".repeat(n), "}".repeat(n));
            }
            _ => {}
        }
        let variables = apollo_compiler::ExecutableDocument::parse(&schema, text.as_str(), "d")
            .map(|_| variables_for(&schema, &text))
            .unwrap_or_else(|_| json!({}));
        let shapes: Vec<Shape> = vec![
            (
                Method::POST,
                Some("application/json"),
                None,
                json!({"query": text, "variables": variables})
                    .to_string()
                    .into_bytes(),
            ),
            (
                Method::POST,
                Some("application/graphql"),
                None,
                text.clone().into_bytes(),
            ),
            (
                Method::GET,
                None,
                Some(serde_urlencoded::to_string([("query", text.as_str())]).unwrap_or_default()),
                vec![],
            ),
            (
                Method::POST,
                Some("application/json"),
                None,
                json!([{"query": "{ me { id } }"}, {"query": text}])
                    .to_string()
                    .into_bytes(),
            ),
        ];
        for (method, content_type, query, body) in shapes {
            match endpoint.judge(&method, content_type, query.as_deref(), &body) {
                Ok(judged) => {
                    for pending in &judged.pending {
                        let root = pending
                            .attributes
                            .iter()
                            .find(|(k, _)| k == "graphql_root")
                            .map(|(_, v)| v.as_str());
                        if root == Some("mutation") && !pending.field.starts_with("__") {
                            assert!(
                                mapped.contains(&pending.field),
                                "unmapped mutation {} allowed from {text:?}",
                                pending.field
                            );
                        }
                        if method == Method::GET {
                            assert_ne!(root, Some("mutation"), "a mutation over GET: {text:?}");
                        }
                    }
                    allowed += 1;
                }
                Err(refusal) => *refused.entry(refusal.code()).or_default() += 1,
            }
        }
    }
    println!(
        "mutated requests: {allowed} judged, refused by code {refused:?}, in {:?}",
        started.elapsed()
    );
    assert!(refused.contains_key("graphql_unmapped_mutation"));
    assert!(refused.contains_key("graphql_syntax"));
}
