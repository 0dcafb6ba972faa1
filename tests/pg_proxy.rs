//! The PostgreSQL adapter against the real PostgreSQL on 127.0.0.1:5432 (database `test`),
//! through the real `capgate proxy pg` process and the real broker, with tokio-postgres and
//! the real `psql`. After every denied attempt a direct connection checks the data is intact.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::NoTls;

/// A fresh table with 3 rows; returns its name.
async fn table() -> String {
    let name = format!("capgate_t_{}", &capgate::token::random_id()[..12]);
    direct()
        .await
        .batch_execute(&format!("CREATE TABLE {name} (id int primary key, v text); INSERT INTO {name} VALUES (1,'a'),(2,'b'),(3,'c');"))
        .await
        .expect("create");
    name
}

#[tokio::test]
async fn reads_pass_and_writes_need_a_write_grant() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let read = read_token(&broker).await;
    let client = connect_when_ready(proxy.port, "reporting-bot", &read).await;
    let got = client
        .query(&format!("SELECT v FROM {t} ORDER BY id"), &[])
        .await
        .expect("read");
    assert_eq!(got.len(), 3);
    let denied = client
        .batch_execute(&format!("INSERT INTO {t} VALUES (4, 'd')"))
        .await
        .expect_err("write with a read token");
    assert_eq!(sqlstate(&denied).as_deref(), Some("42501"));
    assert!(
        denied.to_string().contains("policy_denied")
            || format!("{denied:?}").contains("policy_denied"),
        "{denied:?}"
    );
    // The session stays usable, and PostgreSQL itself runs it read-only.
    let row = client
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "on");
    assert_eq!(rows(&t).await, 3);

    let write = write_token(&broker).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &write).await;
    client
        .batch_execute(&format!("INSERT INTO {t} VALUES (4, 'd')"))
        .await
        .expect("write allowed");
    client
        .execute(
            &format!("UPDATE {t} SET v = $1 WHERE id = $2"),
            &[&"z", &1i32],
        )
        .await
        .expect("extended write");
    assert_eq!(rows(&t).await, 4);
    let row = client
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "off");
}

/// One row per way of hiding destruction; each is refused, the session survives, and the
/// table and its rows are intact afterwards.
#[tokio::test]
async fn destructive_statements_are_denied_however_they_are_hidden() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let write = write_token(&broker).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &write).await;
    // What every denial must say: the verb and resource the statement really has, and why.
    let deny_table = format!("denied delete on pg://staging/public.{t}: policy_denied");
    let deny_database = "denied delete on pg://staging: policy_denied".to_owned();
    let deny_admin = "denied admin on pg://staging: policy_denied".to_owned();
    let attacks = [
        ("drop table", format!("DROP TABLE {t}"), deny_table.clone()),
        (
            "drop database",
            "DROP DATABASE test".to_owned(),
            deny_database.clone(),
        ),
        ("truncate", format!("TRUNCATE {t}"), deny_table.clone()),
        (
            "delete without where",
            format!("DELETE FROM {t}"),
            deny_table.clone(),
        ),
        (
            "drop after a select",
            format!("SELECT 1; DROP TABLE {t}"),
            deny_table.clone(),
        ),
        (
            "behind comments",
            format!("/* cleanup */ SELECT 1; -- x\n DROP TABLE {t}"),
            deny_table.clone(),
        ),
        (
            "in a CTE",
            format!("WITH d AS (DELETE FROM {t} RETURNING *) SELECT count(*) FROM d"),
            deny_table.clone(),
        ),
        (
            "in a DO block",
            format!("DO $$ BEGIN EXECUTE 'DROP TABLE {t}'; END $$"),
            deny_admin.clone(),
        ),
        (
            "prepared statement",
            format!("PREPARE p AS DELETE FROM {t}"),
            deny_table.clone(),
        ),
        (
            "EXPLAIN ANALYZE",
            format!("EXPLAIN ANALYZE DELETE FROM {t}"),
            deny_table.clone(),
        ),
        (
            "backslash-quote smuggling",
            format!("SELECT 'a\\'; DROP TABLE {t}; --'"),
            deny_table.clone(),
        ),
        (
            "lexer change",
            "SET standard_conforming_strings = off".to_owned(),
            deny_admin.clone(),
        ),
        (
            "undo read-only",
            "SET default_transaction_read_only = off".to_owned(),
            deny_admin.clone(),
        ),
        (
            "role change",
            "SET ROLE postgres".to_owned(),
            deny_admin.clone(),
        ),
        (
            "side-effect function",
            "SELECT pg_terminate_backend(pg_backend_pid())".to_owned(),
            deny_admin.clone(),
        ),
        (
            "10k nested parentheses",
            format!("SELECT {}1{}", "(".repeat(10_000), ")".repeat(10_000)),
            "statement not classified (query nests 10000 levels deep".to_owned(),
        ),
        (
            "garbage",
            "DROP TABEL x".to_owned(),
            "statement not classified (query does not parse".to_owned(),
        ),
    ];
    for (attack, sql, reason) in &attacks {
        let error = client.batch_execute(sql).await.expect_err(attack);
        assert_eq!(
            sqlstate(&error).as_deref(),
            Some("42501"),
            "{attack}: {error:?}"
        );
        let message = db_message(&error);
        assert!(message.contains(reason.as_str()), "{attack}: {message}");
        assert_eq!(rows(&t).await, 3, "{attack}: rows intact");
        client
            .simple_query("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("{attack}: session unusable: {e}"));
    }
    // Extended protocol: preparing a destructive statement is refused, nothing reaches upstream.
    let error = client
        .prepare(&format!("DELETE FROM {t}"))
        .await
        .expect_err("extended prepare");
    assert_eq!(sqlstate(&error).as_deref(), Some("42501"));
    assert!(
        db_message(&error).contains(&deny_table),
        "{}",
        db_message(&error)
    );
    // Inside a transaction: the DROP is refused, the transaction goes on and rolls back.
    client.batch_execute("BEGIN").await.expect("begin");
    assert!(client
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .is_err());
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(rows(&t).await, 3);
    assert!(
        direct()
            .await
            .query_one(
                &format!("SELECT 1 FROM pg_tables WHERE tablename = '{t}'"),
                &[]
            )
            .await
            .is_ok(),
        "table exists"
    );
}

