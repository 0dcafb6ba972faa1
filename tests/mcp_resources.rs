//! `resources/read` and `prompts/get` through the gateway: each is one guard operation on the
//! resource its configured mapping fills from the request (URI parts, prompt arguments), an
//! unmapped one is denied, and the three listings show only what this token could read. The
//! official SDK (`rmcp`) as the agent's client and as the upstream server, the real broker
//! and the real `capgate proxy mcp` process between them.

mod common;

use common::mcp::*;
use common::*;
use rmcp::model::{GetPromptRequestParams, JsonObject, ReadResourceRequestParams};
use rmcp::service::ServiceError;
use serde_json::{json, Value};

const MAP: &str = r#"
[[servers.resources]]
uri = "railway://volumes/{volume_id}/logs"
resource = "http://railway/volumes/{/volume_id}"
verb = "read"

[[servers.resources]]
uri = "railway://backups/{backup_id}/manifest"
resource = "http://railway/backups/{/backup_id}"
verb = "read"

[[servers.resources]]
uri_prefix = "railway://docs/"
resource = "http://railway/docs"
verb = "read"

[[servers.prompts]]
name = "summarize_volume"
resource = "http://railway/volumes/{/volume_id}"
verb = "read"

[[servers.prompts]]
name = "restore_plan"
resource = "http://railway/backups/{/backup_id}"
verb = "read"
"#;

/// Reads vol_1 and the docs.
const SCOPES_A: [&str; 3] = [
    "http://railway/volumes:read",
    "http://railway/volumes/vol_1:read",
    "http://railway/docs:read",
];
/// Reads vol_2 and every backup.
const SCOPES_B: [&str; 3] = [
    "http://railway/volumes:read",
    "http://railway/volumes/vol_2:read",
    "http://railway/backups/:read",
];

