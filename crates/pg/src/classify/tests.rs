//! One table of SQL -> expected accesses; adversarial rows say which attack they represent.

use super::*;

fn rel(name: &str) -> Object {
    Object::Relation {
        schema: "public".into(),
        name: name.into(),
    }
}

fn check(sql: &str, expected: &[(Verb, Object)]) {
    let statements =
        classify(sql, "public", &Limits::default()).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut actual: Vec<(Verb, Object)> = statements
        .iter()
        .flat_map(|s| s.accesses.iter().map(|a| (a.verb, a.object.clone())))
        .collect();
    actual.sort();
    actual.dedup();
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(actual, expected, "{sql}");
}

/// The highest verb on any object: what a grant must cover at least.
fn worst(sql: &str) -> Option<Verb> {
    classify(sql, "public", &Limits::default())
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .filter_map(Statement::max_verb)
        .max()
}

#[test]
fn plain_statements() {
    use Verb::*;
    check("SELECT * FROM bookings", &[(Read, rel("bookings"))]);
    check(
        "select a from public.bookings b join guests g on b.g = g.id",
        &[(Read, rel("bookings")), (Read, rel("guests"))],
    );
    check("SELECT 1", &[]);
    check("BEGIN; COMMIT", &[]);
    check(
        "INSERT INTO bookings VALUES (1)",
        &[(Write, rel("bookings"))],
    );
    check(
        "UPDATE bookings SET a = 1 WHERE id = 2",
        &[(Write, rel("bookings"))],
    );
    check(
        "DELETE FROM bookings WHERE id = 2",
        &[(Write, rel("bookings"))],
    );
    check("DELETE FROM bookings", &[(Delete, rel("bookings"))]);
    check(
        "TRUNCATE bookings, guests",
        &[(Delete, rel("bookings")), (Delete, rel("guests"))],
    );
    check("DROP TABLE bookings", &[(Delete, rel("bookings"))]);
    check(
        "DROP TABLE other.t",
        &[(
            Delete,
            Object::Relation {
                schema: "other".into(),
                name: "t".into(),
            },
        )],
    );
    check(
        "DROP SCHEMA s CASCADE",
        &[(Delete, Object::Schema("s".into()))],
    );
    check("DROP DATABASE test", &[(Delete, Object::Database)]);
    check(
        "ALTER TABLE bookings DROP COLUMN a",
        &[(Delete, rel("bookings"))],
    );
    check(
        "ALTER TABLE bookings ADD COLUMN a int",
        &[(Admin, rel("bookings"))],
    );
    check("CREATE TABLE t (a int)", &[(Admin, rel("t"))]);
    check(
        "GRANT ALL ON bookings TO x",
        &[(Admin, Object::Database), (Read, rel("bookings"))],
    );
    check("COPY bookings FROM STDIN", &[(Write, rel("bookings"))]);
    check("COPY bookings TO STDOUT", &[(Read, rel("bookings"))]);
    check(
        "SELECT * FROM bookings FOR UPDATE",
        &[(Write, rel("bookings"))],
    );
    check(
        "SELECT count(*), lower(name) FROM bookings WHERE now() > created",
        &[(Read, rel("bookings"))],
    );
    check("SHOW search_path", &[]);
    check("SET statement_timeout = 1000", &[]);
    check("EXPLAIN SELECT * FROM bookings", &[(Read, rel("bookings"))]);
    check("EXPLAIN DELETE FROM bookings", &[(Read, rel("bookings"))]);
    check("SELECT * FROM \"Bookings\"", &[(Read, rel("Bookings"))]);
    check("SELECT * FROM BOOKINGS", &[(Read, rel("bookings"))]);
}

