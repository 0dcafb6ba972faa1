//! The session's state machine, driven with in-memory frames: a scripted upstream answers
//! like PostgreSQL and records every byte it is sent, so each test shows what reached it
//! (nothing of a denied statement or batch) and what the client was told (the deny's reason,
//! then exactly one ReadyForQuery).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{duplex, split, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use super::{relay_streams, Streams};
use crate::wire::{encode, read_message, Message};
use crate::{PgProxy, PgProxyConfig};
use capgate_core::scope::Verb;
use capgate_test_support::{Issuer, NoBroker};

const MAX: usize = 1 << 20;

/// A proxy for database `staging` and a token that may read it (and nothing else); a forged
/// one (signed by another key under the same key id) when `forged`.
fn proxy_and_read_token(forged: bool) -> (Arc<PgProxy>, String) {
    let issuer = Issuer::new();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/adapters");
    let config: PgProxyConfig = toml::from_str(&format!(
        "listen = \"127.0.0.1:0\"\nbroker = \"http://127.0.0.1:1\"\nenvironment = \"staging\"\n\
         database = \"staging\"\nadapter_policies = {:?}\n\
         [upstream]\naddr = \"127.0.0.1:1\"\ndatabase = \"test\"\nuser = \"postgres\"\n",
        policies.display().to_string()
    ))
    .expect("config");
    let proxy = PgProxy::new(
        config,
        issuer.key_view(),
        issuer.synced_revocations(),
        issuer.containment(),
        Arc::new(NoBroker),
    )
    .expect("proxy");
    let signer = if forged { Issuer::new() } else { issuer };
    let token = signer.token("unit-bot", "staging", &[("pg://staging/", Verb::Read)]);
    (Arc::new(proxy), token)
}

/// Answers like PostgreSQL to what the tests send, and keeps every message it receives.
async fn scripted_upstream(mut end: DuplexStream, seen: Arc<Mutex<Vec<Message>>>) {
    while let Ok(message) = read_message(&mut end, MAX).await {
        let answer: Vec<u8> = match message.tag {
            b'Q' => [encode(b'C', b"SELECT 1\0"), encode(b'Z', b"I")].concat(),
            b'P' => encode(b'1', b""),
            b'B' => encode(b'2', b""),
            b'D' => encode(b'n', b""),
            b'E' => encode(b'C', b"SELECT 1\0"),
            b'S' => encode(b'Z', b"I"),
            _ => Vec::new(),
        };
        let terminate = message.tag == b'X';
        seen.lock().expect("lock").push(message);
        if terminate || end.write_all(&answer).await.is_err() {
            return;
        }
    }
}

struct Harness {
    client_read: ReadHalf<DuplexStream>,
    client_write: WriteHalf<DuplexStream>,
    upstream_saw: Arc<Mutex<Vec<Message>>>,
}

impl Harness {
    fn start() -> Harness {
        Harness::start_as(false)
    }

    fn start_as(forged: bool) -> Harness {
        let (proxy, token) = proxy_and_read_token(forged);
        let (client_end, proxy_client) = duplex(MAX);
        let (proxy_upstream, upstream_end) = duplex(MAX);
        let upstream_saw = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(scripted_upstream(upstream_end, upstream_saw.clone()));
        let (read, write) = split(proxy_client);
        let client = Streams { read, write };
        let (read, write) = split(proxy_upstream);
        let upstream = Streams { read, write };
        tokio::spawn(relay_streams(
            client,
            upstream,
            token,
            Default::default(),
            proxy,
        ));
        let (client_read, client_write) = split(client_end);
        Harness {
            client_read,
            client_write,
            upstream_saw,
        }
    }

    async fn send(&mut self, frames: &[Vec<u8>]) {
        self.client_write
            .write_all(&frames.concat())
            .await
            .expect("send");
    }

    /// Everything the client receives up to and including the next ReadyForQuery.
    async fn until_ready(&mut self) -> Vec<Message> {
        let mut received = Vec::new();
        loop {
            let message = tokio::time::timeout(
                Duration::from_secs(10),
                read_message(&mut self.client_read, MAX),
            )
            .await
            .expect("an answer in time")
            .expect("a message");
            let ready = message.tag == b'Z';
            received.push(message);
            if ready {
                return received;
            }
        }
    }

    fn upstream_tags(&self) -> Vec<u8> {
        self.upstream_saw
            .lock()
            .expect("lock")
            .iter()
            .map(|m| m.tag)
            .collect()
    }
}

fn query(sql: &str) -> Vec<u8> {
    encode(b'Q', format!("{sql}\0").as_bytes())
}

