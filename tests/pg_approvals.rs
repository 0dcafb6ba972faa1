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

/// An approval binds the whole statement, however long: two statements that share their first
/// 4096 characters are two operations (the digest once covered only that much).
#[tokio::test]
async fn an_approval_binds_all_of_a_long_statement() {
    let broker = Broker::start_custom("", APPROVE_WRITES).await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table_with(3).await;
    let token = write_token(&broker).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &token).await;
    let padding = "x".repeat(4200);
    let approved_sql = format!("DELETE FROM {t} WHERE v <> '{padding}' AND id = 1");
    let other_sql = format!("DELETE FROM {t} WHERE v <> '{padding}' OR id > 0");

    let asked = client
        .batch_execute(&approved_sql)
        .await
        .expect_err("a write needs approval");
    let message = db_message(&asked);
    let id = approval_id(&message).expect("approval id in the denial");
    let approved = approve_and_collect(&broker, &id, &token).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &approved).await;

    let attack = client
        .batch_execute(&other_sql)
        .await
        .expect_err("the other statement was not approved");
    let message = db_message(&attack);
    assert!(
        message.contains("needs an operator's approval"),
        "{message}"
    );
    assert_ne!(approval_id(&message).as_deref(), Some(id.as_str()));
    assert_eq!(rows(&t).await, 3, "nothing was deleted");

    client
        .batch_execute(&approved_sql)
        .await
        .expect("the approved statement runs");
    assert_eq!(rows(&t).await, 2);
}

/// A token of ops-bot (granted whatever it asks) for the staging database. It may also write
/// on the database itself (calls of functions not known to be pure are such writes): an
/// approval is only ever asked for a statement the token could otherwise run.
async fn ops_token(broker: &Broker) -> String {
    token_of(
        &broker
            .issue(
                OPS_KEY,
                &[
                    "pg://staging/:delete",
                    "pg://staging/:write",
                    "pg://staging:write",
                    "pg://staging/:read",
                ],
                None,
            )
            .await,
    )
}

/// Waits until approval `id` carries the proxy's preview, and returns its text.
async fn preview_of(broker: &Broker, id: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let body = approval(broker, id).await;
        if let Some(text) = body["preview"]["text"].as_str() {
            // Stamped by the broker with the adapter key's name (the test harness's one key).
            assert_eq!(body["preview"]["by"], "railway-proxy", "{body}");
            return text.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no preview attached: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Asks for `sql` (simple protocol), returns the approval id and the preview attached to it.
async fn ask(broker: &Broker, client: &tokio_postgres::Client, sql: &str) -> (String, String) {
    let denied = client.batch_execute(sql).await.expect_err("needs approval");
    let message = db_message(&denied);
    let id = approval_id(&message).unwrap_or_else(|| panic!("approval id in {message}"));
    let preview = preview_of(broker, &id).await;
    (id, preview)
}

/// "48,211 of 48,230 rows" -> (48211, 48230).
fn counts(preview: &str) -> (u64, u64) {
    let number = |s: &str| s.replace(',', "").parse::<u64>().expect(preview);
    let (matched, rest) = preview.split_once(" of ").expect(preview);
    (number(matched), number(rest.trim_end_matches(" rows")))
}

/// Rows a simple-protocol statement reports changed.
async fn changed(client: &tokio_postgres::Client, sql: &str) -> u64 {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e)))
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .expect("a command tag")
}

/// The preview's count is the number of rows the statement changes once approved and run:
/// a plain DELETE, an UPDATE joined through a CTE (rows matched twice count once) with
/// extended-protocol parameters, and a DROP TABLE with its dependents.
#[tokio::test]
async fn the_preview_counts_what_the_approved_statement_then_changes() {
    let broker = Broker::start_custom(OPS_POLICY, APPROVE_WRITES).await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table_with(10).await;
    let u = table_with(4).await;
    let token = ops_token(&broker).await;
    let client = connect_when_ready(proxy.port, "ops-bot", &token).await;

    let delete = format!("DELETE FROM {t} WHERE id > 7");
    let (id, preview) = ask(&broker, &client, &delete).await;
    assert_eq!(preview, "3 of 10 rows");
    let approved = approve_and_collect(&broker, &id, &token).await;
    let retry = connect_when_ready(proxy.port, "ops-bot", &approved).await;
    assert_eq!(changed(&retry, &delete).await, counts(&preview).0);
    assert_eq!(rows(&t).await, 7);

    // u's rows 1..4 each appear twice in the join: the update still changes each t row once.
    let update = format!(
        "WITH k AS (SELECT id FROM {u} UNION ALL SELECT id FROM {u}) \
         UPDATE {t} SET v = 'x' FROM k WHERE {t}.id = k.id AND {t}.id % $1 = 0"
    );
    let denied = client
        .query_typed(&update, &[(&2i32, Type::INT4)])
        .await
        .expect_err("needs approval");
    let id = approval_id(&db_message(&denied)).expect("approval id");
    let preview = preview_of(&broker, &id).await;
    assert_eq!(preview, "2 of 7 rows");
    let approved = approve_and_collect(&broker, &id, &token).await;
    let retry = connect_when_ready(proxy.port, "ops-bot", &approved).await;
    let updated = retry
        .execute_typed(&update, &[(&2i32, Type::INT4)])
        .await
        .expect("the approved update runs");
    assert_eq!(updated, counts(&preview).0);

    let w = table_with(3).await;
    direct()
        .await
        .batch_execute(&format!("CREATE VIEW {w}_v AS SELECT id FROM {w}"))
        .await
        .expect("view");
    let drop = format!("DROP TABLE {w} CASCADE");
    let (_, preview) = ask(&broker, &client, &drop).await;
    assert!(
        preview.starts_with(&format!("DROP TABLE {w}: 3 rows; dependents: ")),
        "{preview}"
    );
    assert!(
        preview.contains(&format!("view {w}_v"))
            && preview.contains(&format!("constraint {w}_pkey")),
        "{preview}"
    );
}