/// Each row is an attack that must come out at least as dangerous as the verb given.
#[test]
fn hidden_destruction_is_found() {
    use Verb::*;
    let rows: &[(&str, Verb, &str)] = &[
        (
            "SELECT 1; DROP TABLE bookings",
            Delete,
            "DROP after a SELECT in one string",
        ),
        (
            "SELECT 1; /* harmless */ DROP TABLE bookings -- done",
            Delete,
            "behind comments",
        ),
        (
            "select 1;drop table \"T\"",
            Delete,
            "no spaces, quoted name",
        ),
        (
            "WITH d AS (DELETE FROM bookings RETURNING *) SELECT * FROM d",
            Delete,
            "data-modifying CTE",
        ),
        (
            "WITH d AS (UPDATE bookings SET a = 1 RETURNING *) SELECT 1",
            Write,
            "updating CTE",
        ),
        (
            "DO $$ BEGIN EXECUTE 'DROP TABLE bookings'; END $$",
            Admin,
            "DO block",
        ),
        (
            "PREPARE p AS DELETE FROM bookings",
            Delete,
            "prepared statement",
        ),
        (
            "EXPLAIN ANALYZE DELETE FROM bookings",
            Delete,
            "EXPLAIN ANALYZE executes",
        ),
        (
            "EXPLAIN (ANALYZE true) DELETE FROM bookings",
            Delete,
            "EXPLAIN ANALYZE option form",
        ),
        (
            "MERGE INTO bookings b USING guests g ON b.id = g.id WHEN MATCHED THEN DELETE",
            Delete,
            "MERGE THEN DELETE",
        ),
        (
            "CREATE RULE r AS ON SELECT TO t DO INSTEAD DELETE FROM bookings",
            Delete,
            "rule with a DELETE action",
        ),
        (
            "SELECT * INTO copy FROM bookings",
            Admin,
            "SELECT INTO creates a table",
        ),
        (
            "SELECT set_config('search_path', 'evil', false)",
            Admin,
            "set_config",
        ),
        ("SET ROLE postgres", Admin, "role change"),
        (
            "SET SESSION AUTHORIZATION postgres",
            Admin,
            "session authorization",
        ),
        ("SET search_path = evil", Admin, "search_path change"),
        (
            "SET standard_conforming_strings = off",
            Admin,
            "lexer change",
        ),
        ("SET client_encoding = 'SJIS'", Admin, "encoding change"),
        ("RESET ALL", Admin, "reset everything"),
        (
            "SET default_transaction_read_only = off",
            Admin,
            "undo read-only session",
        ),
        ("BEGIN READ WRITE", Admin, "read-write transaction"),
        (
            "START TRANSACTION READ WRITE",
            Admin,
            "read-write transaction",
        ),
        (
            "SET TRANSACTION READ WRITE",
            Admin,
            "read-write transaction",
        ),
        (
            "COPY bookings TO PROGRAM 'rm -rf /'",
            Admin,
            "COPY TO PROGRAM",
        ),
        (
            "COPY bookings FROM PROGRAM 'curl evil'",
            Admin,
            "COPY FROM PROGRAM",
        ),
        (
            "SELECT pg_terminate_backend(1)",
            Admin,
            "side effect in a select",
        ),
        (
            "SELECT * FROM bookings WHERE lo_unlink(1) > 0",
            Admin,
            "side effect in a WHERE",
        ),
        ("SELECT dblink_exec('x', 'drop table t')", Admin, "dblink"),
        ("SELECT my_cleanup()", Write, "user-defined function"),
        (
            "SELECT public.lower('x')",
            Write,
            "shadowed built-in in another schema",
        ),
        ("SELECT nextval('s')", Write, "sequence side effect"),
        (
            "SELECT (SELECT count(*) FROM (SELECT pg_terminate_backend(1)) x)",
            Admin,
            "nested subqueries",
        ),
        ("CALL proc()", Admin, "procedure call"),
        (
            "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
            Admin,
            "function definition",
        ),
        ("GRANT admin TO agent", Admin, "role grant"),
        ("VACUUM bookings", Admin, "maintenance"),
        ("LISTEN x; NOTIFY x", Write, "notify"),
        (
            "ALTER SYSTEM SET fsync = off",
            Admin,
            "server configuration",
        ),
    ];
    for (sql, at_least, attack) in rows {
        let verb = worst(sql);
        assert!(
            verb >= Some(*at_least),
            "{attack}: {sql} classified as {verb:?}, expected at least {at_least:?}"
        );
    }
    // The dollar-quoted string must not be mistaken for a DROP either way.
    assert_eq!(worst("SELECT $$;DROP TABLE bookings;$$"), None);
}

