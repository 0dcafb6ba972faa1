//! One client session through the PostgreSQL proxy: startup (TLS and GSS refused, cancels
//! mapped, parameters filtered), login with the Capgate token as password, the upstream
//! session, then the relay. Every simple Query and every Parse is classified and checked
//! before anything of it reaches the upstream; a denial is an ErrorResponse (42501) and the
//! session stays usable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::classify::{classify_async, Access, Object};
use super::upstream::{self, UpstreamLogin};
use super::wire::{self, cstr, error_response, read_message, read_startup, Message, WireError};
use super::PgProxy;
use crate::guard::{Outcome, Request as GuardRequest};
use crate::scope::Verb;

/// Startup parameters a client may send; anything else (notably `options`) is refused.
const ALLOWED_PARAMETERS: [&str; 8] = [
    "user",
    "database",
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "fallback_application_name",
];

/// Why a statement may not run, as the client will read it.
struct Denial {
    sqlstate: &'static str,
    message: String,
}

pub async fn run(
    mut client: TcpStream,
    peer: SocketAddr,
    proxy: Arc<PgProxy>,
) -> Result<(), WireError> {
    let _ = client.set_nodelay(true);
    let parameters = loop {
        let (code, body) = read_startup(&mut client).await?;
        match code {
            // No TLS or GSS encryption in this version: say so, and the client continues in
            // plaintext (or gives up). Nothing sent before this answer is ever processed.
            wire::SSL_REQUEST | wire::GSSENC_REQUEST => client.write_all(b"N").await?,
            wire::CANCEL_REQUEST => {
                if body.len() == 8 {
                    let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let secret = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                    proxy.forward_cancel(pid, secret).await;
                }
                return Ok(());
            }
            wire::PROTOCOL_3_0 => break wire::parse_parameters(&body)?,
            _ => {
                return refuse(
                    &mut client,
                    "0A000",
                    "unsupported frontend protocol version",
                )
                .await;
            }
        }
    };
    let get = |key: &str| {
        parameters
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    };
    if let Some((key, _)) = parameters
        .iter()
        .find(|(k, _)| !ALLOWED_PARAMETERS.contains(&k.to_ascii_lowercase().as_str()))
    {
        let message = format!("startup parameter {key:?} is not accepted by the Capgate proxy");
        return refuse(&mut client, "42501", &message).await;
    }
    if let Some(encoding) = get("client_encoding") {
        if !["utf8", "utf-8", "unicode"].contains(&encoding.to_ascii_lowercase().as_str()) {
            return refuse(
                &mut client,
                "42501",
                "only client_encoding UTF8 is accepted",
            )
            .await;
        }
    }
    let Some(user) = get("user").map(str::to_owned) else {
        return refuse(&mut client, "28000", "no user given").await;
    };
    if get("database").is_some_and(|db| db != proxy.config.database) {
        let message = format!(
            "this proxy serves database {:?} only",
            proxy.config.database
        );
        return refuse(&mut client, "3D000", &message).await;
    }
    if !peer.ip().is_loopback() && !proxy.config.allow_non_loopback_plaintext {
        return refuse(
            &mut client,
            "28000",
            "plaintext password from a non-loopback client refused (configure TLS)",
        )
        .await;
    }
    wire::write_message(&mut client, &wire::authentication(3)).await?;
    let password = read_message(&mut client, 64 * 1024).await?;
    if password.tag != b'p' {
        return refuse(&mut client, "08P01", "expected a password message").await;
    }
    let token = cstr(&password.body)?.0.to_owned();
    let verified = match proxy.guard.verify_token(&token) {
        Ok(verified) => verified,
        Err((code, reason)) => {
            tracing::warn!(%peer, code = code.as_str(), %reason, "pg login refused");
            return refuse(
                &mut client,
                "28P01",
                &format!("Capgate token refused: {} ({reason})", code.as_str()),
            )
            .await;
        }
    };
    if verified.agent != user {
        return refuse(&mut client, "28000", "user name must be the token's agent").await;
    }
    let read_only = !proxy.token_may_change_database(&verified);
    let application_name = get("application_name").unwrap_or("capgate").to_owned();
    let upstream = match upstream::connect(&UpstreamLogin {
        addr: &proxy.config.upstream.addr,
        user: &proxy.config.upstream.user,
        password: proxy.upstream_password.as_deref(),
        database: &proxy.config.upstream.database,
        application_name: &application_name,
        default_schema: &proxy.config.default_schema,
        read_only,
    })
    .await
    {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::error!(error = %e, "upstream connection failed");
            return refuse(
                &mut client,
                "08006",
                "the database behind Capgate is unavailable",
            )
            .await;
        }
    };
    wire::write_message(&mut client, &wire::authentication(0)).await?;
    for status in &upstream.parameters {
        wire::write_message(&mut client, status).await?;
    }
    let minted = proxy.register_cancel(upstream.backend_key);
    wire::write_message(&mut client, &wire::backend_key(minted.0, minted.1)).await?;
    wire::write_message(&mut client, &wire::ready_for_query(b'I')).await?;
    tracing::info!(%peer, agent = %user, read_only, "pg session started");
    let result = relay(client, upstream.stream, token, proxy.clone()).await;
    proxy.unregister_cancel(minted);
    result
}