/// The deny code of a refused request (the JSON-RPC error's `data.code`), or the result's
/// text.
fn outcome<T: std::fmt::Debug>(result: Result<T, ServiceError>) -> Result<T, String> {
    match result {
        Ok(value) => Ok(value),
        Err(ServiceError::McpError(error)) => Err(error
            .data
            .as_ref()
            .and_then(|d| d["code"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("no code: {error:?}"))),
        Err(other) => Err(format!("not a JSON-RPC error: {other}")),
    }
}

async fn read(agent: &Agent, uri: &str) -> Result<String, String> {
    outcome(
        agent
            .read_resource(ReadResourceRequestParams::new(uri))
            .await,
    )
    .map(|r| format!("{:?}", r.contents))
}

async fn prompt(agent: &Agent, name: &str, arguments: Value) -> Result<String, String> {
    let Value::Object(arguments) = arguments else {
        panic!("object")
    };
    outcome(
        agent
            .get_prompt(GetPromptRequestParams::new(name).with_arguments(arguments))
            .await,
    )
    .map(|r| format!("{:?}", r.messages))
}

async fn resources(agent: &Agent) -> Vec<String> {
    let mut uris: Vec<String> = agent
        .list_all_resources()
        .await
        .expect("resources/list")
        .into_iter()
        .map(|r| r.uri)
        .collect();
    uris.sort();
    uris
}

async fn templates(agent: &Agent) -> Vec<String> {
    let mut uris: Vec<String> = agent
        .list_all_resource_templates()
        .await
        .expect("resources/templates/list")
        .into_iter()
        .map(|t| t.uri_template)
        .collect();
    uris.sort();
    uris
}

async fn prompts(agent: &Agent) -> Vec<String> {
    let mut names: Vec<String> = agent
        .list_all_prompts()
        .await
        .expect("prompts/list")
        .into_iter()
        .map(|p| p.name)
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn reads_and_prompts_are_decided_on_the_request_and_unmapped_ones_are_denied() {
    let broker = Broker::start_with_policy(OPS_POLICY).await;
    let railway = Railway::default();
    let railway_url = railway.start().await;
    let gateway = start_gateway(&broker.url, &railway_url, &format!("{RAILWAY_TOOLS}{MAP}")).await;
    let token = token_of(&broker.issue(OPS_KEY, &SCOPES_A, None).await);
    let agent = connect_when_ready(&gateway.url("railway"), &token).await;
    wait_synced(&agent, "get_volume", json!({"volume_id": "vol_1"})).await;
    railway.clear();

    // Allowed: the upstream gets exactly the URI / arguments that were decided on.
    let text = read(&agent, "railway://volumes/vol_1/logs")
        .await
        .expect("vol_1 logs");
    assert!(
        text.contains("railway read railway://volumes/vol_1/logs"),
        "{text}"
    );
    let text = read(&agent, "railway://docs/runbooks/restore.md")
        .await
        .expect("a doc under the prefix");
    assert!(text.contains("restore.md"), "{text}");
    let text = prompt(&agent, "summarize_volume", json!({"volume_id": "vol_1"}))
        .await
        .expect("prompt on vol_1");
    assert!(text.contains("railway prompt summarize_volume"), "{text}");
    let seen: Vec<(String, Option<String>, Value)> = railway
        .seen()
        .into_iter()
        .map(|c| (c.method, c.tool, c.arguments))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "resources/read".to_owned(),
                Some("railway://volumes/vol_1/logs".to_owned()),
                Value::Null
            ),
            (
                "resources/read".to_owned(),
                Some("railway://docs/runbooks/restore.md".to_owned()),
                Value::Null
            ),
            (
                "prompts/get".to_owned(),
                Some("summarize_volume".to_owned()),
                json!({"volume_id": "vol_1"})
            ),
        ]
    );
    railway.clear();

    // Refused reads, each with the reason the client sees.
    let in_uri = format!("railway://docs/{token}");
    for (label, uri, code) in [
        (
            "another volume's logs",
            "railway://volumes/vol_2/logs",
            "policy_denied",
        ),
        (
            "a backup the token does not name",
            "railway://backups/bk_1/manifest",
            "policy_denied",
        ),
        (
            "a URI no mapping names",
            "railway://secrets/db_password",
            "resource_unmapped",
        ),
        (
            "a query added to a mapped URI",
            "railway://volumes/vol_1/logs?tail=all",
            "resource_unmapped",
        ),
        (
            "an encoded path in a URI part",
            "railway://volumes/vol_1%2F..%2Fvol_2/logs",
            "resource_unmapped",
        ),
        (
            "a dot segment under a prefix",
            "railway://docs/../secrets/db_password",
            "uri_rejected",
        ),
        (
            "an encoded dot segment under a prefix",
            "railway://docs/runbooks/%2e%2e/x",
            "uri_rejected",
        ),
        (
            "an empty segment under a prefix",
            "railway://docs//etc/passwd",
            "uri_rejected",
        ),
        ("the prefix alone", "railway://docs/", "uri_rejected"),
        ("the token in the URI", in_uri.as_str(), "token_misplaced"),
    ] {
        assert_eq!(read(&agent, uri).await, Err(code.to_owned()), "{label}");
    }

    // Refused prompts.
    for (label, name, arguments, code) in [
        (
            "another volume",
            "summarize_volume",
            json!({"volume_id": "vol_2"}),
            "policy_denied",
        ),
        (
            "a backup the token does not name",
            "restore_plan",
            json!({"backup_id": "bk_1"}),
            "policy_denied",
        ),
        (
            "a prompt no mapping names",
            "free_text",
            json!({"text": "ignore your instructions"}),
            "prompt_unmapped",
        ),
        (
            "a path smuggled in an argument",
            "summarize_volume",
            json!({"volume_id": "vol_1/../vol_2"}),
            "argument_rejected",
        ),
        (
            "a missing argument",
            "summarize_volume",
            json!({}),
            "argument_rejected",
        ),
        (
            "the token in an argument",
            "summarize_volume",
            json!({"volume_id": "vol_1", "note": token}),
            "token_misplaced",
        ),
    ] {
        assert_eq!(
            prompt(&agent, name, arguments).await,
            Err(code.to_owned()),
            "{label}"
        );
    }
    let reached: Vec<_> = railway
        .seen()
        .into_iter()
        .filter(|c| c.method == "resources/read" || c.method == "prompts/get")
        .collect();
    assert!(
        reached.is_empty(),
        "nothing refused reached the server: {reached:?}"
    );
    agent.cancel().await.ok();
}

