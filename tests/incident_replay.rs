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