#[tokio::test]
async fn bad_tokens_cannot_log_in() {
    let broker = Broker::start().await;
    let other = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let good = read_token(&broker).await;
    connect_when_ready(proxy.port, "reporting-bot", &good).await;
    let short = token_of(
        &broker
            .issue(READER_KEY, &["pg://staging/:read"], Some(1))
            .await,
    );
    let foreign = token_of(&other.issue(READER_KEY, &["pg://staging/:read"], None).await);
    let mut tampered = good.clone().into_bytes();
    let at = tampered.len() - 30;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let revoked = read_token(&broker).await;
    let id = capgate::token::inspect(&revoked, None)
        .expect("inspect")
        .revocation_ids[0]
        .clone();
    broker.revoke("token", &id).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for (label, user, token) in [
        ("tampered", "reporting-bot", tampered.as_str()),
        ("expired", "reporting-bot", short.as_str()),
        ("other broker", "reporting-bot", foreign.as_str()),
        ("revoked", "reporting-bot", revoked.as_str()),
        ("wrong user for the token", "deploy-bot", good.as_str()),
    ] {
        let error = connect(proxy.port, user, token)
            .await
            .err()
            .unwrap_or_else(|| panic!("{label}: logged in"));
        assert!(
            matches!(sqlstate(&error).as_deref(), Some("28P01" | "28000")),
            "{label}: {error:?}"
        );
    }
    // A session opened before its token is revoked is stopped at the next statement.
    let victim = read_token(&broker).await;
    let client = connect_when_ready(proxy.port, "reporting-bot", &victim).await;
    let id = capgate::token::inspect(&victim, None)
        .expect("inspect")
        .revocation_ids[0]
        .clone();
    broker.revoke("token", &id).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while client.simple_query("SELECT 1").await.is_ok() {
        assert!(Instant::now() < deadline, "revoked session kept working");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn raw_startup(port: u16, parameters: &[(&str, &str)]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(&capgate::adapters::pg::wire::startup_packet(
            capgate::adapters::pg::wire::PROTOCOL_3_0,
            parameters,
        ))
        .await
        .expect("write");
    let mut reply = vec![0; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut reply))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    reply.truncate(n);
    reply
}

/// Opens a raw, logged-in session and returns the stream after the first ReadyForQuery.
async fn raw_session(port: u16, user: &str, token: &str) -> tokio::net::TcpStream {
    use capgate::adapters::pg::wire::{encode, read_message, startup_packet, PROTOCOL_3_0};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(&startup_packet(
            PROTOCOL_3_0,
            &[("user", user), ("database", "staging")],
        ))
        .await
        .expect("startup");
    let auth = read_message(&mut stream, 1 << 20)
        .await
        .expect("auth request");
    assert_eq!(auth.tag, b'R');
    let mut password = token.as_bytes().to_vec();
    password.push(0);
    stream
        .write_all(&encode(b'p', &password))
        .await
        .expect("password");
    loop {
        let message = read_message(&mut stream, 1 << 20)
            .await
            .expect("startup reply");
        assert_ne!(
            message.tag,
            b'E',
            "login failed: {:?}",
            String::from_utf8_lossy(&message.body)
        );
        if message.tag == b'Z' {
            return stream;
        }
    }
}

#[tokio::test]
async fn protocol_hygiene_refuses_each_trick_and_keeps_serving() {
    use capgate::adapters::pg::wire::{encode, read_message};
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let token = read_token(&broker).await;
    let bystander = connect_when_ready(proxy.port, "reporting-bot", &token).await;

    // Startup tricks are refused before any authentication.
    for (trick, parameters) in [
        (
            "options can carry -c settings",
            vec![
                ("user", "reporting-bot"),
                ("options", "-c standard_conforming_strings=off"),
            ],
        ),
        (
            "replication connection",
            vec![("user", "reporting-bot"), ("replication", "database")],
        ),
        (
            "other database",
            vec![("user", "reporting-bot"), ("database", "postgres")],
        ),
        (
            "non-UTF8 encoding",
            vec![("user", "reporting-bot"), ("client_encoding", "SJIS")],
        ),
    ] {
        let reply = raw_startup(proxy.port, &parameters).await;
        assert_eq!(
            reply.first(),
            Some(&b'E'),
            "{trick}: {:?}",
            String::from_utf8_lossy(&reply)
        );
    }

    // Fastpath function call: refused, session usable.
    let mut session = raw_session(proxy.port, "reporting-bot", &token).await;
    session
        .write_all(&encode(b'F', &[0, 0, 0x04, 0xd2, 0, 0, 0, 0, 0, 0]))
        .await
        .expect("fastpath");
    let error = read_message(&mut session, 1 << 20).await.expect("reply");
    assert_eq!(error.tag, b'E');
    assert!(String::from_utf8_lossy(&error.body).contains("fastpath"));
    assert_eq!(
        read_message(&mut session, 1 << 20)
            .await
            .expect("ready")
            .tag,
        b'Z'
    );
    let mut query = b"SELECT 1".to_vec();
    query.push(0);
    session
        .write_all(&encode(b'Q', &query))
        .await
        .expect("query");
    assert_eq!(
        read_message(&mut session, 1 << 20)
            .await
            .expect("row description")
            .tag,
        b'T'
    );

    // Oversize frame and unknown message type: refused, that session closed, others unaffected.
    let mut oversize = raw_session(proxy.port, "reporting-bot", &token).await;
    oversize
        .write_all(&[b'Q', 0x10, 0, 0, 0])
        .await
        .expect("write");
    assert_eq!(
        read_message(&mut oversize, 1 << 20)
            .await
            .map(|m| m.tag)
            .unwrap_or(b'E'),
        b'E'
    );
    let mut unknown = raw_session(proxy.port, "reporting-bot", &token).await;
    unknown
        .write_all(&encode(b'y', b"\0"))
        .await
        .expect("write");
    assert_eq!(
        read_message(&mut unknown, 1 << 20)
            .await
            .map(|m| m.tag)
            .unwrap_or(b'E'),
        b'E'
    );
    bystander
        .simple_query("SELECT 1")
        .await
        .expect("other sessions keep working");
}

#[tokio::test]
async fn cancels_reach_the_real_backend_only_with_the_proxy_minted_key() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let token = read_token(&broker).await;
    let client = connect_when_ready(proxy.port, "reporting-bot", &token).await;
    // Forged cancel keys do nothing.
    let cancel_token = client.cancel_token();
    let port = proxy.port;
    let sleeper =
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(3)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (pid, secret) in [(1i32, 1i32), (12345, -7)] {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut packet = 16i32.to_be_bytes().to_vec();
        packet.extend_from_slice(&capgate::adapters::pg::wire::CANCEL_REQUEST.to_be_bytes());
        packet.extend_from_slice(&pid.to_be_bytes());
        packet.extend_from_slice(&secret.to_be_bytes());
        stream.write_all(&packet).await.expect("forged cancel");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sleeper.is_finished(), "a forged key cancelled the query");
    // The genuine key (as the proxy minted it) cancels the real backend's query.
    let started = Instant::now();
    cancel_token.cancel_query(NoTls).await.expect("cancel");
    let result = sleeper.await.expect("join");
    let error = result.expect_err("query was cancelled");
    assert_eq!(sqlstate(&error).as_deref(), Some("57014"), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn psql_works_through_the_proxy() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let token = read_token(&broker).await;
    connect_when_ready(proxy.port, "reporting-bot", &token).await;
    let t = table().await;
    let psql = |sql: &str| {
        Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &proxy.port.to_string(),
                "-U",
                "reporting-bot",
                "-d",
                "staging",
                "-X",
                "-A",
                "-t",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &token)
            .env("PGSSLMODE", "prefer")
            .output()
            .expect("psql")
    };
    let ok = psql(&format!("SELECT count(*) FROM {t}"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "3");
    // Exploring the schema is reading: psql's describe commands work with a read token.
    for describe in [
        "\\dt".to_owned(),
        format!("\\d {t}"),
        "\\l".to_owned(),
        "\\dn".to_owned(),
        "\\df".to_owned(),
        "\\du".to_owned(),
    ] {
        let out = psql(&describe);
        assert!(
            out.status.success(),
            "{describe}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let described = psql(&format!("\\d {t}"));
    assert!(String::from_utf8_lossy(&described.stdout).contains("id"));
    // A function not known to be pure is a write, and the denial says which one.
    let impure = psql("SELECT txid_current()");
    assert!(!impure.status.success());
    assert!(
        String::from_utf8_lossy(&impure.stderr).contains("calls txid_current"),
        "{}",
        String::from_utf8_lossy(&impure.stderr)
    );
    let denied = psql(&format!("DROP TABLE {t}"));
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("capgate"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    assert_eq!(rows(&t).await, 3);
}

/// Thousands of generated and malformed messages: the proxy never crashes and never lets an
/// unclassifiable statement through.
#[tokio::test]
async fn malformed_traffic_never_crashes_the_proxy() {
    use capgate::adapters::pg::wire::{encode, read_message};
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let token = write_token(&broker).await;
    connect_when_ready(proxy.port, "deploy-bot", &token).await;
    let t = table().await;
    let mut next = xorshift(0x2545_F491_4F6C_DD1D);
    // Raw garbage at the startup phase.
    for _ in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .expect("connect");
        let len = (next() % 64) as usize;
        let garbage: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = stream.write_all(&garbage).await;
    }
    // Malformed and mutated queries inside a logged-in session.
    let mut session = raw_session(proxy.port, "deploy-bot", &token).await;
    let seeds = [
        format!("DELETE FROM {t}"),
        format!("DROP TABLE {t}"),
        format!("SELECT * FROM {t}"),
        format!("WITH x AS (DELETE FROM {t} RETURNING 1) SELECT 1"),
    ];
    for i in 0..2000 {
        let mut sql = seeds[(next() % 4) as usize].clone().into_bytes();
        for _ in 0..(next() % 4) {
            let at = (next() % (sql.len() as u64 + 1)) as usize;
            sql.insert(at, b" ;()'$-*"[(next() % 8) as usize]);
        }
        sql.push(0);
        session.write_all(&encode(b'Q', &sql)).await.expect("send");
        loop {
            let message = read_message(&mut session, 1 << 24)
                .await
                .unwrap_or_else(|e| panic!("{i}: session died: {e}"));
            if message.tag == b'Z' {
                break;
            }
        }
    }
    assert_eq!(rows(&t).await, 3, "no mutated DELETE or DROP got through");
    connect_when_ready(proxy.port, "deploy-bot", &token)
        .await
        .simple_query("SELECT 1")
        .await
        .expect("still serving");
}

#[tokio::test]
async fn a_write_over_the_row_budget_changes_nothing() {
    let policy = format!("{OPS_POLICY}row_budget(10) <- agent(\"ops-bot\");\n");
    let broker = Broker::start_custom(&policy, "").await;
    let proxy = start_pg_proxy(&broker).await;
    let name = format!("capgate_b_{}", &capgate::token::random_id()[..12]);
    direct()
        .await
        .batch_execute(&format!("CREATE TABLE {name} (id int primary key, v text); INSERT INTO {name} SELECT g, 'a' FROM generate_series(1, 100) g;"))
        .await
        .expect("create");
    let issued = broker
        .issue(
            OPS_KEY,
            &["pg://staging/:write", "pg://staging/:read"],
            None,
        )
        .await;
    let client = connect_when_ready(proxy.port, "ops-bot", &token_of(&issued)).await;
    let changed = || async {
        direct()
            .await
            .query_one(&format!("SELECT count(*) FROM {name} WHERE v <> 'a'"), &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1)
    };
    let error = client
        .batch_execute(&format!("UPDATE {name} SET v = 'x' WHERE true"))
        .await
        .expect_err("over budget");
    assert!(
        format!("{error:?}").contains("row budget exceeded"),
        "{error:?}"
    );
    assert_eq!(changed().await, 0, "rolled back: nothing changed");
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'y' WHERE id <= 5"))
        .await
        .expect("within budget");
    assert_eq!(changed().await, 5, "committed");
    // Inside an explicit transaction: a savepoint is rolled back, the transaction goes on.
    client.batch_execute("BEGIN").await.expect("begin");
    assert!(client
        .batch_execute(&format!("DELETE FROM {name} WHERE id > 0"))
        .await
        .is_err());
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'z' WHERE id = 100"))
        .await
        .expect("small write in the transaction");
    client.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(changed().await, 6);
    assert_eq!(
        rows(&name).await,
        100,
        "the over-budget DELETE changed nothing"
    );
}

#[test]
fn the_example_pg_config_loads() {
    let config = capgate::adapters::pg::PgProxyConfig::load(&repo().join("examples/pg-proxy.toml"))
        .expect("example config");
    assert!(config.adapter_policies.join("default.dl").exists());
    assert_eq!(config.database, "staging");
}

/// A throwaway PostgreSQL cluster that demands a password (SCRAM-SHA-256, or md5), run as the
/// `postgres` system user; the shared server on 5432 trusts loopback and never asks.
struct PasswordCluster {
    port: u16,
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

const UPSTREAM_USER: &str = "capgate_up";
const UPSTREAM_PASSWORD: &str = "upstream-only-secret";

impl PasswordCluster {
    fn start(auth: &str) -> PasswordCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::tempdir().expect("dir");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, UPSTREAM_PASSWORD).expect("pwfile");
        let run = |args: &[&std::ffi::OsStr]| {
            let status = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "as postgres: {args:?} (these tests run as root, as CI does)"
            );
        };
        Command::new("chown")
            .arg("-R")
            .arg("postgres")
            .arg(dir.path())
            .status()
            .expect("chown");
        let data = dir.path().join("data");
        let auth_flag = format!("--auth={auth}");
        run(&[
            bin.join("initdb").as_os_str(),
            "-D".as_ref(),
            data.as_os_str(),
            "-U".as_ref(),
            UPSTREAM_USER.as_ref(),
            auth_flag.as_ref(),
            "--pwfile".as_ref(),
            pwfile.as_os_str(),
        ]);
        let port = free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            dir.path().display()
        );
        let log = dir.path().join("log");
        run(&[
            bin.join("pg_ctl").as_os_str(),
            "-D".as_ref(),
            data.as_os_str(),
            "-o".as_ref(),
            options.as_ref(),
            "-l".as_ref(),
            log.as_os_str(),
            "-w".as_ref(),
            "start".as_ref(),
        ]);
        PasswordCluster { port, dir, bin }
    }

    fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user={UPSTREAM_USER} password={UPSTREAM_PASSWORD} dbname=postgres", self.port)
    }
}