async fn refuse(client: &mut TcpStream, sqlstate: &str, message: &str) -> Result<(), WireError> {
    wire::write_message(client, &error_response(sqlstate, message)).await?;
    Ok(())
}

async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    token: String,
    proxy: Arc<PgProxy>,
) -> Result<(), WireError> {
    let (client_read, client_write) = client.into_split();
    let (upstream_read, mut upstream_write) = upstream.into_split();
    // Buffered reads: a typical answer is several small messages in one TCP segment.
    let mut client_read = tokio::io::BufReader::new(client_read);
    let mut upstream_read = tokio::io::BufReader::new(upstream_read);
    let (to_client, outbox) = mpsc::channel::<Vec<u8>>(256);
    let status = Arc::new(AtomicU8::new(b'I'));
    let copy_in = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_client(client_write, outbox));
    let (status_up, copy_up, to_client_up, max) = (
        status.clone(),
        copy_in.clone(),
        to_client.clone(),
        proxy.config.max_frame_bytes,
    );
    let intercept: Intercept = Arc::new(std::sync::Mutex::new(None));
    let intercept_up = intercept.clone();
    let reader = tokio::spawn(async move {
        // Messages already buffered from one TCP read go to the client as one write.
        let mut pending: Vec<u8> = Vec::new();
        while let Ok(message) = read_message(&mut upstream_read, max.max(16 << 20)).await {
            let mut forward = true;
            match message.tag {
                b'Z' => {
                    status_up.store(
                        message.body.first().copied().unwrap_or(b'I'),
                        Ordering::SeqCst,
                    );
                    copy_up.store(false, Ordering::SeqCst);
                }
                b'G' => copy_up.store(true, Ordering::SeqCst),
                // The real backend's key must never reach the client.
                b'K' => forward = false,
                _ => {}
            }
            // During a row-budget check the session reads upstream's answers itself.
            let interceptor = intercept_up.lock().ok().and_then(|slot| slot.clone());
            if let Some(interceptor) = interceptor {
                if interceptor.send(message).await.is_err() {
                    break;
                }
                continue;
            }
            if forward {
                pending.extend_from_slice(&wire::encode(message.tag, &message.body));
            }
            if upstream_read.buffer().is_empty()
                && !pending.is_empty()
                && to_client_up
                    .send(std::mem::take(&mut pending))
                    .await
                    .is_err()
            {
                break;
            }
        }
    });
    let mut session = Session {
        row_budget: proxy.row_budget_of(&token),
        proxy,
        token,
        prepared: HashMap::new(),
        batch: Vec::new(),
        discarding: false,
    };
    let outcome = loop {
        let message =
            match read_message(&mut client_read, session.proxy.config.max_frame_bytes).await {
                Ok(message) => message,
                Err(WireError::Io(_)) => break Ok(()),
                Err(e) => {
                    let _ = to_client
                        .send(wire::encode(
                            b'E',
                            &error_response("08P01", &e.to_string()).body,
                        ))
                        .await;
                    break Err(e);
                }
            };
        let reply = |m: Message| wire::encode(m.tag, &m.body);
        match message.tag {
            b'Q' => {
                let sql = cstr(&message.body)?.0.to_owned();
                match session.check(&sql).await {
                    Ok(checked) if checked.writes && session.row_budget.is_some() => {
                        let budget = session.row_budget.unwrap_or(0);
                        if checked.statements > 1 {
                            let text = "capgate: a multi-statement write cannot run under a row budget; send one statement at a time";
                            let _ = to_client.send(reply(error_response("42501", text))).await;
                            let _ = to_client
                                .send(reply(wire::ready_for_query(status.load(Ordering::SeqCst))))
                                .await;
                            continue;
                        }
                        let in_transaction = status.load(Ordering::SeqCst) == b'T';
                        for out in budgeted(
                            &mut upstream_write,
                            &intercept,
                            message,
                            budget,
                            in_transaction,
                        )
                        .await?
                        {
                            let _ = to_client.send(out).await;
                        }
                    }
                    Ok(_) => upstream_write.write_all(&reply(message)).await?,
                    Err(denial) => {
                        let _ = to_client
                            .send(reply(error_response(denial.sqlstate, &denial.message)))
                            .await;
                        let _ = to_client
                            .send(reply(wire::ready_for_query(status.load(Ordering::SeqCst))))
                            .await;
                    }
                }
            }
            // Extended protocol: a batch is held until Sync or Flush, then checked whole, so
            // nothing of a batch with a denied Parse reaches the upstream.
            b'P' | b'B' | b'D' | b'E' | b'C' => {
                if !session.discarding {
                    session.batch.push(message);
                }
            }
            b'S' | b'H' => {
                let sync = message.tag == b'S';
                if session.discarding {
                    if sync {
                        session.discarding = false;
                        let _ = to_client
                            .send(reply(wire::ready_for_query(status.load(Ordering::SeqCst))))
                            .await;
                    }
                    continue;
                }
                let batch = std::mem::take(&mut session.batch);
                match session.check_batch(&batch).await {
                    Ok(()) => {
                        for held in batch {
                            upstream_write.write_all(&reply(held)).await?;
                        }
                        upstream_write.write_all(&reply(message)).await?;
                    }
                    Err(denial) => {
                        let _ = to_client
                            .send(reply(error_response(denial.sqlstate, &denial.message)))
                            .await;
                        if sync {
                            let _ = to_client
                                .send(reply(wire::ready_for_query(status.load(Ordering::SeqCst))))
                                .await;
                        } else {
                            session.discarding = true;
                        }
                    }
                }
            }
            b'd' | b'c' | b'f' if copy_in.load(Ordering::SeqCst) => {
                upstream_write.write_all(&reply(message)).await?
            }
            b'F' => {
                tracing::warn!("fastpath function call refused");
                let _ = to_client
                    .send(reply(error_response(
                        "42501",
                        "capgate: fastpath function calls are not allowed",
                    )))
                    .await;
                let _ = to_client
                    .send(reply(wire::ready_for_query(status.load(Ordering::SeqCst))))
                    .await;
            }
            b'X' => {
                let _ = upstream_write.write_all(&reply(message)).await;
                break Ok(());
            }
            other => {
                let text = format!("capgate: unexpected message type {:?}", other as char);
                let _ = to_client.send(reply(error_response("08P01", &text))).await;
                break Err(WireError::Malformed("unexpected message type"));
            }
        }
    };
    reader.abort();
    drop(to_client);
    let _ = writer.await;
    outcome
}

