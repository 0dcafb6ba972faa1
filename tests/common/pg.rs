//! The real `capgate proxy pg` process in front of the real PostgreSQL on 127.0.0.1:5432
//! (database `test`), tokio-postgres clients through it and directly, and fresh tables.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use super::{free_port, repo, token_of, Broker, ADAPTER_KEY, DEPLOY_BOT_KEY, READER_KEY};

pub const DIRECT: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

pub struct PgProxyProcess {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Drop for PgProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PgProxyProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pg.log")).unwrap_or_default()
    }
}

/// A proxy for database alias `staging` (environment `staging`) in front of `test`.
pub async fn start_pg_proxy(broker: &Broker) -> PgProxyProcess {
    start_pg_proxy_with(
        broker,
        "addr = \"127.0.0.1:5432\"\ndatabase = \"test\"\nuser = \"postgres\"\n",
        &[],
    )
    .await
}

/// A proxy in front of the given `[upstream]` table, with extra environment variables.
pub async fn start_pg_proxy_with(
    broker: &Broker,
    upstream: &str,
    env: &[(&str, &str)],
) -> PgProxyProcess {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = format!(
        r#"
listen = "127.0.0.1:{port}"
broker = "{broker}"
environment = "staging"
database = "staging"
name = "pg-staging"
adapter_policies = "{policies}"
max_staleness = "3s"
adapter_key_env = "CAPGATE_TEST_ADAPTER_KEY"
audit_spool = "{spool}"

[upstream]
{upstream}
"#,
        broker = broker.url,
        policies = repo().join("policies/adapters").display(),
        spool = dir.path().join("spool.jsonl").display(),
    );
    let path = dir.path().join("pg.toml");
    std::fs::write(&path, config).expect("config");
    let log = std::fs::File::create(dir.path().join("pg.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["proxy", "pg", "--config"])
        .arg(&path)
        .env("CAPGATE_TEST_ADAPTER_KEY", ADAPTER_KEY)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pg proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    PgProxyProcess { port, child, dir }
}

pub async fn connect(
    port: u16,
    user: &str,
    token: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let config = format!(
        "host=127.0.0.1 port={port} user={user} password={token} dbname=staging connect_timeout=5"
    );
    let (client, connection) = tokio_postgres::connect(&config, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Keeps trying until the proxy has synced keys and containment settings from the broker.
pub async fn connect_when_ready(port: u16, user: &str, token: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(client) = connect(port, user, token).await {
            if client.simple_query("SELECT 1").await.is_ok() {
                return client;
            }
        }
        assert!(Instant::now() < deadline, "proxy never accepted the token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn direct() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(DIRECT, NoTls)
        .await
        .expect("direct connection");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A fresh table `(id int primary key, v text)` with rows 1..=n; returns its name.
pub async fn table_with(n: i32) -> String {
    let name = format!("capgate_t_{}", &capgate::token::random_id()[..12]);
    direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {name} (id int primary key, v text); \
             INSERT INTO {name} SELECT i, 'v' || i FROM generate_series(1, {n}) i;"
        ))
        .await
        .expect("create");
    name
}

/// Rows in `table`, counted on a direct connection (-1 when it cannot be read).
pub async fn rows(table: &str) -> i64 {
    direct()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map(|row| row.get::<_, i64>(0))
        .unwrap_or(-1)
}

/// A token of deploy-bot that may read and write the staging database.
pub async fn write_token(broker: &Broker) -> String {
    token_of(
        &broker
            .issue(
                DEPLOY_BOT_KEY,
                &["pg://staging/:write", "pg://staging/:read"],
                None,
            )
            .await,
    )
}

/// A token of reporting-bot that may only read the staging database.
pub async fn read_token(broker: &Broker) -> String {
    token_of(
        &broker
            .issue(READER_KEY, &["pg://staging/:read"], None)
            .await,
    )
}

/// The SQLSTATE of a PostgreSQL error, if the server (or the proxy) sent one.
pub fn sqlstate(error: &tokio_postgres::Error) -> Option<String> {
    error.as_db_error().map(|e| e.code().code().to_owned())
}

/// The message of a PostgreSQL error (the proxy's denials carry their reason there).
pub fn db_message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| format!("{error:?}"))
}

/// The approval request id in a proxy denial ("… needs an operator's approval: request ID …").
pub fn approval_id(message: &str) -> Option<String> {
    let rest = message.split("approval: request ").nth(1)?;
    let id: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    (!id.is_empty()).then_some(id)
}