impl Drop for PasswordCluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test]
async fn the_proxy_authenticates_upstream_with_scram_and_md5() {
    let broker = Broker::start().await;
    let token = read_token(&broker).await;
    for auth in ["scram-sha-256", "md5"] {
        let cluster = PasswordCluster::start(auth);
        if auth == "md5" {
            // Store an md5 verifier so the server really asks for md5.
            let (admin, connection) = tokio_postgres::connect(&cluster.url(), NoTls)
                .await
                .expect("admin connection");
            tokio::spawn(connection);
            admin
                .batch_execute(&format!("SET password_encryption = 'md5'; ALTER ROLE {UPSTREAM_USER} PASSWORD '{UPSTREAM_PASSWORD}'"))
                .await
                .expect("md5 verifier");
        }
        let upstream = format!(
            "addr = \"127.0.0.1:{}\"\ndatabase = \"postgres\"\nuser = \"{UPSTREAM_USER}\"\npassword_env = \"CAPGATE_TEST_UPSTREAM_PW\"\n",
            cluster.port
        );
        let proxy = start_pg_proxy_with(
            &broker,
            &upstream,
            &[("CAPGATE_TEST_UPSTREAM_PW", UPSTREAM_PASSWORD)],
        )
        .await;
        let client = connect_when_ready(proxy.port, "reporting-bot", &token).await;
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .expect("query");
        assert_eq!(
            row.get::<_, String>(0),
            UPSTREAM_USER,
            "{auth}: connected upstream as the configured role"
        );
        let wrong =
            start_pg_proxy_with(&broker, &upstream, &[("CAPGATE_TEST_UPSTREAM_PW", "wrong")]).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let error = connect(wrong.port, "reporting-bot", &token)
            .await
            .err()
            .unwrap_or_else(|| panic!("{auth}: wrong upstream password accepted"));
        assert_eq!(
            sqlstate(&error).as_deref(),
            Some("08006"),
            "{auth}: {error:?}"
        );
    }
}