/// Writes everything queued for the client, coalescing what is already waiting into one write.
async fn write_client(mut client: OwnedWriteHalf, mut outbox: mpsc::Receiver<Vec<u8>>) {
    while let Some(mut bytes) = outbox.recv().await {
        while let Ok(more) = outbox.try_recv() {
            bytes.extend_from_slice(&more);
        }
        if client.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = client.shutdown().await;
}

type Intercept = Arc<std::sync::Mutex<Option<mpsc::Sender<Message>>>>;

/// What a checked query string holds.
struct Checked {
    statements: usize,
    /// Any access of `write` or worse.
    writes: bool,
}

/// Runs one write inside a transaction (or savepoint) and keeps its effect only if it changed
/// at most `budget` rows; returns what the client should receive.
async fn budgeted(
    upstream: &mut tokio::net::tcp::OwnedWriteHalf,
    intercept: &Intercept,
    query: Message,
    budget: u64,
    in_transaction: bool,
) -> Result<Vec<Vec<u8>>, WireError> {
    let (open, keep, undo) = if in_transaction {
        (
            "SAVEPOINT capgate_row_budget",
            "RELEASE SAVEPOINT capgate_row_budget",
            "ROLLBACK TO SAVEPOINT capgate_row_budget",
        )
    } else {
        ("BEGIN", "COMMIT", "ROLLBACK")
    };
    let (sender, mut answers) = mpsc::channel::<Message>(1024);
    if let Ok(mut slot) = intercept.lock() {
        *slot = Some(sender);
    }
    let result = async {
        let opened = run_collect(upstream, &mut answers, Message { tag: b'Q', body: nul(open) }).await?;
        if opened.iter().any(|m| m.tag == b'E') {
            return Ok(opened.into_iter().map(|m| wire::encode(m.tag, &m.body)).collect());
        }
        let answer = run_collect(upstream, &mut answers, query).await?;
        let failed = answer.iter().any(|m| m.tag == b'E');
        let changed = answer.iter().filter(|m| m.tag == b'C').filter_map(|m| rows_in_tag(&m.body)).max().unwrap_or(0);
        let over = changed > budget;
        let close = if failed || over { undo } else { keep };
        let closed = run_collect(upstream, &mut answers, Message { tag: b'Q', body: nul(close) }).await?;
        let ready = closed.iter().rev().find(|m| m.tag == b'Z').cloned().unwrap_or(wire::ready_for_query(b'I'));
        if over {
            tracing::warn!(changed, budget, "row budget exceeded; rolled back");
            let text = format!("capgate: row budget exceeded: the statement changed {changed} rows, more than the token's budget of {budget}; nothing was changed");
            return Ok(vec![wire::encode(b'E', &error_response("42501", &text).body), wire::encode(ready.tag, &ready.body)]);
        }
        let mut out: Vec<Vec<u8>> = answer.into_iter().filter(|m| m.tag != b'Z').map(|m| wire::encode(m.tag, &m.body)).collect();
        out.push(wire::encode(ready.tag, &ready.body));
        Ok(out)
    }
    .await;
    if let Ok(mut slot) = intercept.lock() {
        *slot = None;
    }
    result
}

/// Sends one simple query and collects upstream's answers up to ReadyForQuery.
async fn run_collect(
    upstream: &mut tokio::net::tcp::OwnedWriteHalf,
    answers: &mut mpsc::Receiver<Message>,
    query: Message,
) -> Result<Vec<Message>, WireError> {
    upstream
        .write_all(&wire::encode(query.tag, &query.body))
        .await?;
    let mut collected = Vec::new();
    while let Some(message) = answers.recv().await {
        let done = message.tag == b'Z';
        collected.push(message);
        if done {
            return Ok(collected);
        }
    }
    Err(WireError::Malformed(
        "upstream closed during a row-budget check",
    ))
}

fn nul(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    body
}

/// Rows a CommandComplete tag reports: `UPDATE 5`, `DELETE 3`, `INSERT 0 7`, `MERGE 2`, `COPY 9`.
fn rows_in_tag(body: &[u8]) -> Option<u64> {
    let tag = std::str::from_utf8(body).ok()?.trim_end_matches('\0');
    tag.rsplit(' ').next()?.parse().ok()
}

struct Session {
    row_budget: Option<u64>,
    proxy: Arc<PgProxy>,
    token: String,
    /// Accesses of statements prepared with SQL `PREPARE`, for `EXECUTE`.
    prepared: HashMap<String, Vec<Access>>,
    batch: Vec<Message>,
    discarding: bool,
}

impl Session {
    async fn check_batch(&mut self, batch: &[Message]) -> Result<(), Denial> {
        for message in batch.iter().filter(|m| m.tag == b'P') {
            let (_name, rest) = cstr(&message.body).map_err(protocol_denial)?;
            let (sql, _) = cstr(rest).map_err(protocol_denial)?;
            let sql = sql.to_owned();
            let checked = self.check(&sql).await?;
            if checked.writes && self.row_budget.is_some() {
                return Err(Denial {
                    sqlstate: "42501",
                    message:
                        "capgate: under a row budget, writes must use the simple query protocol"
                            .into(),
                });
            }
        }
        Ok(())
    }

    /// Classifies `sql` and asks the guard about every access of every statement in it.
    async fn check(&mut self, sql: &str) -> Result<Checked, Denial> {
        let proxy = self.proxy.clone();
        let statements = classify_async(sql, &proxy.config.default_schema, &proxy.limits)
            .await
            .map_err(|e| Denial {
                sqlstate: "42501",
                message: format!("capgate denied: statement not classified ({e})"),
            })?;
        let mut checked = Checked {
            statements: statements.len(),
            writes: false,
        };
        for statement in statements {
            let accesses = match &statement.execute {
                Some(name) => self.prepared.get(name).cloned().ok_or_else(|| Denial {
                    sqlstate: "42501",
                    message: format!("capgate denied: EXECUTE of {name:?}, which was not prepared through Capgate"),
                })?,
                None => statement.accesses.clone(),
            };
            if accesses.is_empty() {
                // Touches nothing, but only for a token that is still valid.
                self.proxy
                    .guard
                    .verify_token(&self.token)
                    .map_err(|(code, reason)| Denial {
                        sqlstate: "42501",
                        message: format!("capgate denied: {} ({reason})", code.as_str()),
                    })?;
            }
            for access in &accesses {
                self.authorize(access, &statement.text).await?;
                checked.writes |= access.verb != Verb::Read;
            }
            if let Some(name) = &statement.prepare {
                self.prepared.insert(name.clone(), accesses);
            }
        }
        Ok(checked)
    }

    async fn authorize(&self, access: &Access, sql: &str) -> Result<(), Denial> {
        let alias = &self.proxy.config.database;
        let resource = match &access.object {
            Object::Relation { schema, name } => format!("pg://{alias}/{schema}.{name}"),
            Object::Schema(schema) => format!("pg://{alias}/{schema}"),
            Object::Database => format!("pg://{alias}"),
        };
        let request = GuardRequest {
            resource,
            verb: access.verb,
            environment: self.proxy.config.environment.clone(),
            attributes: vec![("sql".into(), sql.chars().take(4096).collect())],
        };
        match self
            .proxy
            .guard
            .authorize_with(&self.token, &request, (), self.proxy.ledger.as_ref())
            .await
        {
            Ok(_) => Ok(()),
            Err(decision) => Err(Denial {
                sqlstate: "42501",
                message: match &decision.outcome {
                    Outcome::ApprovalRequired { approval_id, .. } => format!(
                        "capgate: {} on {} needs an operator's approval: request {} (decision {}); once approved, reconnect with the token from POST /v1/approvals/{{id}}/grant",
                        request.verb,
                        request.resource,
                        approval_id.as_deref().unwrap_or("?"),
                        decision.id
                    ),
                    Outcome::Deny { code, reason } => format!(
                        "capgate denied {} on {}: {} ({reason}) (decision {})",
                        request.verb,
                        request.resource,
                        code.as_str(),
                        decision.id
                    ),
                    Outcome::Allow => format!("capgate denied (decision {})", decision.id),
                },
            }),
        }
    }
}

fn protocol_denial(e: WireError) -> Denial {
    Denial {
        sqlstate: "08P01",
        message: format!("capgate: {e}"),
    }
}

/// Verbs that change the database; a session whose token has none runs read-only upstream.
pub(super) fn changes_database(verb: Verb) -> bool {
    verb != Verb::Read
}