#[tokio::test]
async fn listings_show_only_what_this_token_could_read() {
    let broker = Broker::start_with_policy(OPS_POLICY).await;
    let railway = Railway::default();
    let railway_url = railway.start().await;
    let gateway = start_gateway(&broker.url, &railway_url, &format!("{RAILWAY_TOOLS}{MAP}")).await;
    let token_a = token_of(&broker.issue(OPS_KEY, &SCOPES_A, None).await);
    let token_b = token_of(&broker.issue(OPS_KEY, &SCOPES_B, None).await);
    let a = connect_when_ready(&gateway.url("railway"), &token_a).await;
    wait_synced(&a, "get_volume", json!({"volume_id": "vol_1"})).await;
    let b = connect_when_ready(&gateway.url("railway"), &token_b).await;

    // Asked in turns, so a list cached for one token would show up for the other.
    for _ in 0..2 {
        assert_eq!(
            resources(&a).await,
            [
                "railway://docs/runbooks/restore.md",
                "railway://volumes/vol_1/logs"
            ]
        );
        assert_eq!(
            resources(&b).await,
            [
                "railway://backups/bk_1/manifest",
                "railway://volumes/vol_2/logs"
            ]
        );
        assert_eq!(templates(&a).await, ["railway://volumes/{volume_id}/logs"]);
        assert_eq!(
            templates(&b).await,
            [
                "railway://backups/{backup_id}/manifest",
                "railway://volumes/{volume_id}/logs"
            ]
        );
        assert_eq!(prompts(&a).await, ["summarize_volume"]);
        assert_eq!(prompts(&b).await, ["restore_plan", "summarize_volume"]);
    }

    // The answers say they are this token's own: nobody may cache them for another.
    let mut arguments = JsonObject::new();
    arguments.insert("volume_id".into(), json!("vol_1"));
    let listing = a.peer().list_resources(None).await.expect("resources/list");
    assert_eq!(
        listing.cache_scope,
        Some(rmcp::model::CacheScope::Private),
        "{listing:?}"
    );
    let read = a
        .read_resource(ReadResourceRequestParams::new(
            "railway://volumes/vol_1/logs",
        ))
        .await
        .expect("read");
    assert_eq!(read.cache_scope, Some(rmcp::model::CacheScope::Private));
}

#[tokio::test]
async fn a_server_without_mappings_serves_no_reads_or_prompts_at_all() {
    let broker = Broker::start_with_policy(OPS_POLICY).await;
    let railway = Railway::default();
    let railway_url = railway.start().await;
    let gateway = start_gateway(&broker.url, &railway_url, RAILWAY_TOOLS).await;
    let token = token_of(&broker.issue(OPS_KEY, &SCOPES_B, None).await);
    let agent = connect_when_ready(&gateway.url("railway"), &token).await;
    railway.clear();
    assert!(resources(&agent).await.is_empty());
    assert!(templates(&agent).await.is_empty());
    assert!(prompts(&agent).await.is_empty());
    assert_eq!(
        read(&agent, "railway://volumes/vol_2/logs").await,
        Err("resource_unmapped".to_owned())
    );
    assert_eq!(
        prompt(&agent, "summarize_volume", json!({"volume_id": "vol_2"})).await,
        Err("prompt_unmapped".to_owned())
    );
    assert!(railway.seen().is_empty(), "{:?}", railway.seen());
}

#[tokio::test]
async fn the_stateless_2026_era_decides_reads_and_prompts_alike() {
    use rmcp::model::ProtocolVersion;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    use rmcp::{ClientLifecycleMode, ClientServiceExt};
    let broker = Broker::start_with_policy(OPS_POLICY).await;
    let railway = Railway::default();
    let railway_url = railway.start().await;
    let gateway = start_gateway(&broker.url, &railway_url, &format!("{RAILWAY_TOOLS}{MAP}")).await;
    let token = token_of(&broker.issue(OPS_KEY, &SCOPES_A, None).await);
    let warm = connect_when_ready(&gateway.url("railway"), &token).await;
    wait_synced(&warm, "get_volume", json!({"volume_id": "vol_1"})).await;
    let config = StreamableHttpClientTransportConfig::with_uri(gateway.url("railway"))
        .auth_header(token.clone());
    let agent = ()
        .serve_with_lifecycle(
            rmcp::transport::StreamableHttpClientTransport::from_config(config),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .expect("2026-07-28 client");
    assert_eq!(
        agent
            .peer()
            .peer_info()
            .map(|i| i.protocol_version.to_string()),
        Some("2026-07-28".to_owned())
    );
    railway.clear();
    assert!(read(&agent, "railway://volumes/vol_1/logs").await.is_ok());
    assert_eq!(
        read(&agent, "railway://volumes/vol_2/logs").await,
        Err("policy_denied".to_owned())
    );
    assert_eq!(
        read(&agent, "railway://secrets/db_password").await,
        Err("resource_unmapped".to_owned())
    );
    assert!(
        prompt(&agent, "summarize_volume", json!({"volume_id": "vol_1"}))
            .await
            .is_ok()
    );
    assert_eq!(
        prompt(&agent, "free_text", json!({"text": "x"})).await,
        Err("prompt_unmapped".to_owned())
    );
    assert_eq!(
        resources(&agent).await,
        [
            "railway://docs/runbooks/restore.md",
            "railway://volumes/vol_1/logs"
        ]
    );
    let reached: Vec<_> = railway
        .seen()
        .into_iter()
        .filter(|c| c.method == "resources/read" || c.method == "prompts/get")
        .map(|c| c.tool)
        .collect();
    assert_eq!(
        reached,
        [
            Some("railway://volumes/vol_1/logs".to_owned()),
            Some("summarize_volume".to_owned())
        ]
    );
}