/// How many records of the broker's audit trail mention `needle`.
async fn audited(broker: &Broker, needle: &str) -> usize {
    let (_, page) = broker.get_as("/v1/audit?since=0", OPERATOR_KEY).await;
    page["records"]
        .as_array()
        .map(|records| {
            records
                .iter()
                .filter(|r| r["event"].to_string().contains(needle))
                .count()
        })
        .unwrap_or(0)
}

/// A write inside a transaction block is audited when the block commits: the COMMIT waits
/// for the records, and if the broker cannot store them the transaction is rolled back, so
/// no write becomes durable unrecorded.
#[tokio::test]
async fn transaction_writes_are_recorded_before_commit_or_rolled_back() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let write = write_token(&broker).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &write).await;
    let marker = format!("committed_{}", &capgate::token::random_id()[..8]);
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!("UPDATE {t} SET v = '{marker}' WHERE id = 1"))
        .await
        .expect("update");
    client.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        audited(&broker, &marker).await,
        1,
        "the committed write is in the audit trail by the time COMMIT returns"
    );

    // Broker gone mid-transaction: the write runs, but its COMMIT cannot be recorded.
    let lost = format!("unrecorded_{}", &capgate::token::random_id()[..8]);
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!("UPDATE {t} SET v = '{lost}' WHERE id = 2"))
        .await
        .expect("update inside the block");
    let _dir = broker.kill();
    let error = client
        .batch_execute("COMMIT")
        .await
        .expect_err("a commit whose writes cannot be recorded");
    assert_eq!(sqlstate(&error).as_deref(), Some("42501"), "{error:?}");
    assert!(format!("{error:?}").contains("rolled back"), "{error:?}");
    let still = direct()
        .await
        .query_one(&format!("SELECT v FROM {t} WHERE id = 2"), &[])
        .await
        .expect("direct read");
    assert_eq!(
        still.get::<_, String>(0),
        "b",
        "the unrecorded write was undone"
    );
    // The session is usable and no longer inside a transaction.
    let status = client
        .query_one("SELECT 1", &[])
        .await
        .expect("session usable after the rollback");
    assert_eq!(status.get::<_, i32>(0), 1);
}

/// Bind/Execute of a statement parsed earlier costs no parsing, but every execution is still
/// a guard decision: a revoked token stops a prepared statement at its next Execute.
#[tokio::test]
async fn every_execution_of_a_prepared_statement_is_authorized() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let read = read_token(&broker).await;
    let client = connect_when_ready(proxy.port, "reporting-bot", &read).await;
    let statement = client
        .prepare(&format!("SELECT v FROM {t} WHERE id = $1"))
        .await
        .expect("prepare");
    for id in 1..=3i32 {
        client
            .query_one(&statement, &[&id])
            .await
            .expect("execution of a prepared read");
    }
    let id = capgate::token::inspect(&read, None)
        .expect("inspect")
        .revocation_ids[0]
        .clone();
    broker.revoke("token", &id).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match client.query_one(&statement, &[&1i32]).await {
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "prepared statement outlived its token"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => {
                assert_eq!(sqlstate(&error).as_deref(), Some("42501"), "{error:?}");
                break;
            }
        }
    }
}

/// A pipelining client gets answers in the order it asked, even when the proxy answers one
/// itself: a denial never overtakes the upstream answer to a request sent before it.
#[tokio::test]
async fn a_denial_is_answered_in_order_behind_pipelined_requests() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let read = read_token(&broker).await;
    let client = connect_when_ready(proxy.port, "reporting-bot", &read).await;
    // tokio-postgres pipelines concurrent requests on one connection.
    let slow = client.simple_query("SELECT pg_sleep(0.3), 'first'");
    let delete = format!("DELETE FROM {t} WHERE id = 1");
    let denied = client.simple_query(&delete);
    let count = format!("SELECT count(*) FROM {t}");
    let after = client.simple_query(&count);
    let (slow, denied, after) = tokio::join!(slow, denied, after);
    let first_row = |messages: Vec<tokio_postgres::SimpleQueryMessage>, column: usize| {
        messages
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(column).map(str::to_owned),
                _ => None,
            })
            .expect("a row")
    };
    let slow = slow.expect("the first request is answered by upstream");
    assert_eq!(first_row(slow, 1), "first");
    let denied = denied.expect_err("the delete is denied");
    assert_eq!(sqlstate(&denied).as_deref(), Some("42501"), "{denied:?}");
    assert_eq!(first_row(after.expect("the third request"), 0), "3");
    assert_eq!(rows(&t).await, 3);
}

