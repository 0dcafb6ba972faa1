//! openapi.yaml stays true to the code: it is valid OpenAPI 3, every `$ref` resolves, the set
//! of (method, path) it describes is exactly the broker's route table, and the bounds and
//! refusals it states are the running broker's (scripts/schemathesis.sh checks the rest).

mod common;

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

/// Every route that reads a JSON body documents what any JSON body can be refused with:
/// 400 (malformed, unknown field), 413 (too large), 415 (not JSON) and 422 (wrong type or
/// value). Schemathesis found these answers undocumented on several routes.
#[test]
fn every_json_body_route_documents_its_body_refusals() {
    let spec: OpenAPI = serde_yaml::from_str(&spec_text()).expect("openapi");
    let mut missing = Vec::new();
    for (path, item) in spec.paths.paths.iter() {
        let ReferenceOr::Item(item) = item else {
            continue;
        };
        for (method, operation) in item.iter() {
            let Some(ReferenceOr::Item(body)) = &operation.request_body else {
                continue;
            };
            if !body.content.contains_key("application/json") {
                continue;
            }
            for code in [400, 413, 415, 422] {
                let documented = operation
                    .responses
                    .responses
                    .contains_key(&openapiv3::StatusCode::Code(code));
                if !documented {
                    missing.push(format!("{method} {path}: {code}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "undocumented body refusals: {missing:?}"
    );
}

/// Query bounds the description states are the server's: outside them is a 400
/// `invalid_query`, not a quietly clamped answer (schemathesis: `limit=10001` was accepted,
/// `wait=47965` long-polled).
#[tokio::test]
async fn query_values_outside_the_documented_bounds_are_refused() {
    let broker = common::Broker::start().await;
    for path in ["/v1/audit?limit=10001", "/v1/audit?limit=0"] {
        let (status, body) = broker.get_as(path, common::OPERATOR_KEY).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid_query")),
            "{path}: {body}"
        );
    }
    let (status, body) = broker.get("/v1/revocations?wait=31").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_query")),
        "wait=31: {body}"
    );
    // The bounds themselves are accepted.
    let (status, body) = broker
        .get_as("/v1/audit?limit=10000", common::OPERATOR_KEY)
        .await;
    assert_eq!(status, 200, "limit=10000: {body}");
    let (status, body) = broker.get("/v1/revocations?wait=0").await;
    assert_eq!(status, 200, "wait=0: {body}");
}

/// Lengths in the description count characters (JSON Schema's `maxLength`); the server counts
/// the same way (schemathesis: a 64-character session id of multi-byte characters was refused).
#[tokio::test]
async fn revocation_lengths_count_characters_as_the_description_does() {
    let broker = common::Broker::start().await;
    let session = "é".repeat(64);
    let reason = "é".repeat(1024);
    let (status, body) = broker
        .post_json(
            "/v1/revocations",
            Some(common::OPERATOR_KEY),
            serde_json::json!({"kind": "session", "value": session, "reason": reason}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = broker
        .post_json(
            "/v1/revocations",
            Some(common::OPERATOR_KEY),
            serde_json::json!({"kind": "session", "value": "é".repeat(65)}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_revocation")),
        "{body}"
    );
}

/// An adapter's decision must carry an object as `detail`, as the description says: an array
/// was stored and then served by `GET /v1/audit` in breach of its own response schema
/// (schemathesis).
#[tokio::test]
async fn an_audit_event_whose_detail_is_not_an_object_is_refused() {
    let broker = common::Broker::start().await;
    let (status, body) = broker
        .post_json(
            "/v1/audit",
            Some(common::ADAPTER_KEY),
            serde_json::json!({"events": [{"kind": "decision", "actor": null, "detail": [null, null]}]}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_event")),
        "{body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("object")),
        "the refusal names the object requirement: {body}"
    );
}
