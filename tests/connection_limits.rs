//! Connection floods against the real `capgate serve` and `capgate proxy pg` processes, held
//! to 1,024 open files by `prlimit`: idle sockets beyond the file limit must not stop the
//! broker answering `/v1/health` and issuing tokens, nor stop a real PostgreSQL client logging
//! in through the proxy. Slow clients (headers or bodies dribbled, idle keep-alive) are cut
//! after their timeouts.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The file limit the flooded processes run under.
const NOFILE: u64 = 1024;
/// Descriptors the cap keeps back by default (`connections::DEFAULT_RESERVED_FDS`).
const RESERVED_FDS: u64 = 128;
/// More idle connections than the file limit allows.
const FLOOD: usize = 1500;

/// The default timeouts (header read 10 s, startup 10 s) would also close idle connections,
/// so a flood test must finish well within them to show that the cap, not a timeout, kept
/// the server answering.
const WITHIN_DEFAULT_TIMEOUTS: Duration = Duration::from_secs(9);

/// Opens up to `count` idle TCP connections; stops early once connects stall (a server that
/// stopped accepting fills its backlog). Returns the connected sockets.
async fn flood(port: u16, count: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(count);
    let mut stalled = 0;
    while sockets.len() < count && stalled < 20 {
        match tokio::time::timeout(
            Duration::from_millis(500),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            Ok(Ok(socket)) => sockets.push(socket),
            _ => stalled += 1,
        }
    }
    sockets
}