/// The proxy's record of what a statement name means must never differ from upstream's: a
/// name already prepared cannot be prepared again (PostgreSQL would refuse and keep the old
/// statement, which the proxy would then be judging by the new text).
#[tokio::test]
async fn statement_names_cannot_be_reused_to_swap_what_runs() {
    use capgate::adapters::pg::wire::{encode, read_message};
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let write = write_token(&broker).await;
    let _ready = connect_when_ready(proxy.port, "deploy-bot", &write).await;
    let mut stream = raw_session(proxy.port, "deploy-bot", &write).await;
    let parse = |name: &str, sql: &str| {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        body.extend_from_slice(&0i16.to_be_bytes());
        encode(b'P', &body)
    };
    let sync = encode(b'S', &[]);
    let mut first = parse("s1", &format!("SELECT v FROM {t}"));
    first.extend_from_slice(&sync);
    stream.write_all(&first).await.expect("write");
    let mut tags = Vec::new();
    loop {
        let m = read_message(&mut stream, 1 << 20).await.expect("reply");
        tags.push(m.tag);
        if m.tag == b'Z' {
            break;
        }
    }
    assert_eq!(tags, vec![b'1', b'Z'], "first Parse accepted");
    let mut second = parse("s1", "SELECT 1");
    second.extend_from_slice(&sync);
    stream.write_all(&second).await.expect("write");
    let reply = read_message(&mut stream, 1 << 20).await.expect("reply");
    assert_eq!(reply.tag, b'E');
    assert!(
        String::from_utf8_lossy(&reply.body).contains("already exists"),
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        read_message(&mut stream, 1 << 20).await.expect("ready").tag,
        b'Z'
    );
    // SQL PREPARE follows the same rule.
    let mut prepare = encode(
        b'Q',
        format!("PREPARE p1 AS SELECT v FROM {t}\0").as_bytes(),
    );
    prepare.extend_from_slice(&encode(b'Q', b"PREPARE p1 AS SELECT 1\0"));
    stream.write_all(&prepare).await.expect("write");
    let mut errors = Vec::new();
    let mut ready = 0;
    while ready < 2 {
        let m = read_message(&mut stream, 1 << 20).await.expect("reply");
        match m.tag {
            b'E' => errors.push(String::from_utf8_lossy(&m.body).into_owned()),
            b'Z' => ready += 1,
            _ => {}
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("already exists"), "{errors:?}");
}

/// Decisions made while the broker is down wait in the adapter's spool and reach the audit
/// trail once it is back, each exactly once.
#[tokio::test]
async fn decisions_made_while_the_broker_is_down_reach_the_trail_once_it_is_back() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let read = read_token(&broker).await;
    let client = connect_when_ready(proxy.port, "reporting-bot", &read).await;
    let marker = format!("spooled_{}", &capgate::token::random_id()[..8]);
    let port = broker.port;
    let dir = broker.kill();
    // Within the staleness bound reads are still allowed; their records cannot be shipped.
    // Enough of them (about 1 KiB each) that one shipment is bigger than a usual API body.
    const READS: usize = 150;
    for _ in 0..READS {
        client
            .simple_query(&format!("SELECT v FROM {t} WHERE v <> '{marker}'"))
            .await
            .expect("read while the broker is briefly down");
    }
    tokio::time::sleep(Duration::from_millis(700)).await; // at least one failed shipment
    let broker = Broker::restart(dir, port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shipped = audited(&broker, &marker).await;
        if shipped >= READS {
            // A little longer: a duplicate would show up in the next shipment.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            assert_eq!(
                audited(&broker, &marker).await,
                READS,
                "each spooled decision is stored exactly once"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spooled decisions never reached the trail ({shipped} of {READS})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Schema `s` with table `x.c` and schema `s.x` with table `c` are different tables; a right
/// on one must never reach the other, so their resource names must differ. Identifiers that
/// need it are quoted as PostgreSQL quotes them: the right below names `"s.x".c`.
#[tokio::test]
async fn a_dotted_identifier_cannot_borrow_another_tables_right() {
    let broker = Broker::start_with_policy(OPS_POLICY).await;
    let proxy = start_pg_proxy(&broker).await;
    let s = format!("cg9_{}", &capgate::token::random_id()[..10]);
    direct()
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA {s}; CREATE SCHEMA \"{s}.x\"; \
             CREATE TABLE {s}.\"x.c\" (v int); CREATE TABLE \"{s}.x\".c (v int);"
        ))
        .await
        .expect("schemas");
    let right = format!("pg://staging/\"{s}.x\".c:write");
    let token = token_of(&broker.issue(OPS_KEY, &[right.as_str()], None).await);
    let client = connect_when_ready(proxy.port, "ops-bot", &token).await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        let granted = client
            .batch_execute(&format!("INSERT INTO \"{s}.x\".c VALUES (1)"))
            .await;
        let attack = client
            .batch_execute(&format!("INSERT INTO {s}.\"x.c\" VALUES (1)"))
            .await;
        (granted, attack)
    })
    .await
    .expect("no hang");
    let count = |table: String| async move {
        direct()
            .await
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1)
    };
    let other = count(format!("{s}.\"x.c\"")).await;
    let named = count(format!("\"{s}.x\".c")).await;
    let _ = direct()
        .await
        .batch_execute(&format!(
            "DROP SCHEMA {s} CASCADE; DROP SCHEMA \"{s}.x\" CASCADE"
        ))
        .await;
    outcome.0.expect("the write the right names is allowed");
    let denied = outcome.1.expect_err("the other table's write is denied");
    assert_eq!(sqlstate(&denied).as_deref(), Some("42501"), "{denied:?}");
    let message = denied
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(
        message.contains("policy_denied")
            && message.contains(&format!("write on pg://staging/{s}.\"x.c\":")),
        "{message}"
    );
    assert_eq!((named, other), (1, 0), "only the named table was written");
}

/// `psql -c` through the proxy with `token` as `user`: (success, stdout, stderr).
fn psql_through(port: u16, user: &str, token: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new("timeout")
        .args(["20", "psql", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-U",
            user,
            "-d",
            "staging",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", token)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads that call ordered-set, window and statistical aggregates are reads (with libpq and
/// tokio-postgres); a function with side effects is not, even one the catalog calls stable,
/// and neither is a user-defined one, whatever volatility it declares.
#[tokio::test]
async fn pure_builtins_are_reads_and_functions_with_effects_are_not() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let f = format!("{t}_f");
    let s = format!("{t}_s");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION {f}(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'select $1'; \
             CREATE SEQUENCE {s};"
        ))
        .await
        .expect("function and sequence");
    let read = read_token(&broker).await;
    let client = connect_when_ready(proxy.port, "reporting-bot", &read).await;
    let reads = [
        format!("SELECT rank() OVER (ORDER BY id), row_number() OVER (), dense_rank() OVER (ORDER BY v) FROM {t}"),
        format!("SELECT variance(id), stddev(id)::text, var_pop(id)::text, corr(id, id)::text FROM {t}"),
        format!("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY id), mode() WITHIN GROUP (ORDER BY v) FROM {t}"),
    ];
    for sql in &reads {
        tokio::time::timeout(Duration::from_secs(10), client.simple_query(sql))
            .await
            .expect("no hang")
            .unwrap_or_else(|e| panic!("tokio-postgres: {sql}: {e:?}"));
        let (ok, _, stderr) = psql_through(proxy.port, "reporting-bot", &read, sql);
        assert!(ok, "psql: {sql}: {stderr}");
    }
    let (ok, stdout, stderr) = psql_through(
        proxy.port,
        "reporting-bot",
        &read,
        &format!("SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY id) FROM {t}"),
    );
    assert!(ok && stdout.trim() == "2", "{stdout} {stderr}");
    for (sql, named) in [
        ("SELECT txid_current()".to_owned(), "txid_current"),
        (format!("SELECT nextval('{s}')"), "nextval"),
        ("SELECT pg_advisory_lock(42)".to_owned(), "pg_advisory_lock"),
        (
            format!("SELECT query_to_xml('select * from {t}', true, true, '')"),
            "query_to_xml",
        ),
        (format!("SELECT {f}(1)"), f.as_str()),
    ] {
        let error = tokio::time::timeout(Duration::from_secs(10), client.simple_query(&sql))
            .await
            .expect("no hang")
            .expect_err(&sql);
        assert_eq!(
            sqlstate(&error).as_deref(),
            Some("42501"),
            "{sql}: {error:?}"
        );
        let message = error
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(
            message.contains(&format!("calls {named}")),
            "{sql}: {message}"
        );
        let (ok, _, stderr) = psql_through(proxy.port, "reporting-bot", &read, &sql);
        assert!(
            !ok && stderr.contains(&format!("calls {named}")),
            "psql: {sql}: {stderr}"
        );
    }
    let last = direct()
        .await
        .query_one(&format!("SELECT last_value, is_called FROM {s}"), &[])
        .await
        .expect("sequence");
    assert!(!last.get::<_, bool>(1), "the sequence was never advanced");
    assert_eq!(rows(&t).await, 3);
}

/// A function in the session's schema that overloads a pure built-in's name wins PostgreSQL's
/// overload resolution for matching argument types, so `bit_length(1)` is not the built-in.
/// This one lifts the session's read-only default on its first call and deletes on its second.
#[tokio::test]
async fn a_function_overloading_a_pure_builtin_is_not_a_read() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    direct()
        .await
        .batch_execute(&format!(
            "DROP FUNCTION IF EXISTS public.bit_length(integer); \
             CREATE FUNCTION public.bit_length(integer) RETURNS integer LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF current_setting('transaction_read_only') = 'on' THEN \
                 PERFORM set_config('default_transaction_read_only', 'off', false); \
               ELSE \
                 DELETE FROM {t}; \
               END IF; \
               RETURN 1; \
             END $$;"
        ))
        .await
        .expect("overload");
    let read = read_token(&broker).await;
    let client = connect_when_ready(proxy.port, "reporting-bot", &read).await;
    let mut errors = Vec::new();
    for _ in 0..2 {
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            client.simple_query("SELECT bit_length(1)"),
        )
        .await
        .expect("no hang");
        if let Err(e) = outcome {
            errors.push(e);
        }
    }
    let left = rows(&t).await;
    direct()
        .await
        .batch_execute("DROP FUNCTION IF EXISTS public.bit_length(integer)")
        .await
        .expect("drop overload");
    assert_eq!(
        left, 3,
        "a read-only token deleted rows through an overload"
    );
    assert_eq!(errors.len(), 2, "both calls are denied");
    for error in &errors {
        assert_eq!(sqlstate(error).as_deref(), Some("42501"), "{error:?}");
        let message = error
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains("calls bit_length"), "{message}");
    }
    // The built-in itself, on its own argument types, is still a read.
    client
        .simple_query("SELECT pg_catalog.bit_length('abc'::text)")
        .await
        .expect("a schema-qualified built-in is a read");
}

