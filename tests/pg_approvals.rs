//! Approvals of SQL through the real `capgate proxy pg`, the real broker and the real
//! PostgreSQL: what an approval binds (the statement and the values it runs with).

mod common;

use common::pg::*;
use common::*;
use serde_json::{json, Value};
use tokio_postgres::types::Type;

/// Every write and delete needs an operator's approval.
const APPROVE_WRITES: &str = "[containment]\napproval_verbs = [\"write\", \"delete\"]\n";

/// Approves `id` as alice and collects the approved token for `token`'s session.
async fn approve_and_collect(broker: &Broker, id: &str, token: &str) -> String {
    let (status, approved) = broker
        .post_as(&format!("/v1/approvals/{id}/approve"), OPERATOR_KEY)
        .await;
    assert_eq!(
        (status, approved["status"].clone()),
        (200, json!("approved")),
        "{approved}"
    );
    let (status, grant) = broker
        .post_as(&format!("/v1/approvals/{id}/grant"), token)
        .await;
    assert_eq!(status, 200, "{grant}");
    grant["token"].as_str().expect("token").to_owned()
}

async fn approval(broker: &Broker, id: &str) -> Value {
    let (status, body) = broker
        .get_as(&format!("/v1/approvals/{id}"), OPERATOR_KEY)
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// An approval of an extended-protocol statement binds the parameter values of the Bind it
/// was asked for: approved for `id = 1`, `DELETE … WHERE id = $1` with 2 is another
/// operation, in one Parse/Bind/Execute batch or through a statement prepared earlier.
#[tokio::test]
async fn an_approval_binds_the_parameter_values_of_the_statement() {
    let broker = Broker::start_custom("", APPROVE_WRITES).await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table_with(3).await;
    let token = write_token(&broker).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &token).await;
    let sql = format!("DELETE FROM {t} WHERE id = $1");

    let asked = client
        .query_typed(&sql, &[(&1i32, Type::INT4)])
        .await
        .expect_err("a write needs approval");
    let message = db_message(&asked);
    assert!(
        message.contains("needs an operator's approval"),
        "{message}"
    );
    let id = approval_id(&message).expect("approval id in the denial");
    let approved = approve_and_collect(&broker, &id, &token).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &approved).await;

    // Another value, in one batch: refused, and a new request is made for it.
    let attack = client
        .query_typed(&sql, &[(&2i32, Type::INT4)])
        .await
        .expect_err("id = 2 was not approved");
    let message = db_message(&attack);
    assert!(
        message.contains("needs an operator's approval"),
        "{message}"
    );
    assert_ne!(approval_id(&message).as_deref(), Some(id.as_str()));
    // And through a statement prepared first (Parse, then Bind/Execute later).
    let prepared = client.prepare(&sql).await.expect("preparing runs nothing");
    let attack = client
        .execute(&prepared, &[&2i32])
        .await
        .expect_err("id = 2 was not approved");
    assert!(
        db_message(&attack).contains("needs an operator's approval"),
        "{attack:?}"
    );
    let left = direct()
        .await
        .query(&format!("SELECT id FROM {t} ORDER BY id"), &[])
        .await
        .expect("direct read");
    assert_eq!(
        left.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "nothing was deleted"
    );

    // The approved value runs, once.
    let deleted = client
        .query_typed(&sql, &[(&1i32, Type::INT4)])
        .await
        .expect("the approved statement runs");
    assert!(deleted.is_empty());
    assert_eq!(rows(&t).await, 2);
    let again = client
        .query_typed(&sql, &[(&1i32, Type::INT4)])
        .await
        .expect_err("single use");
    assert!(db_message(&again).contains("approval"), "{again:?}");

    // The approver saw the value the statement would run with.
    let requested = approval(&broker, &id).await;
    assert_eq!(requested["operation"]["detail"]["sql"], sql.as_str());
    assert_eq!(
        requested["operation"]["detail"]["parameters"], "$1 = 1 (int4, binary)",
        "{requested}"
    );
}