fn parse(sql: &str) -> Vec<u8> {
    encode(b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat())
}

fn bind() -> Vec<u8> {
    encode(b'B', b"\0\0\0\0\0\0\0\0")
}

fn execute() -> Vec<u8> {
    encode(b'E', b"\0\0\0\0\0")
}

fn describe_unnamed_statement() -> Vec<u8> {
    encode(b'D', b"S\0")
}

fn sync() -> Vec<u8> {
    encode(b'S', b"")
}

fn tags(messages: &[Message]) -> Vec<u8> {
    messages.iter().map(|m| m.tag).collect()
}

/// The SQLSTATE and message of an ErrorResponse.
fn error_fields(message: &Message) -> (String, String) {
    let mut code = String::new();
    let mut text = String::new();
    for field in message.body.split(|b| *b == 0) {
        match field.split_first() {
            Some((b'C', value)) => code = String::from_utf8_lossy(value).into_owned(),
            Some((b'M', value)) => text = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
    }
    (code, text)
}

#[tokio::test]
async fn a_granted_read_reaches_upstream_and_its_answer_the_client() {
    let mut h = Harness::start();
    h.send(&[query("SELECT 1")]).await;
    assert_eq!(tags(&h.until_ready().await), b"CZ");
    assert_eq!(h.upstream_tags(), b"Q");
}

#[tokio::test]
async fn a_denied_statement_sends_nothing_upstream_and_says_why() {
    let mut h = Harness::start();
    h.send(&[query("SELECT 1; DROP TABLE public.bookings")])
        .await;
    let answer = h.until_ready().await;
    assert_eq!(tags(&answer), b"EZ", "one error, one ReadyForQuery");
    let (code, text) = error_fields(&answer[0]);
    assert_eq!(code, "42501");
    assert!(
        text.contains("denied delete on pg://staging/public.bookings: policy_denied"),
        "{text}"
    );
    assert!(h.upstream_tags().is_empty(), "nothing of it went upstream");
    // The session goes on: the next granted statement runs.
    h.send(&[query("SELECT 1")]).await;
    assert_eq!(tags(&h.until_ready().await), b"CZ");
    assert_eq!(h.upstream_tags(), b"Q");
}

#[tokio::test]
async fn an_extended_batch_is_held_to_its_sync_and_forwarded_whole_or_not_at_all() {
    let mut h = Harness::start();
    h.send(&[parse("SELECT 1"), bind(), execute(), sync()])
        .await;
    assert_eq!(tags(&h.until_ready().await), b"12CZ");
    assert_eq!(h.upstream_tags(), b"PBES");

    h.send(&[
        parse("DELETE FROM public.bookings"),
        bind(),
        execute(),
        sync(),
    ])
    .await;
    let answer = h.until_ready().await;
    assert_eq!(tags(&answer), b"EZ");
    let (code, text) = error_fields(&answer[0]);
    assert_eq!(code, "42501");
    assert!(
        text.contains("denied delete on pg://staging/public.bookings: policy_denied"),
        "{text}"
    );
    assert_eq!(h.upstream_tags(), b"PBES", "nothing of the denied batch");
}

#[tokio::test]
async fn a_statement_that_does_not_parse_is_denied_not_forwarded() {
    let mut h = Harness::start();
    h.send(&[query("DROP TABEL bookings")]).await;
    let answer = h.until_ready().await;
    assert_eq!(tags(&answer), b"EZ");
    let (code, text) = error_fields(&answer[0]);
    assert_eq!(code, "42501");
    assert!(text.contains("statement not classified"), "{text}");
    assert!(h.upstream_tags().is_empty());
}

#[tokio::test]
async fn a_request_that_touches_nothing_still_needs_a_valid_token() {
    let mut h = Harness::start_as(true);
    h.send(&[describe_unnamed_statement(), sync()]).await;
    let answer = h.until_ready().await;
    assert_eq!(tags(&answer), b"EZ");
    let (code, text) = error_fields(&answer[0]);
    assert_eq!(code, "42501");
    assert!(text.contains("token_bad_signature"), "{text}");
    h.send(&[query("SELECT 1")]).await;
    let answer = h.until_ready().await;
    assert!(error_fields(&answer[0]).1.contains("token_bad_signature"));
    assert!(h.upstream_tags().is_empty(), "nothing went upstream");
    // A Sync alone asks for nothing: the proxy's own Sync goes upstream and answers it.
    h.send(&[sync()]).await;
    assert_eq!(tags(&h.until_ready().await), b"Z");
    assert_eq!(h.upstream_tags(), b"S");
}