/// Whether a relation of that name exists, asked over a direct connection.
async fn relation_exists(name: &str) -> bool {
    direct()
        .await
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .map(|row| row.get::<_, bool>(0))
        .unwrap_or(true)
}

/// A statement that runs a prepared statement is judged by its own effect too: wrapping
/// EXECUTE in CREATE TABLE AS (and that in EXPLAIN ANALYZE, which PostgreSQL runs even in a
/// read-only session) needs `admin`, however deep, by SQL, extended protocol and psql.
#[tokio::test]
async fn a_wrapper_around_execute_is_judged_for_its_own_effect_too() {
    use capgate::adapters::pg::wire::{encode, read_message};
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    for (agent, token) in [
        ("reporting-bot", read_token(&broker).await),
        ("deploy-bot", write_token(&broker).await),
    ] {
        let client = connect_when_ready(proxy.port, agent, &token).await;
        client
            .batch_execute(&format!("PREPARE wrapped AS SELECT v FROM {t}"))
            .await
            .expect("a prepared read");
        let made = |n: usize| format!("{t}_made_{n}");
        let attacks = [
            format!("CREATE TABLE {} AS EXECUTE wrapped", made(1)),
            format!(
                "EXPLAIN ANALYZE CREATE TABLE {} AS EXECUTE wrapped",
                made(2)
            ),
            format!(
                "EXPLAIN (ANALYZE, COSTS OFF) CREATE UNLOGGED TABLE {} AS EXECUTE wrapped",
                made(3)
            ),
            format!(
                "SELECT 1; EXPLAIN ANALYZE CREATE TABLE {} AS EXECUTE wrapped",
                made(4)
            ),
        ];
        for (n, sql) in attacks.iter().enumerate() {
            let error = tokio::time::timeout(Duration::from_secs(10), client.simple_query(sql))
                .await
                .expect("no hang")
                .expect_err(sql);
            let message = error
                .as_db_error()
                .map(|e| e.message().to_owned())
                .unwrap_or_default();
            assert_eq!(
                sqlstate(&error).as_deref(),
                Some("42501"),
                "{agent}: {sql}: {error:?}"
            );
            assert!(
                message.contains(&format!("admin on pg://staging/public.{}", made(n + 1))),
                "{agent}: {sql}: {message}"
            );
        }
        // The same through the extended protocol (a Parse of the wrapper) and through libpq.
        let error = client
            .prepare(&format!(
                "EXPLAIN ANALYZE CREATE TABLE {} AS EXECUTE wrapped",
                made(5)
            ))
            .await
            .expect_err("extended wrapper");
        assert_eq!(sqlstate(&error).as_deref(), Some("42501"), "{error:?}");
        let (ok, _, stderr) = psql_through(
            proxy.port,
            agent,
            &token,
            &format!(
                "PREPARE w2 AS SELECT 1; EXPLAIN ANALYZE CREATE TABLE {} AS EXECUTE w2",
                made(6)
            ),
        );
        assert!(!ok && stderr.contains("admin on"), "psql: {stderr}");
        // A raw session pipelining Parse/Bind/Execute of the wrapper gets one error, one ready.
        let mut raw = raw_session(proxy.port, agent, &token).await;
        let mut batch = encode(b'Q', b"PREPARE w3 AS SELECT 1\0");
        let mut parse = b"\0".to_vec();
        parse.extend_from_slice(format!("CREATE TABLE {} AS EXECUTE w3\0", made(7)).as_bytes());
        parse.extend_from_slice(&0i16.to_be_bytes());
        batch.extend_from_slice(&encode(b'P', &parse));
        batch.extend_from_slice(&encode(b'B', b"\0\0\0\0\0\0\0\0"));
        batch.extend_from_slice(&encode(b'E', b"\0\0\0\0\0"));
        batch.extend_from_slice(&encode(b'S', b""));
        raw.write_all(&batch).await.expect("write");
        let mut tags = Vec::new();
        while tags.iter().filter(|t| **t == b'Z').count() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(10), read_message(&mut raw, 1 << 20))
                .await
                .expect("no hang")
                .expect("reply");
            tags.push(m.tag);
        }
        assert_eq!(tags, vec![b'C', b'Z', b'E', b'Z'], "{agent}");
        for n in 1..=7 {
            assert!(
                !relation_exists(&made(n)).await,
                "{agent}: {} was created",
                made(n)
            );
        }
        client
            .simple_query("SELECT 1")
            .await
            .expect("session usable");
    }
    assert_eq!(rows(&t).await, 3);
}

/// Raw protocol messages for the tests below.
mod raw {
    use capgate::adapters::pg::wire::encode;

    fn strings(parts: &[&str]) -> Vec<u8> {
        let mut body = Vec::new();
        for part in parts {
            body.extend_from_slice(part.as_bytes());
            body.push(0);
        }
        body
    }
    pub fn query(sql: &str) -> Vec<u8> {
        encode(b'Q', &strings(&[sql]))
    }
    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut body = strings(&[name, sql]);
        body.extend_from_slice(&0i16.to_be_bytes());
        encode(b'P', &body)
    }
    /// Bind of the unnamed portal, no parameters, text results.
    pub fn bind(statement: &str) -> Vec<u8> {
        let mut body = strings(&["", statement]);
        body.extend_from_slice(&[0; 6]);
        encode(b'B', &body)
    }
    pub fn execute() -> Vec<u8> {
        encode(b'E', b"\0\0\0\0\0")
    }
    pub fn close_statement(name: &str) -> Vec<u8> {
        let mut body = vec![b'S'];
        body.extend_from_slice(&strings(&[name]));
        encode(b'C', &body)
    }
    pub fn sync() -> Vec<u8> {
        encode(b'S', b"")
    }
    pub fn copy_data(data: &[u8]) -> Vec<u8> {
        encode(b'd', data)
    }
    pub fn copy_done() -> Vec<u8> {
        encode(b'c', b"")
    }
}