/// Nothing the preview runs changes data: statements whose count could run a function with
/// effects (a user function, a volatile built-in, a trigger, a view calling a function) or
/// would not see what the statement does (row-level security) are not measured and say why,
/// and afterwards a direct connection finds every table as it was.
#[tokio::test]
async fn the_preview_never_changes_data() {
    let broker = Broker::start_custom(OPS_POLICY, APPROVE_WRITES).await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table_with(5).await;
    let with_trigger = table_with(2).await;
    let secured = table_with(2).await;
    let log = format!("{t}_log");
    let fx = format!("{t}_fx");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {log} (at timestamptz default now());
             CREATE FUNCTION {fx}() RETURNS boolean VOLATILE LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO {log} DEFAULT VALUES; RETURN true; END $$;
             CREATE VIEW {t}_calls AS SELECT id FROM {t} WHERE {fx}();
             CREATE FUNCTION {fx}_trg() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO {log} DEFAULT VALUES; RETURN OLD; END $$;
             CREATE TRIGGER audit_delete BEFORE DELETE ON {with_trigger}
               FOR EACH ROW EXECUTE FUNCTION {fx}_trg();
             ALTER TABLE {secured} ENABLE ROW LEVEL SECURITY;"
        ))
        .await
        .expect("setup");
    let before = |table: String| async move {
        direct()
            .await
            .query(&format!("SELECT id, v FROM {table} ORDER BY id"), &[])
            .await
            .expect("read")
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };
    let snapshot = (
        before(t.clone()).await,
        before(with_trigger.clone()).await,
        before(secured.clone()).await,
    );
    let token = ops_token(&broker).await;
    let client = connect_when_ready(proxy.port, "ops-bot", &token).await;
    let cases = [
        (
            format!("DELETE FROM {t} WHERE id = 1 AND {fx}()"),
            format!("not measured: the statement calls functions not known to be pure: {fx}"),
        ),
        (
            format!("UPDATE {t} SET v = 'y' WHERE txid_current() > 0"),
            "not measured: the statement calls functions not known to be pure: txid_current".into(),
        ),
        (
            format!("DELETE FROM {with_trigger} WHERE id = 1"),
            format!("not measured: {with_trigger} has triggers (audit_delete) that would also run"),
        ),
        (
            format!("DELETE FROM {t} WHERE id IN (SELECT id FROM {t}_calls)"),
            format!("not measured: view public.{t}_calls calls functions not known to be pure ({fx})"),
        ),
        (
            format!("DELETE FROM {secured}"),
            format!("not measured: {secured} has row-level security: a count here may not see what the statement would"),
        ),
        (format!("DELETE FROM {t} WHERE id > 3"), "2 of 5 rows".into()),
    ];
    for (sql, expected) in &cases {
        let (_, preview) = ask(&broker, &client, sql).await;
        assert_eq!(&preview, expected, "{sql}");
    }
    let (_, truncate) = ask(&broker, &client, &format!("TRUNCATE {t}")).await;
    assert!(
        truncate.starts_with(&format!("TRUNCATE {t}: 5 rows; dependents: ")),
        "{truncate}"
    );
    assert_eq!(
        (
            before(t.clone()).await,
            before(with_trigger.clone()).await,
            before(secured.clone()).await,
        ),
        snapshot,
        "no table changed"
    );
    assert_eq!(
        rows(&log).await,
        0,
        "the function and the trigger never ran"
    );
}

/// A statement is asked about whole: when one of its accesses is denied, no operator is asked
/// to approve another. Here the DELETE (a write on the table) would need an approval, but calling a function not
/// known to be pure also writes on the database itself, which deploy-bot's token does not
/// grant: the answer is that deny, and no approval request exists.
#[tokio::test]
async fn no_approval_is_asked_for_a_statement_the_token_could_never_run() {
    let broker = Broker::start_custom("", APPROVE_WRITES).await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table_with(3).await;
    let token = write_token(&broker).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &token).await;
    let denied = client
        .batch_execute(&format!(
            "DELETE FROM {t} WHERE id = 1 AND txid_current() > 0"
        ))
        .await
        .expect_err("the token does not grant writes on the database");
    let message = db_message(&denied);
    assert!(
        message.contains("denied write on pg://staging: policy_denied"),
        "{message}"
    );
    assert!(
        message.contains("because it calls txid_current"),
        "{message}"
    );
    assert!(approval_id(&message).is_none(), "{message}");
    let (status, approvals) = broker.get_as("/v1/approvals", OPERATOR_KEY).await;
    assert_eq!(status, 200, "{approvals}");
    assert_eq!(approvals, json!([]), "no operator is asked");
    assert_eq!(rows(&t).await, 3);
}