#[test]
fn backslash_quote_smuggling_is_parsed_as_postgres_does() {
    // With standard_conforming_strings=on (forced by the proxy) a backslash is an ordinary
    // character, so 'a\' is a complete string and the DROP that follows is a real statement.
    assert_eq!(
        worst("SELECT 'a\\'; DROP TABLE bookings; --'"),
        Some(Verb::Delete)
    );
}

#[test]
fn statements_are_split_with_their_own_text() {
    let statements =
        classify("SELECT 1; DELETE FROM t", "public", &Limits::default()).expect("parse");
    assert_eq!(statements.len(), 2);
    assert_eq!(statements[0].text, "SELECT 1");
    assert_eq!(statements[1].text, "DELETE FROM t");
    let prepared = classify(
        "PREPARE p (int) AS DELETE FROM t WHERE id = $1",
        "public",
        &Limits::default(),
    )
    .expect("parse");
    assert_eq!(prepared[0].names, Some(NameChange::Prepare("p".into())));
    assert_eq!(prepared[0].max_verb(), Some(Verb::Write));
    let executed = classify("EXECUTE p(1)", "public", &Limits::default()).expect("parse");
    assert_eq!(executed[0].executes, vec!["p".to_owned()]);
}

#[test]
fn limits_and_garbage_fail_closed() {
    let limits = Limits::default();
    let deep = format!("SELECT {}1{}", "(".repeat(10_000), ")".repeat(10_000));
    assert!(matches!(
        classify(&deep, "public", &limits),
        Err(ClassifyError::TooDeep { .. })
    ));
    let deeper = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    assert!(matches!(
        classify(&deeper, "public", &limits),
        Err(ClassifyError::TooDeep { .. })
    ));
    let allowed = format!("SELECT {}1{}", "(".repeat(90), ")".repeat(90));
    assert!(
        classify(&allowed, "public", &limits).is_ok(),
        "moderate nesting still classifies"
    );
    let big = "x".repeat(limits.max_query_bytes + 1);
    assert!(matches!(
        classify(&big, "public", &limits),
        Err(ClassifyError::TooLarge { .. })
    ));
    assert!(matches!(
        classify("DROP TABL bookings", "public", &limits),
        Err(ClassifyError::Parse(_))
    ));
    assert!(matches!(
        classify("SELECT 1\0; DROP TABLE t", "public", &limits),
        Err(ClassifyError::Parse(_))
    ));
}

/// Thousands of generated and mutated statements: never a panic, and anything that does not
/// parse is an error (the proxy denies it), never an allow.
#[test]
fn fuzzed_statements_never_panic() {
    let seeds = [
        "SELECT * FROM t WHERE a = 1",
        "DELETE FROM t",
        "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
        "DROP TABLE t; SELECT 1",
        "COPY t FROM STDIN",
        "SELECT f(1) FROM t FOR UPDATE",
    ];
    let mut next = capgate_test_support::xorshift(0x9E37_79B9_7F4A_7C15);
    let alphabet = b" ();'\"$-/*\\abcdefghijklmnopqrstuvwxyz0123456789,=<>";
    for i in 0..3000 {
        let seed = seeds[(next() % seeds.len() as u64) as usize];
        let mut bytes = seed.as_bytes().to_vec();
        for _ in 0..(next() % 6) {
            let at = (next() % (bytes.len() as u64 + 1)) as usize;
            let c = alphabet[(next() % alphabet.len() as u64) as usize];
            match next() % 3 {
                0 if at < bytes.len() => bytes[at] = c,
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, c),
            }
        }
        let sql = String::from_utf8_lossy(&bytes).into_owned();
        // An error is fine (the proxy denies); a result must be well formed.
        if let Ok(statements) = classify(&sql, "public", &Limits::default()) {
            assert!(
                statements
                    .iter()
                    .all(|s| !s.text.is_empty() || s.accesses.is_empty()),
                "{i}: {sql}"
            );
        }
    }
}

