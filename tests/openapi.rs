//! openapi.yaml stays true to the code: it is valid OpenAPI 3, every `$ref` resolves, and the
//! set of (method, path) it describes is exactly the broker's route table.

use std::collections::BTreeSet;

use openapiv3::{OpenAPI, ReferenceOr};

fn spec_text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml")
}

#[test]
fn openapi_yaml_is_valid_openapi_3() {
    let spec: OpenAPI = serde_yaml::from_str(&spec_text()).expect("openapi.yaml is OpenAPI 3");
    assert!(spec.openapi.starts_with("3."), "version {}", spec.openapi);
    for (path, item) in spec.paths.paths.iter() {
        let ReferenceOr::Item(item) = item else {
            panic!("{path}: path refs are not used")
        };
        for (method, operation) in item.iter() {
            assert!(
                !operation.responses.responses.is_empty(),
                "{method} {path} has no responses"
            );
            assert!(
                operation.operation_id.is_some(),
                "{method} {path} has no operationId"
            );
        }
    }
}

#[test]
fn every_ref_resolves() {
    let raw: serde_yaml::Value = serde_yaml::from_str(&spec_text()).expect("yaml");
    let mut refs = Vec::new();
    collect_refs(&raw, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let pointer = reference
            .strip_prefix("#/")
            .unwrap_or_else(|| panic!("external ref {reference}"));
        let mut node = &raw;
        for part in pointer.split('/') {
            node = node
                .get(part)
                .unwrap_or_else(|| panic!("dangling $ref {reference}"));
        }
    }
}

fn collect_refs(value: &serde_yaml::Value, out: &mut Vec<String>) {
    match value {
        serde_yaml::Value::Mapping(map) => {
            for (key, value) in map {
                if key.as_str() == Some("$ref") {
                    if let Some(reference) = value.as_str() {
                        out.push(reference.to_owned());
                    }
                }
                collect_refs(value, out);
            }
        }
        serde_yaml::Value::Sequence(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[test]
fn spec_and_router_describe_the_same_routes() {
    let spec: OpenAPI = serde_yaml::from_str(&spec_text()).expect("openapi");
    let documented: BTreeSet<(String, String)> = spec
        .paths
        .paths
        .iter()
        .flat_map(|(path, item)| {
            let ReferenceOr::Item(item) = item else {
                return vec![];
            };
            item.iter()
                .map(|(method, _)| (method.to_ascii_uppercase(), path.clone()))
                .collect()
        })
        .collect();
    let served: BTreeSet<(String, String)> = capgate::broker::route_table()
        .into_iter()
        .map(|(method, path, _)| (method.to_string(), path.to_owned()))
        .collect();
    assert_eq!(documented, served, "openapi.yaml and the router disagree");
}