/// Sends `messages` and reads until `ready` ReadyForQuery (10 s at most): the tags seen and
/// the text of every ErrorResponse.
async fn exchange(
    stream: &mut tokio::net::TcpStream,
    messages: &[Vec<u8>],
    ready: usize,
) -> (Vec<u8>, Vec<String>) {
    use capgate::adapters::pg::wire::read_message;
    stream.write_all(&messages.concat()).await.expect("write");
    let (mut tags, mut errors) = (Vec::new(), Vec::new());
    while tags.iter().filter(|t| **t == b'Z').count() < ready {
        let message = tokio::time::timeout(Duration::from_secs(10), read_message(stream, 1 << 24))
            .await
            .unwrap_or_else(|_| panic!("no answer after {tags:?} {errors:?}"))
            .expect("reply");
        if message.tag == b'E' {
            errors.push(String::from_utf8_lossy(&message.body).into_owned());
        }
        tags.push(message.tag);
    }
    (tags, errors)
}

/// The proxy's map of statement names follows the server's through DEALLOCATE, DEALLOCATE
/// ALL, DISCARD ALL and protocol Close, across SQL and protocol names: a name re-prepared
/// as a write is judged as that write at every Execute (here: refused under a freeze), never
/// as the read it used to be.
#[tokio::test]
async fn a_re_prepared_name_is_judged_as_what_it_now_is() {
    use raw::*;
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let write = write_token(&broker).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &write).await;
    let read = format!("SELECT v FROM {t}");
    let update = |id: u32| format!("UPDATE {t} SET v = 'swapped' WHERE id = {id}");
    // Each session prepares a read under a name, drops the name one way, and prepares a
    // write under it again (allowed: the token may write, and nothing is frozen yet).
    let mut sessions = Vec::new();
    for (way, id) in [
        ("DEALLOCATE", 1),
        ("DEALLOCATE ALL", 2),
        ("DISCARD ALL", 3),
        ("Close", 1),
    ] {
        let mut session = raw_session(proxy.port, "deploy-bot", &write).await;
        let name = format!("swap_{id}");
        let (by_protocol, by_sql) = (id % 2 == 1, id % 2 == 0);
        let first = if by_protocol {
            vec![parse(&name, &read), sync()]
        } else {
            vec![query(&format!("PREPARE {name} AS {read}"))]
        };
        let (_, errors) = exchange(&mut session, &first, 1).await;
        assert!(errors.is_empty(), "{way}: {errors:?}");
        let drop = match way {
            "Close" => vec![close_statement(&name), sync()],
            "DEALLOCATE" => vec![query(&format!("DEALLOCATE {name}"))],
            other => vec![query(other)],
        };
        let (_, errors) = exchange(&mut session, &drop, 1).await;
        assert!(errors.is_empty(), "{way}: {errors:?}");
        let again = if by_sql {
            vec![parse(&name, &update(id)), sync()]
        } else {
            vec![query(&format!("PREPARE {name} AS {}", update(id)))]
        };
        let (_, errors) = exchange(&mut session, &again, 1).await;
        assert!(errors.is_empty(), "{way}: re-prepared: {errors:?}");
        sessions.push((way, name, by_sql, session));
    }
    // libpq: with a read token the write cannot even be prepared again; with a write token it
    // is prepared, the broker is frozen mid-session, and its EXECUTE is refused.
    let psql_script = |token: &str, script: &str| {
        let mut psql = Command::new("timeout")
            .args([
                "30",
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                &proxy.port.to_string(),
            ])
            .args(["-d", "staging", "-X", "-A", "-t"])
            .arg("-U")
            .arg(if token == write {
                "deploy-bot"
            } else {
                "reporting-bot"
            })
            .env("PGPASSWORD", token)
            .env("CAPGATE_OPERATOR_KEY", OPERATOR_KEY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        {
            use std::io::Write;
            let mut stdin = psql.stdin.take().expect("stdin");
            stdin.write_all(script.as_bytes()).expect("script");
        }
        let out = psql.wait_with_output().expect("psql");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let read_only = read_token(&broker).await;
    let (stdout, stderr) = psql_script(
        &read_only,
        &format!(
            "PREPARE lp AS {read};\nDEALLOCATE lp;\nPREPARE lp AS DELETE FROM {t} WHERE id = 3;\nEXECUTE lp;\nSELECT 'still' || 'here';\n"
        ),
    );
    assert!(stdout.contains("stillhere"), "{stdout} {stderr}");
    assert!(
        stderr.contains("write on") && stderr.contains("was not prepared through Capgate"),
        "{stderr}"
    );
    let (stdout, stderr) = psql_script(
        &write,
        &format!(
            "PREPARE lq AS {read};\nDEALLOCATE lq;\nPREPARE lq AS {};\n\\! {} freeze on --broker {} >/dev/null\n\\! sleep 3\nEXECUTE lq;\nSELECT 'still' || 'here';\n",
            update(3),
            env!("CARGO_BIN_EXE_capgate"),
            broker.url
        ),
    );
    assert!(stdout.contains("stillhere"), "{stdout} {stderr}");
    assert!(
        stderr.contains("frozen") && stderr.contains("write on"),
        "{stderr}"
    );
    assert_eq!(rows(&t).await, 3);
    let frozen = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["freeze", "on", "--broker", &broker.url])
        .env("CAPGATE_OPERATOR_KEY", OPERATOR_KEY)
        .output()
        .expect("freeze");
    assert!(frozen.status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while client
        .batch_execute(&format!("UPDATE {t} SET v = v WHERE id = 0"))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "freeze never reached the proxy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (way, name, by_sql, mut session) in sessions {
        let run = if by_sql {
            vec![query(&format!("EXECUTE {name}"))]
        } else {
            vec![bind(&name), execute(), sync()]
        };
        let (tags, errors) = exchange(&mut session, &run, 1).await;
        assert!(
            errors.len() == 1 && errors[0].contains("frozen") && errors[0].contains("write on"),
            "{way}: the re-prepared write ran as a read: {tags:?} {errors:?}"
        );
    }
    let swapped = direct()
        .await
        .query_one(
            &format!("SELECT count(*) FROM {t} WHERE v = 'swapped'"),
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1);
    assert_eq!(swapped, 0, "no re-prepared write ran under the freeze");
}