/// Ordered-set, window and statistical aggregates are built-ins without side effects: a
/// read that calls them is a read.
#[test]
fn pure_builtins_from_the_catalog_are_reads() {
    use Verb::*;
    for sql in [
        "SELECT rank() OVER (ORDER BY a), row_number() OVER (), dense_rank() OVER w FROM bookings WINDOW w AS (ORDER BY b)",
        "SELECT variance(a), stddev(a), stddev_samp(a), var_pop(a), corr(a, b), regr_slope(a, b) FROM bookings",
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a), mode() WITHIN GROUP (ORDER BY b) FROM bookings",
        "SELECT ntile(4) OVER (ORDER BY a), lag(a) OVER (ORDER BY a), first_value(a) OVER () FROM bookings",
        "SELECT pg_catalog.cume_dist() OVER (ORDER BY a), jsonb_path_query_array(j, '$.x') FROM bookings",
    ] {
        check(sql, &[(Read, rel("bookings"))]);
    }
}

/// Functions with side effects stay writes even where the catalog calls them stable or
/// immutable; user-defined functions are writes whatever they claim.
#[test]
fn impure_and_user_functions_are_at_least_writes() {
    for (sql, why) in [
        (
            "SELECT txid_current()",
            "assigns a transaction id (stable in the catalog)",
        ),
        (
            "SELECT pg_current_xact_id()",
            "assigns a transaction id (stable in the catalog)",
        ),
        (
            "SELECT query_to_xml('delete from t returning 1', true, true, '')",
            "runs SQL given as text",
        ),
        (
            "SELECT table_to_xml('secret', true, true, '')",
            "reads a table named in a string",
        ),
        ("SELECT pg_advisory_lock(1)", "takes a session lock"),
        ("SELECT nextval('s'), setval('s', 1)", "sequences"),
        ("SELECT pg_notify('c', 'x')", "notification"),
        ("SELECT setseed(0.5)", "changes the session's random state"),
        ("SELECT my_immutable_looking_function(1)", "user-defined"),
        (
            "SELECT public.rank() OVER ()",
            "a built-in name in another schema",
        ),
    ] {
        let verb = worst(sql);
        assert!(
            verb >= Some(Verb::Write),
            "{why}: {sql} classified as {verb:?}"
        );
    }
}

/// A statement that runs a prepared statement carries its own effect and the names it runs,
/// however deeply the EXECUTE is wrapped.
#[test]
fn wrappers_around_execute_keep_their_own_effect() {
    let limits = Limits::default();
    for (sql, own) in [
        ("CREATE TABLE made AS EXECUTE p", Some(Verb::Admin)),
        (
            "EXPLAIN ANALYZE CREATE TABLE made AS EXECUTE p",
            Some(Verb::Admin),
        ),
        (
            "EXPLAIN (ANALYZE, BUFFERS) CREATE UNLOGGED TABLE made AS EXECUTE p(1)",
            Some(Verb::Admin),
        ),
        ("EXPLAIN ANALYZE EXECUTE p", None),
        ("EXECUTE p", None),
    ] {
        let statements = classify(sql, "public", &limits).expect(sql);
        assert_eq!(statements[0].executes, vec!["p".to_owned()], "{sql}");
        assert_eq!(statements[0].max_verb(), own, "{sql}");
        assert!(!statements[0].plans_only, "{sql}");
    }
    let planned =
        classify("EXPLAIN CREATE TABLE made AS EXECUTE p", "public", &limits).expect("parse");
    assert!(planned[0].plans_only);
    for (sql, change) in [
        ("DEALLOCATE p", Some(NameChange::Deallocate("p".into()))),
        (
            "DEALLOCATE PREPARE p",
            Some(NameChange::Deallocate("p".into())),
        ),
        ("DEALLOCATE ALL", Some(NameChange::DeallocateAll)),
        ("DISCARD ALL", Some(NameChange::DeallocateAll)),
        ("DISCARD PLANS", None),
        ("DO $$ BEGIN END $$", Some(NameChange::Doubt)),
        ("CALL p()", Some(NameChange::Doubt)),
    ] {
        assert_eq!(
            classify(sql, "public", &limits).expect(sql)[0].names,
            change,
            "{sql}"
        );
    }
}
