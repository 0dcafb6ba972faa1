//! The GraphQL adapter end to end: the real broker and `capgate proxy http` binaries, the
//! endpoint of `examples/railway-graphql.toml` over Railway's real schema, and a recording
//! upstream that answers the adapter's environment lookups as Railway would. Every row sends
//! one shape of request and asserts the exact problem code and whether anything of it reached
//! the upstream.

mod common;

use std::time::{Duration, Instant};

use common::graphql::*;
use common::proxy::*;
use common::*;
use serde_json::{json, Value};

const GQL: &str = "/graphql/v2";

struct Setup {
    broker: Broker,
    upstream: GraphqlUpstream,
    proxy: ProxyProcess,
}

const CONTAINMENT: &str = r#"
[containment]
approval_verbs = ["delete"]
recovery_points = ["railway://prod/backups/", "railway://staging/backups/"]
"#;

async fn setup(edit: impl Fn(String) -> String) -> Option<Setup> {
    let data = railway_data()?;
    let broker = Broker::start_custom(OPS_POLICY, CONTAINMENT).await;
    let (upstream, up_port) = GraphqlUpstream::start().await;
    let endpoint = example_endpoint(&data, edit);
    let proxy = start_graphql_proxy(&broker.url, up_port, &endpoint).await;
    Some(Setup {
        broker,
        upstream,
        proxy,
    })
}

/// The token of the incident's agent: reads of the API, and changes in staging only.
async fn staging_token(broker: &Broker) -> String {
    token_of(
        &broker
            .issue(
                OPS_KEY,
                &[
                    "railway://prod/api/:read",
                    "railway://staging/volumes/:delete",
                    "railway://staging/volumes/:write",
                    "railway://staging/services/:delete",
                ],
                None,
            )
            .await,
    )
}

#[derive(Debug)]
struct Answer {
    status: u16,
    code: String,
    body: Value,
    approval_id: Option<String>,
}

async fn post(proxy: &ProxyProcess, token: &str, content_type: &str, body: String) -> Answer {
    let response = reqwest::Client::new()
        .post(format!("{}{GQL}", proxy.url))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("send");
    answer(response).await
}