/// How many of the flood's sockets the server has closed (EOF or reset).
fn closed_by_server(sockets: &[TcpStream]) -> usize {
    let mut byte = [0u8; 1];
    sockets
        .iter()
        .filter(|s| match s.try_read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_beyond_the_file_limit_leaves_health_and_issuance_answering() {
    raise_own_file_limit(4096);
    let broker = Broker::start_under_file_limit("", NOFILE).await;
    let started = Instant::now();
    let sockets = flood(broker.port, FLOOD).await;
    assert!(
        sockets.len() > NOFILE as usize,
        "the flood should exceed the broker's file limit: only {} connections were accepted",
        sockets.len()
    );

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let health = client
        .get(format!("{}/v1/health", broker.url))
        .send()
        .await
        .expect("/v1/health must answer during the flood");
    assert_eq!(health.status().as_u16(), 200);
    let issued = tokio::time::timeout(
        Duration::from_secs(10),
        broker.request_token(READER_KEY, &["pg://prod/public.t:read"], None),
    )
    .await
    .expect("token issuance must answer during the flood");
    assert_eq!(
        issued.0, 201,
        "token refused during the flood: {}",
        issued.1
    );

    // The broker made room by shedding the idle connections: what it still holds fits under
    // its cap (file limit minus the default reserve of 128).
    let cap = (NOFILE - RESERVED_FDS) as usize;
    let must_be_shed = sockets.len().saturating_sub(cap);
    let mut shed = closed_by_server(&sockets);
    while shed < must_be_shed && started.elapsed() < WITHIN_DEFAULT_TIMEOUTS {
        tokio::time::sleep(Duration::from_millis(100)).await;
        shed = closed_by_server(&sockets);
    }
    assert!(
        shed >= must_be_shed,
        "{} of {} idle connections shed; at least {must_be_shed} must be for a cap of {cap}",
        shed,
        sockets.len()
    );
}

/// Sends `head` then dribbles `drip` every 200 ms; returns how long until the server closed
/// the connection (None: still open after `patience`) and what it answered.
async fn dribble(
    port: u16,
    head: &str,
    drip: &str,
    patience: Duration,
) -> (Option<Duration>, String) {
    let mut socket = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let started = Instant::now();
    socket.write_all(head.as_bytes()).await.expect("head");
    let (mut reader, mut writer) = socket.into_split();
    let drip = drip.to_owned();
    let writing = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(drip.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(patience, async {
        let mut buf = [0u8; 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok();
    writing.abort();
    (closed, String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn a_slowloris_client_is_cut_after_the_header_read_timeout() {
    let broker = Broker::start_custom("", "[connections]\nheader_read_timeout = \"1s\"\n").await;
    let (closed, answer) = dribble(
        broker.port,
        "GET /v1/health HTTP/1.1\r\nHost: capgate\r\n",
        "X-Slow: 1\r\n",
        Duration::from_secs(6),
    )
    .await;
    let closed = closed.expect("a client dribbling headers must be cut");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "cut after {closed:?}, expected about the 1 s header read timeout"
    );
    assert!(
        !answer.contains(" 200 "),
        "headers never finished, yet the request was served: {answer}"
    );
}

#[tokio::test]
async fn a_body_dribbled_past_the_body_read_timeout_is_refused_as_body_timeout() {
    let broker = Broker::start_custom("", "[connections]\nbody_read_timeout = \"1s\"\n").await;
    let head = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: capgate\r\nAuthorization: Bearer {READER_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n{{"
    );
    let (closed, answer) = dribble(broker.port, &head, " ", Duration::from_secs(6)).await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "expected 408 for a body still arriving after 1 s, got: {answer:?}"
    );
    assert!(
        answer.contains("\"code\":\"body_timeout\""),
        "the refusal must name the body timeout: {answer}"
    );
    let closed = closed.expect("the connection ends after the refusal");
    assert!(closed < Duration::from_secs(3), "answered after {closed:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let broker = Broker::start_custom("", "[connections]\nidle_timeout = \"1s\"\n").await;
    let mut socket = TcpStream::connect(("127.0.0.1", broker.port))
        .await
        .expect("connect");
    socket
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: capgate\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let served = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return served.elapsed(),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "health answered: {text}");
    let closed = closed.expect("an idle keep-alive connection must be closed");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "closed after {closed:?}, expected about the 1 s idle timeout"
    );
}

struct PgProxyProcess {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for PgProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_pg_proxy(broker: &Broker, connections: &str, nofile: u64) -> PgProxyProcess {
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
addr = "127.0.0.1:5432"
database = "test"
user = "postgres"

{connections}
"#,
        broker = broker.url,
        policies = repo().join("policies/adapters").display(),
        spool = dir.path().join("spool.jsonl").display(),
    );
    let path = dir.path().join("pg.toml");
    std::fs::write(&path, config).expect("config");
    let log = std::fs::File::create(dir.path().join("pg.log")).expect("log");
    let child = under_file_limit(env!("CARGO_BIN_EXE_capgate"), Some(nofile))
        .args(["proxy", "pg", "--config"])
        .arg(&path)
        .env("CAPGATE_TEST_ADAPTER_KEY", ADAPTER_KEY)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pg proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    PgProxyProcess {
        port,
        child,
        _dir: dir,
    }
}

async fn pg_login(port: u16, token: &str) -> Result<i64, String> {
    let config = format!(
        "host=127.0.0.1 port={port} user=reporting-bot password={token} dbname=staging connect_timeout=5"
    );
    let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let row = client
        .query_one("SELECT 40 + 2", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get::<_, i32>(0).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unfinished_pg_startups_leaves_a_real_client_able_to_log_in_and_query() {
    raise_own_file_limit(4096);
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker, "", NOFILE);
    let token = token_of(
        &broker
            .issue(READER_KEY, &["pg://staging/:read"], None)
            .await,
    );
    // The proxy syncs keys from the broker first: log in once before the flood.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg_login(proxy.port, &token).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the proxy never accepted the token"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let sockets = flood(proxy.port, FLOOD).await;
    assert!(
        sockets.len() > NOFILE as usize,
        "the flood should exceed the proxy's file limit: only {} connections were accepted",
        sockets.len()
    );
    let answer = tokio::time::timeout(Duration::from_secs(10), pg_login(proxy.port, &token))
        .await
        .expect("login through the proxy must answer during the flood");
    assert_eq!(answer, Ok(42), "a real client could not log in and query");
    // Half the descriptors go to upstream connections: the cap is (limit - reserve) / 2.
    let cap = ((NOFILE - RESERVED_FDS) / 2) as usize;
    let must_be_shed = sockets.len().saturating_sub(cap);
    let mut shed = closed_by_server(&sockets);
    while shed < must_be_shed && started.elapsed() < WITHIN_DEFAULT_TIMEOUTS {
        tokio::time::sleep(Duration::from_millis(100)).await;
        shed = closed_by_server(&sockets);
    }
    assert!(
        shed >= must_be_shed,
        "{shed} of {} startups shed; at least {must_be_shed} must be for a cap of {cap}",
        sockets.len()
    );
}

#[tokio::test]
async fn a_pg_client_that_never_finishes_startup_is_cut_after_the_startup_timeout() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(&broker, "[connections]\nstartup_timeout = \"1s\"\n", 4096);
    let mut socket = TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect");
    // Half a startup packet: a length promising more than ever arrives.
    socket.write_all(&[0, 0, 0, 40, 0, 3]).await.expect("write");
    let started = Instant::now();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        let mut buf = [0u8; 512];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("an unfinished startup must be cut");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "cut after {closed:?}, expected about the 1 s startup timeout"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.first() == Some(&b'E') && text.contains("08P01") && text.contains("startup"),
        "the client is told why (SQLSTATE 08P01, startup timeout): {text:?}"
    );
}

#[tokio::test]
async fn the_http_proxy_cuts_a_slowloris_client_after_the_header_read_timeout() {
    let broker = Broker::start().await;
    let (_upstream, upstream_port) = common::proxy::Upstream::start().await;
    // The extra lines close `[upstream]` and open `[connections]`.
    let proxy = common::proxy::start_proxy_configured(
        &broker.url,
        upstream_port,
        "prod",
        &[],
        "\n[connections]\nheader_read_timeout = \"1s\"\n",
    )
    .await;
    let (closed, answer) = dribble(
        proxy.port,
        "GET /v2/volumes HTTP/1.1\r\nHost: proxy\r\n",
        "X-Slow: 1\r\n",
        Duration::from_secs(6),
    )
    .await;
    let closed = closed.expect("a client dribbling headers must be cut");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "cut after {closed:?}, expected about the 1 s header read timeout"
    );
    assert!(answer.is_empty() || !answer.contains(" 200 "), "{answer}");
}

#[tokio::test]
async fn a_logged_in_pg_session_idle_past_the_session_idle_timeout_is_ended() {
    let broker = Broker::start().await;
    let proxy = start_pg_proxy(
        &broker,
        "[connections]\nsession_idle_timeout = \"1s\"\n",
        4096,
    );
    let token = token_of(
        &broker
            .issue(READER_KEY, &["pg://staging/:read"], None)
            .await,
    );
    let config = format!(
        "host=127.0.0.1 port={} user=reporting-bot password={token} dbname=staging connect_timeout=5",
        proxy.port
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        if let Ok((client, connection)) =
            tokio_postgres::connect(&config, tokio_postgres::NoTls).await
        {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            break client;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never accepted the token"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A statement that takes longer than the idle limit is not idleness.
    client
        .simple_query("SELECT pg_sleep(1.5)")
        .await
        .expect("a statement running past the idle limit completes");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let error = client
        .simple_query("SELECT 1")
        .await
        .expect_err("the idle session must have been ended");
    let text = format!("{error:?}");
    assert!(
        text.contains("57P05") || client.is_closed(),
        "ended for idleness: {text}"
    );
}
