//! The incident replay example, run as a test: the whole cascade is stopped and nothing is
//! deleted; the one delete that could ever be approved waits for an operator.

#[path = "../examples/incident_replay.rs"]
mod incident;

#[tokio::test]
async fn the_cascade_deletes_nothing() {
    let report = incident::run(true).await.expect("scenario runs");
    assert_eq!(
        report.infra.counts(),
        (2, 2),
        "every volume and backup survives"
    );
    let codes: Vec<(&str, u16, &str)> = report
        .steps
        .iter()
        .map(|s| (s.action.as_str(), s.status, s.code.as_str()))
        .collect();
    assert_eq!(codes[0], ("list volumes (prod)", 200, "allowed"));
    assert_eq!(
        (codes[1].1, codes[1].2),
        (403, "policy_denied"),
        "prod volume: not granted"
    );
    assert_eq!(
        (codes[2].1, codes[2].2),
        (403, "policy_denied"),
        "backups: not granted"
    );
    assert_eq!((codes[3].1, codes[3].2), (403, "policy_denied"));
    assert_eq!(
        (codes[4].1, codes[4].2),
        (403, "approval_required"),
        "staging delete waits for an operator"
    );
    assert_eq!(report.bookings, 50, "no booking was deleted");
    let mcp: Vec<(&str, &str)> = report
        .mcp_steps
        .iter()
        .map(|s| (s.action.as_str(), s.code.as_str()))
        .collect();
    assert_eq!(
        mcp,
        [
            ("list volumes (MCP tool)", "allowed"),
            ("delete the production volume (MCP tool)", "policy_denied"),
            ("delete the backups (MCP tool)", "policy_denied"),
        ],
        "the deletes fail as tool calls too"
    );
    let db: Vec<(&str, &str)> = report.steps[5..]
        .iter()
        .map(|s| (s.action.as_str(), s.code.as_str()))
        .collect();
    assert_eq!(db[0], ("read bookings (prod database)", "allowed"));
    assert!(
        db[1..].iter().all(|(_, code)| *code == "policy_denied"),
        "{db:?}"
    );
    let request = report
        .approval_request
        .expect("an approval request was created");
    assert_eq!(request["status"], "pending");
    assert_eq!(request["operation"]["detail"]["method"], "DELETE");
    assert_eq!(
        request["operation"]["resource"],
        "http://railway-staging/volumes/vol_staging"
    );
}

/// The same cascade in its real shape: GraphQL mutations at Railway's one endpoint.
#[tokio::test]
async fn the_graphql_cascade_deletes_nothing_and_asks_once() {
    if std::env::var_os("CAPGATE_RAILWAY_DATA").is_none()
        && !std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/railway/schema.json")
            .is_file()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "Railway data missing: CI must have it"
        );
        eprintln!("\n!!! SKIPPED: Railway data missing (set CAPGATE_RAILWAY_DATA) !!!\n");
        return;
    }
    let report = incident::run(true).await.expect("scenario runs");
    let graphql = &report.graphql;
    let codes: Vec<(&str, u16, &str)> = graphql
        .steps
        .iter()
        .map(|s| (s.action.as_str(), s.status, s.code.as_str()))
        .collect();
    assert_eq!(codes[0], ("list volumes", 200, "allowed"), "reads go on");
    assert_eq!(
        (codes[1].1, codes[1].2),
        (403, "policy_denied"),
        "the volume it took for staging's lives in production"
    );
    assert_eq!((codes[2].1, codes[2].2), (403, "policy_denied"), "backups");
    assert_eq!((codes[3].1, codes[3].2), (403, "policy_denied"), "backups");
    assert_eq!(
        (codes[4].1, codes[4].2),
        (403, "approval_required"),
        "a staging delete waits for an operator"
    );
    assert!(
        graphql.mutations_reaching_upstream.is_empty(),
        "{:?}",
        graphql.mutations_reaching_upstream
    );
    assert_eq!(graphql.counts, (3, 2), "every volume and backup survives");
    let request = graphql
        .approval_request
        .as_ref()
        .expect("one approval request");
    assert_eq!(request["status"], "pending");
    assert_eq!(
        request["operation"]["resource"],
        "railway://staging/volumes/vol_staging"
    );
    let detail = &request["operation"]["detail"];
    assert_eq!(detail["graphql_root"], "mutation");
    assert_eq!(detail["graphql_field"], "volumeDelete");
    assert_eq!(detail["graphql_argument:volumeId"], "\"vol_staging\"");
    assert_eq!(
        detail["environment"], "staging",
        "as the provider reported it"
    );
}