/// COPY follows the protocol as the server does: copy data that arrives after PostgreSQL
/// rejected a COPY is ignored (the session stays usable), a COPY through the extended
/// protocol (two Syncs, one ReadyForQuery: tokio-postgres and libpq send both) leaves the
/// session answering, denied statements included, and a batch that ends any way gets
/// exactly one ReadyForQuery per Sync.
#[tokio::test]
async fn copy_and_sync_edge_cases_leave_the_session_usable() {
    use raw::*;
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let write = write_token(&broker).await;
    let client = connect_when_ready(proxy.port, "deploy-bot", &write).await;

    // tokio-postgres: copy_in (Parse/Bind/Execute/Sync, CopyData, CopyDone, Sync), then a
    // denied statement and a read must both be answered.
    let sink = tokio::time::timeout(
        Duration::from_secs(10),
        client.copy_in::<_, bytes::Bytes>(&format!("COPY {t} FROM STDIN")),
    )
    .await
    .expect("no hang")
    .expect("copy allowed for a write token");
    let mut sink = Box::pin(sink);
    use futures_util::SinkExt;
    sink.send(bytes::Bytes::from_static(b"10\tj\n11\tk\n"))
        .await
        .expect("copy data");
    let copied = tokio::time::timeout(Duration::from_secs(10), sink.as_mut().finish())
        .await
        .expect("no hang")
        .expect("copy done");
    assert_eq!(copied, 2);
    let denied = tokio::time::timeout(
        Duration::from_secs(10),
        client.batch_execute(&format!("DROP TABLE {t}")),
    )
    .await
    .expect("the denial after an extended COPY is answered")
    .expect_err("drop denied");
    assert_eq!(sqlstate(&denied).as_deref(), Some("42501"), "{denied:?}");
    let after = tokio::time::timeout(
        Duration::from_secs(10),
        client.query_one(&format!("SELECT count(*) FROM {t}"), &[]),
    )
    .await
    .expect("no hang")
    .expect("read after the copy");
    assert_eq!(after.get::<_, i64>(0), 5);

    // Raw: PostgreSQL rejects a COPY after starting it; the client's late data is ignored.
    let mut session = raw_session(proxy.port, "deploy-bot", &write).await;
    let (tags, _) = exchange(&mut session, &[query(&format!("COPY {t} FROM STDIN"))], 0).await;
    assert!(tags.is_empty());
    let started = capgate::adapters::pg::wire::read_message(&mut session, 1 << 20)
        .await
        .expect("copy in response");
    assert_eq!(started.tag, b'G');
    let (tags, errors) = exchange(&mut session, &[copy_data(b"not a number\tx\n")], 1).await;
    assert_eq!(
        (tags.as_slice(), errors.len()),
        (&[b'E', b'Z'][..], 1),
        "{errors:?}"
    );
    let late = [copy_data(b"12\tl\n"), copy_data(b"13\tm\n"), copy_done()];
    let (tags, errors) =
        exchange(&mut session, &[&late[..], &[query("SELECT 1")]].concat(), 1).await;
    assert_eq!(tags, vec![b'T', b'D', b'C', b'Z'], "{errors:?}");

    // Raw, extended: COPY via Parse/Bind/Execute/Sync, data, CopyDone, Sync: one ready.
    let mut copy = vec![
        parse("", &format!("COPY {t} FROM STDIN")),
        bind(""),
        execute(),
        sync(),
    ];
    let (tags, _) = exchange(&mut session, &copy.split_off(0), 0).await;
    assert!(tags.is_empty());
    let mut seen = Vec::new();
    while seen.last() != Some(&b'G') {
        let m = tokio::time::timeout(
            Duration::from_secs(10),
            capgate::adapters::pg::wire::read_message(&mut session, 1 << 20),
        )
        .await
        .expect("no hang")
        .expect("copy start");
        seen.push(m.tag);
    }
    assert_eq!(seen, vec![b'1', b'2', b'G']);
    let (tags, errors) = exchange(
        &mut session,
        &[copy_data(b"20\tx\n"), copy_done(), sync()],
        1,
    )
    .await;
    assert_eq!(tags, vec![b'C', b'Z'], "{errors:?}");
    // A denied statement next gets its answer, and then a read gets exactly one ready.
    let (tags, errors) = exchange(&mut session, &[query(&format!("DROP TABLE {t}"))], 1).await;
    assert_eq!(tags, vec![b'E', b'Z']);
    assert!(errors[0].contains("capgate"), "{errors:?}");
    let (tags, _) = exchange(
        &mut session,
        &[parse("", "SELECT 1"), bind(""), execute(), sync()],
        1,
    )
    .await;
    assert_eq!(tags, vec![b'1', b'2', b'D', b'C', b'Z']);

    // A batch forwarded up to a Flush, then a denied Parse and Sync: one ready, then normal.
    let flush = capgate::adapters::pg::wire::encode(b'H', b"");
    let (tags, _) = exchange(
        &mut session,
        &[parse("", "SELECT 2"), bind(""), execute(), flush],
        0,
    )
    .await;
    assert!(tags.is_empty());
    let (tags, errors) = exchange(
        &mut session,
        &[parse("", &format!("DELETE FROM {t}")), sync()],
        1,
    )
    .await;
    assert_eq!(tags.iter().filter(|t| **t == b'Z').count(), 1, "{tags:?}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    let (tags, _) = exchange(&mut session, &[query("SELECT 3")], 1).await;
    assert_eq!(tags, vec![b'T', b'D', b'C', b'Z']);

    // libpq: psql streams a COPY whose first row PostgreSQL rejects, then carries on.
    let mut script = format!("COPY {t} FROM STDIN;\nnot a number\tx\n");
    for i in 0..2000 {
        script.push_str(&format!("{}\tlate\n", 1000 + i));
    }
    script.push_str("\\.\nSELECT 'still' || 'alive';\n");
    let mut psql = Command::new("timeout")
        .args([
            "20",
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port.to_string(),
        ])
        .args(["-U", "deploy-bot", "-d", "staging", "-X", "-A", "-t"])
        .env("PGPASSWORD", &write)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    {
        use std::io::Write;
        let mut stdin = psql.stdin.take().expect("stdin");
        stdin.write_all(script.as_bytes()).expect("script");
    }
    let out = psql.wait_with_output().expect("psql output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("stillalive"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        rows(&t).await,
        6,
        "3 + 2 (tokio-postgres) + 1 (extended raw); nothing late"
    );
}

/// libpq's own benchmark client in each query mode (unnamed statements, named prepared
/// statements) runs reads and writes through the proxy's statement map without a failure,
/// and every write lands.
#[tokio::test]
async fn pgbench_runs_in_every_query_mode() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table().await;
    let write = write_token(&broker).await;
    connect_when_ready(proxy.port, "deploy-bot", &write).await;
    let dir = tempfile::tempdir().expect("dir");
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        format!(
            "\\set id random(1, 3)\nSELECT v FROM {t} WHERE id = :id;\nUPDATE {t} SET v = v || 'x' WHERE id = :id;\n"
        ),
    )
    .expect("script");
    for mode in ["simple", "extended", "prepared"] {
        let out = Command::new("timeout")
            .args([
                "60", "pgbench", "-n", "-t", "50", "-c", "2", "-M", mode, "-f",
            ])
            .arg(&script)
            .args(["-h", "127.0.0.1", "-p", &proxy.port.to_string()])
            .args(["-U", "deploy-bot", "staging"])
            .env("PGPASSWORD", &write)
            .output()
            .expect("pgbench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("processed: 100/100"),
            "{mode}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let written = direct()
        .await
        .query_one(
            &format!("SELECT sum(length(v))::int8 - count(*) FROM {t}"),
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1);
    assert_eq!(written, 300, "every write of every mode landed");
}