async fn get(proxy: &ProxyProcess, token: &str, query: &str) -> Answer {
    let response = reqwest::Client::new()
        .get(format!(
            "{}{GQL}?{}",
            proxy.url,
            serde_urlencoded::to_string([("query", query)]).expect("encode")
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("send");
    answer(response).await
}

async fn answer(response: reqwest::Response) -> Answer {
    let approval_id = response
        .headers()
        .get("capgate-approval-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, body) = decode(response).await;
    Answer {
        status,
        code: body["code"].as_str().unwrap_or_default().to_owned(),
        body,
        approval_id,
    }
}

fn json_body(query: &str, variables: Value) -> String {
    json!({"query": query, "variables": variables}).to_string()
}

/// Waits until the proxy has synced keys and containment (a read passes).
async fn wait_ready(proxy: &ProxyProcess, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = post(
            proxy,
            token,
            "application/json",
            json_body("{ me { id } }", json!({})),
        )
        .await;
        if answer.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "proxy never allowed a read: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const DELETE_PROD: &str = r#"mutation { volumeDelete(volumeId: "vol_prod") }"#;

#[tokio::test]
async fn every_smuggling_shape_of_a_mutation_is_judged_and_denied_before_the_upstream() {
    let Some(s) = setup(|e| e).await else { return };
    let token = staging_token(&s.broker).await;
    wait_ready(&s.proxy, &token).await;
    s.upstream.clear();

    let many_roots: String = (0..21).map(|i| format!("r{i}: me {{ id }} ")).collect();
    let deep = format!(
        "{{ project(id: \"p\") {} }}",
        "{ volumes { edges { node { project ".repeat(4) + "{ id }" + &" } } } }".repeat(4)
    );
    let aliases: String = (0..31).map(|i| format!("a{i}: id ")).collect();
    let rows: Vec<(&str, &str, String, &str)> = vec![
        // (what, content type, body, expected code)
        ("JSON body", "application/json", json_body(DELETE_PROD, json!({})), "policy_denied"),
        ("application/graphql", "application/graphql", DELETE_PROD.into(), "policy_denied"),
        (
            "a batch: the query beside it does not go either",
            "application/json",
            json!([{"query": "{ me { id } }"}, {"query": DELETE_PROD}]).to_string(),
            "policy_denied",
        ),
        (
            "an alias beside an allowed-looking one",
            "application/json",
            json_body(
                r#"mutation { keep: volumeDelete(volumeId: "vol_staging") gone: volumeDelete(volumeId: "vol_prod") }"#,
                json!({}),
            ),
            "policy_denied",
        ),
        (
            "a named fragment on Mutation",
            "application/json",
            json_body(
                r#"mutation { ...F } fragment F on Mutation { volumeDelete(volumeId: "vol_prod") }"#,
                json!({}),
            ),
            "policy_denied",
        ),
        (
            "an inline fragment",
            "application/json",
            json_body(r#"mutation { ... on Mutation { volumeDelete(volumeId: "vol_prod") } }"#, json!({})),
            "policy_denied",
        ),
        (
            "@skip(if: true) still counts",
            "application/json",
            json_body(r#"mutation { volumeDelete(volumeId: "vol_prod") @skip(if: true) }"#, json!({})),
            "policy_denied",
        ),
        (
            "the id in a variable",
            "application/json",
            json_body(
                "mutation Gone($id: String!) { volumeDelete(volumeId: $id) }",
                json!({"id": "vol_prod"}),
            ),
            "policy_denied",
        ),
        (
            "the incident: a volume believed staging that lives in production too",
            "application/json",
            json_body(r#"mutation { volumeDelete(volumeId: "vol_shared") }"#, json!({})),
            "policy_denied",
        ),
        (
            "a volume whose environment nobody mapped",
            "application/json",
            json_body(r#"mutation { volumeDelete(volumeId: "vol_elsewhere") }"#, json!({})),
            "environment_unresolved",
        ),
        (
            "a volume the provider does not know",
            "application/json",
            json_body(r#"mutation { volumeDelete(volumeId: "vol_missing") }"#, json!({})),
            "environment_unresolved",
        ),
        (
            "an unmapped mutation is never defaulted",
            "application/json",
            json_body("mutation { userDelete }", json!({})),
            "graphql_unmapped_mutation",
        ),
        (
            "a mapped mutation hidden behind an unmapped one",
            "application/json",
            json_body(r#"mutation { twoFactorInfoDelete volumeDelete(volumeId: "vol_staging") }"#, json!({})),
            "graphql_unmapped_mutation",
        ),
        (
            "a backup is a recovery point",
            "application/json",
            json_body(
                r#"mutation { volumeInstanceBackupDelete(volumeInstanceId: "vi_staging", volumeInstanceBackupId: "bk_1") { workflowId } }"#,
                json!({}),
            ),
            "policy_denied",
        ),
        (
            "two operations and no operationName",
            "application/json",
            json_body("query A { me { id } } mutation B { volumeDelete(volumeId: \"vol_prod\") }", json!({})),
            "graphql_operation_ambiguous",
        ),
        (
            "operationName choosing the mutation",
            "application/json",
            json!({"query": "query A { me { id } } mutation B { volumeDelete(volumeId: \"vol_prod\") }", "operationName": "B"}).to_string(),
            "policy_denied",
        ),
        (
            "a persisted-query hash alone",
            "application/json",
            json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "ecf4edb46db40b5132295c0291d62fb65d6759a9eedfa4d5d612dd5ec54a6b38"}}}).to_string(),
            "graphql_persisted_query",
        ),
        ("a syntax error", "application/json", json_body("mutation { volumeDelete(", json!({})), "graphql_syntax"),
        (
            "a field the schema does not have",
            "application/json",
            json_body("mutation { volumeDestroy(volumeId: \"vol_prod\") }", json!({})),
            "graphql_invalid",
        ),
        (
            "a variable of the wrong type",
            "application/json",
            json_body("mutation G($id: String!) { volumeDelete(volumeId: $id) }", json!({"id": ["vol_prod"]})),
            "graphql_variables",
        ),
        ("introspection (denied by this config)", "application/json", json_body("{ __schema { types { name } } }", json!({})), "graphql_introspection"),
        ("21 root fields", "application/json", json_body(&format!("{{ {many_roots} }}"), json!({})), "graphql_too_many_root_fields"),
        ("17 levels deep", "application/json", json_body(&deep, json!({})), "graphql_too_deep"),
        ("31 aliases", "application/json", json_body(&format!("{{ me {{ {aliases} }} }}"), json!({})), "graphql_too_many_aliases"),
        ("a subscription", "application/json", json_body("subscription { buildLogs(deploymentId: \"d\") { message } }", json!({})), "graphql_subscription"),
        (
            "the token in a variable",
            "application/json",
            json_body(
                "mutation G($n: String) { volumeUpdate(volumeId: \"vol_staging\", input: { name: $n }) { id } }",
                json!({"n": token.clone()}),
            ),
            "token_misplaced",
        ),
        ("text/plain", "text/plain", DELETE_PROD.into(), "graphql_content_type"),
    ];
    for (what, content_type, body, code) in &rows {
        let answer = post(&s.proxy, &token, content_type, body.clone()).await;
        assert_eq!(answer.code, *code, "{what}: {answer:?}");
        assert!(answer.status >= 400, "{what}: {answer:?}");
        assert!(s.upstream.seen().is_empty(), "{what}: reached the upstream");
    }

    // GET may carry only queries.
    let answer = get(&s.proxy, &token, DELETE_PROD).await;
    assert_eq!(answer.code, "graphql_mutation_over_get", "{answer:?}");

    // A chunked body is read whole before it is judged.
    let body = json_body(DELETE_PROD, json!({}));
    let chunked = format!(
        "POST {GQL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        10,
        &body[..10],
        body.len() - 10,
        &body[10..]
    );
    assert_eq!(raw(s.proxy.port, &chunked).await, 403, "chunked mutation");
    assert!(
        s.upstream.seen().is_empty(),
        "the chunked mutation reached the upstream"
    );

    // A forged token never makes the adapter spend its credential on a lookup.
    s.upstream.clear();
    let answer = post(
        &s.proxy,
        "not-a-token",
        "application/json",
        json_body(DELETE_PROD, json!({})),
    )
    .await;
    assert_eq!(
        (answer.status, answer.code.as_str()),
        (401, "token_malformed")
    );
    assert!(
        s.upstream.lookups().is_empty(),
        "looked up for a forged token"
    );
}

#[tokio::test]
async fn reads_reach_the_upstream_as_judged_with_its_credential_never_the_token() {
    let Some(s) = setup(|e| e).await else { return };
    let token = staging_token(&s.broker).await;
    wait_ready(&s.proxy, &token).await;
    s.upstream.clear();

    let allowed: Vec<(&str, Answer)> = vec![
        ("JSON", post(&s.proxy, &token, "application/json", json_body("query Me { me { id name } }", json!({}))).await),
        ("application/graphql", post(&s.proxy, &token, "application/graphql", "{ me { id } }".into()).await),
        ("GET", get(&s.proxy, &token, "{ projects { edges { node { id } } } }").await),
        ("__typename", post(&s.proxy, &token, "application/json", json_body("{ __typename }", json!({}))).await),
        (
            "a batch of reads",
            post(&s.proxy, &token, "application/json", json!([{"query": "{ me { id } }"}, {"query": "{ regions { name } }"}]).to_string()).await,
        ),
        (
            "operationName choosing the query",
            post(&s.proxy, &token, "application/json", json!({"query": "query A { me { id } } mutation B { volumeDelete(volumeId: \"vol_prod\") }", "operationName": "A"}).to_string()).await,
        ),
    ];
    for (what, answer) in &allowed {
        assert_eq!(answer.status, 200, "{what}: {answer:?}");
    }
    let seen = s.upstream.seen();
    assert_eq!(seen.len(), allowed.len(), "{seen:?}");
    for request in &seen {
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header("authorization").as_deref(),
            Some(format!("Bearer {UPSTREAM_SECRET}").as_str())
        );
        assert!(
            request
                .headers
                .iter()
                .all(|(_, v)| !v.contains(&token[..40]))
                && !String::from_utf8_lossy(&request.body).contains(&token[..40])
                && !request.path.contains(&token[..40]),
            "the token reached the upstream"
        );
    }
    // What reaches the upstream is the adapter's encoding of what it judged.
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        serde_json::from_slice::<Value>(&seen[0].body).expect("json"),
        json!({"query": "query Me { me { id name } }"})
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&seen[1].body).expect("json"),
        json!({"query": "{ me { id } }"}),
        "application/graphql is forwarded as JSON"
    );
    assert_eq!(seen[2].method, "GET");
    assert!(
        seen[2].path.starts_with("/graphql/v2?query="),
        "{}",
        seen[2].path
    );
    assert!(serde_json::from_slice::<Value>(&seen[4].body)
        .expect("json")
        .is_array());
}

#[tokio::test]
async fn introspection_is_allowed_when_configured_and_read_as_the_schema_resource() {
    let Some(s) =
        setup(|e| e.replace("introspection = \"deny\"", "introspection = \"allow\"")).await
    else {
        return;
    };
    let token = staging_token(&s.broker).await;
    wait_ready(&s.proxy, &token).await;
    s.upstream.clear();
    let answer = post(
        &s.proxy,
        &token,
        "application/json",
        json_body("{ __schema { queryType { name } } }", json!({})),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(s.upstream.seen().len(), 1);
    // A token without the schema resource is refused by the guard, not by the parser.
    let narrow = token_of(
        &s.broker
            .issue(OPS_KEY, &["railway://prod/api/me:read"], None)
            .await,
    );
    let answer = post(
        &s.proxy,
        &narrow,
        "application/json",
        json_body("{ __schema { queryType { name } } }", json!({})),
    )
    .await;
    assert_eq!(answer.code, "policy_denied", "{answer:?}");
}

#[tokio::test]
async fn approvals_bind_the_normalised_operation_and_its_resolved_environment() {
    let Some(s) = setup(|e| e).await else { return };
    let token = staging_token(&s.broker).await;
    wait_ready(&s.proxy, &token).await;
    s.upstream.clear();

    let asked = post(
        &s.proxy,
        &token,
        "application/json",
        json_body(
            r#"mutation { volumeDelete(volumeId: "vol_staging") }"#,
            json!({}),
        ),
    )
    .await;
    assert_eq!(asked.code, "approval_required", "{asked:?}");
    let id = asked.approval_id.clone().expect("approval id");
    assert!(s.upstream.seen().is_empty());

    // The operator sees the exact mutation and the environment the provider reported.
    let (_, listed) = s.broker.get_as("/v1/approvals", OPERATOR_KEY).await;
    let request = listed
        .as_array()
        .expect("list")
        .iter()
        .find(|a| a["id"] == id.as_str())
        .expect("listed")
        .clone();
    assert_eq!(
        request["operation"]["resource"],
        "railway://staging/volumes/vol_staging"
    );
    assert_eq!(request["operation"]["verb"], "delete");
    assert_eq!(
        request["operation"]["detail"]["graphql_field"],
        "volumeDelete"
    );
    assert_eq!(
        request["operation"]["detail"]["graphql_argument:volumeId"],
        "\"vol_staging\""
    );
    assert_eq!(request["operation"]["detail"]["environment"], "staging");

    let (status, _) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    assert_eq!(status, 200);
    let (status, grant) = s
        .broker
        .post_as(&format!("/v1/approvals/{id}/grant"), &token)
        .await;
    assert_eq!(status, 200, "{grant}");
    let approved = grant["token"].as_str().expect("token").to_owned();

    // Another operation never uses it: another volume, or the same call in a batch with more.
    let other = post(
        &s.proxy,
        &approved,
        "application/json",
        json_body(
            r#"mutation { volumeDelete(volumeId: "vol_staging2") }"#,
            json!({}),
        ),
    )
    .await;
    assert_eq!(other.code, "approval_required", "{other:?}");
    assert_ne!(other.approval_id.as_deref(), Some(id.as_str()));
    assert!(s.upstream.seen().is_empty());

    // The same operation, formatted differently (alias, variables, operation name): allowed once.
    let reformatted = json_body(
        "mutation Cleanup($v: String!) {\n  removed: volumeDelete(volumeId: $v)\n}",
        json!({"v": "vol_staging"}),
    );
    let done = post(&s.proxy, &approved, "application/json", reformatted.clone()).await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(s.upstream.seen().len(), 1);
    let again = post(&s.proxy, &approved, "application/json", reformatted).await;
    assert_eq!(again.code, "approval_invalid", "{again:?}");
    assert!(
        again.body.to_string().contains("approval_used"),
        "{again:?}"
    );
    assert_eq!(s.upstream.seen().len(), 1, "an approval is used once");
}

#[tokio::test]
async fn environments_are_looked_up_once_per_ttl_with_the_adapters_credential() {
    let Some(s) =
        setup(|e| e.replace("environment_ttl = \"60s\"", "environment_ttl = \"1s\"")).await
    else {
        return;
    };
    let token = staging_token(&s.broker).await;
    wait_ready(&s.proxy, &token).await;
    s.upstream.clear();
    let update = |name: &str| {
        json_body(
            "mutation U($id: String!, $name: String!) { volumeUpdate(volumeId: $id, input: { name: $name }) { id } }",
            json!({"id": "vol_staging", "name": name}),
        )
    };
    for name in ["a", "b", "c"] {
        let answer = post(&s.proxy, &token, "application/json", update(name)).await;
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let lookups = s.upstream.lookups();
    assert_eq!(lookups.len(), 1, "cached within the TTL: {lookups:?}");
    assert_eq!(
        lookups[0]["authorization"],
        format!("Bearer {UPSTREAM_SECRET}"),
        "asked with the adapter's credential"
    );
    assert_eq!(
        lookups[0]["variables"],
        json!({"projectId": "project-id"}),
        "only declared variables are sent"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answer = post(&s.proxy, &token, "application/json", update("d")).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(s.upstream.lookups().len(), 2, "asked again after the TTL");
    assert_eq!(s.upstream.seen().len(), 4);
}
