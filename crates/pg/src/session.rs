//! One client session through the PostgreSQL proxy, split by job: startup and login
//! ([`startup`]), the relay of client messages (here: held, checked, forwarded or refused),
//! the statement checks ([`check`]), the write half that only takes what the guard authorised
//! ([`outbound`]) and the reply order towards the client ([`reply`]). Every simple Query and
//! every extended-protocol batch is classified and checked before anything of it reaches the
//! upstream; a denial is an ErrorResponse (42501) and the session stays usable.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::classify::Transaction;
use super::names::{Names, Owes, Step};
use super::wire::{self, cstr, error_response, Message, WireError};
use super::PgProxy;
use capgate_core::containment::audit::AuditEvent;
use capgate_core::guard::Authorized;
use capgate_net::connections::Activity;

use capgate_core::scope::Verb;

mod check;
mod outbound;
mod reply;
mod startup;
#[cfg(test)]
mod tests;

use outbound::{Control, CopyMessage, Outgoing, OwnStatement, Upstream};
use reply::{deliver, Owed};
use startup::{refuse, start};

/// Why a statement may not run, as the client will read it.
struct Denial {
    sqlstate: &'static str,
    message: String,
}

pub async fn run(
    mut client: TcpStream,
    peer: SocketAddr,
    proxy: Arc<PgProxy>,
    activity: Arc<Activity>,
) -> Result<(), WireError> {
    let _ = client.set_nodelay(true);
    let timeout = proxy.config.connections.startup_timeout;
    let established = match tokio::time::timeout(timeout, start(&mut client, peer, &proxy)).await {
        Ok(Ok(Some(established))) => established,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            tracing::warn!(%peer, ?timeout, "pg startup not completed in time: connection closed");
            let message = format!("capgate: startup and login not completed within {timeout:?}");
            let answer = refuse(&mut client, "08P01", &message);
            let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
            return Ok(());
        }
    };
    // A logged-in session is never shed to make room: only connections still in startup are.
    let _busy = activity.begin();
    activity.establish();
    relay(
        client,
        established.upstream,
        established.token,
        established.overloaded,
        proxy,
    )
    .await
}

/// State both directions of one session read; they run in one task, so these are never
/// contended, only shared.
struct Shared {
    /// Transaction status from upstream's latest ReadyForQuery.
    status: AtomicU8,
    copy_in: AtomicBool,
    /// Forwarded requests whose ReadyForQuery has not come back yet.
    in_flight: AtomicUsize,
    /// Counts upstream's returns to idle: portals die with the transaction they were made in.
    epoch: AtomicU64,
    /// Prepared statement names as upstream has confirmed them, and the changes in flight.
    names: std::sync::Mutex<Names>,
}

/// Both directions of a session run as two futures of one task: a statement's round trip
/// costs no hand-off between threads.
async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    token: String,
    overloaded: HashSet<String>,
    proxy: Arc<PgProxy>,
) -> Result<(), WireError> {
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let client = Streams {
        read: client_read,
        write: client_write,
    };
    let upstream = Streams {
        read: upstream_read,
        write: upstream_write,
    };
    relay_streams(client, upstream, token, overloaded, proxy).await
}

/// Both halves of one side of a session. The relay is written against any byte streams, so
/// that its state machine can be driven with in-memory frames (see the tests).
struct Streams<R, W> {
    read: R,
    write: W,
}

async fn relay_streams<CR, CW, UR, UW>(
    client: Streams<CR, CW>,
    upstream: Streams<UR, UW>,
    token: String,
    overloaded: HashSet<String>,
    proxy: Arc<PgProxy>,
) -> Result<(), WireError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin + Send,
{
    let Streams {
        read: client_read,
        write: client_write,
    } = client;
    let Streams {
        read: upstream_read,
        write: upstream_write,
    } = upstream;
    let shared = Shared {
        status: AtomicU8::new(b'I'),
        copy_in: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        epoch: AtomicU64::new(0),
        names: std::sync::Mutex::new(Names::default()),
    };
    let (owe, owed) = mpsc::unbounded_channel();
    let upstream_max = proxy.config.max_frame_bytes.max(16 << 20);
    let mut session = Session {
        row_budget: proxy.row_budget_of(&token),
        proxy,
        token,
        overloaded,
        portals: HashMap::new(),
        batch: Vec::new(),
        discarding: false,
        unsynced: false,
        deferred: std::sync::Mutex::new(Vec::new()),
        shared: &shared,
        owe,
        upstream: Upstream::new(upstream_write),
    };
    let outcome = {
        let from_client = session.serve(client_read);
        let to_client = deliver(upstream_read, client_write, owed, &shared, upstream_max);
        tokio::pin!(from_client, to_client);
        tokio::select! {
            outcome = &mut from_client => {
                // The client is done; let what it is owed (a last error, say) reach it.
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut to_client).await;
                outcome
            }
            delivered = &mut to_client => delivered,
        }
    };
    // The session is over; an open transaction dies with it upstream.
    session.release_deferred();
    outcome
}

/// Rows a CommandComplete tag reports: `UPDATE 5`, `DELETE 3`, `INSERT 0 7`, `MERGE 2`, `COPY 9`.
fn rows_in_tag(body: &[u8]) -> Option<u64> {
    let tag = std::str::from_utf8(body).ok()?.trim_end_matches('\0');
    tag.rsplit(' ').next()?.parse().ok()
}

/// The client-facing half of a session, and what it remembers between messages.
struct Session<'s, W> {
    row_budget: Option<u64>,
    /// Pure built-ins' names that the session's schema overloads: calls of them are not reads.
    overloaded: HashSet<String>,
    proxy: Arc<PgProxy>,
    token: String,
    /// Portals by name: the statements bound and the transaction epoch they were bound in.
    /// (Statement names live in `Shared::names`: upstream's answers change them.)
    portals: HashMap<String, (check::Bound, u64)>,
    /// An extended-protocol batch, held until Sync or Flush.
    batch: Vec<BytesMut>,
    discarding: bool,
    /// Messages forwarded up to a Flush wait upstream for a Sync.
    unsynced: bool,
    /// Audit records of writes allowed inside the open transaction block; stored (all at
    /// once) before its COMMIT is forwarded, or the transaction is rolled back instead.
    deferred: std::sync::Mutex<Vec<AuditEvent>>,
    shared: &'s Shared,
    owe: mpsc::UnboundedSender<Owed>,
    /// Takes only what the guard authorised and the proxy's own control messages.
    upstream: Upstream<W>,
}

impl<W: AsyncWrite + Unpin + Send> Session<'_, W> {
    /// Client to upstream, until the client leaves; then nothing more is owed to it.
    async fn serve(&mut self, client: impl AsyncRead + Unpin) -> Result<(), WireError> {
        let outcome = self.serve_messages(client).await;
        let (closed, _) = mpsc::unbounded_channel();
        self.owe = closed;
        outcome
    }

    async fn serve_messages(
        &mut self,
        mut client: impl AsyncRead + Unpin,
    ) -> Result<(), WireError> {
        let mut framer = wire::Framer::new(self.proxy.config.max_frame_bytes);
        let idle_limit = self.proxy.config.connections.session_idle_timeout;
        loop {
            let next = loop {
                let Some(limit) = idle_limit else {
                    break framer.read(&mut client).await;
                };
                // The framer's read is cancel-safe: a timeout loses no half-read frame.
                match tokio::time::timeout(limit, framer.read(&mut client)).await {
                    Ok(next) => break next,
                    // Waiting on upstream's answer is not idleness.
                    Err(_) if self.shared.in_flight.load(Ordering::SeqCst) > 0 => continue,
                    Err(_) => {
                        tracing::info!(?limit, "pg session idle too long: ended");
                        self.reply(error_response(
                            "57P05",
                            "capgate: terminating connection due to idle-session timeout",
                        ));
                        return Ok(());
                    }
                }
            };
            let frame = match next {
                Ok(frame) => frame,
                Err(WireError::Io(_)) => return Ok(()),
                Err(e) => {
                    self.reply(error_response("08P01", &e.to_string()));
                    return Err(e);
                }
            };
            match frame[0] {
                b'Q' => self.query(frame).await?,
                // Extended protocol: a batch is held until Sync or Flush, then checked whole,
                // so nothing of a batch with a denied message reaches the upstream.
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    if !self.discarding {
                        self.batch.push(frame);
                    }
                }
                // In copy-in mode PostgreSQL ignores Sync and Flush: libpq and tokio-postgres
                // send a Sync with the COPY's batch and another after CopyDone, and only the
                // second is answered. Forwarded, owing nothing.
                b'S' | b'H'
                    if self.shared.copy_in.load(Ordering::SeqCst)
                        && self.batch.is_empty()
                        && !self.discarding =>
                {
                    let control = if frame[0] == b'S' {
                        Control::Sync
                    } else {
                        Control::Flush
                    };
                    self.upstream.send(control).await?
                }
                b'S' | b'H' => self.sync(frame).await?,
                // Copy messages outside copy-in mode are ignored by PostgreSQL (a client still
                // streaming after the server rejected its COPY), so they go upstream in order:
                // within a held batch if there is one, never with a refused one.
                b'd' | b'c' | b'f' if self.discarding => {}
                b'd' | b'c' | b'f' if !self.batch.is_empty() => self.batch.push(frame),
                b'd' | b'c' | b'f' => {
                    if let Some(copy) = CopyMessage::new(frame) {
                        self.upstream.send(Control::Copy(copy)).await?
                    }
                }
                b'F' => {
                    tracing::warn!("fastpath function call refused");
                    self.reply(error_response(
                        "42501",
                        "capgate: fastpath function calls are not allowed",
                    ));
                    self.ready();
                }
                b'X' => {
                    let _ = self.upstream.send(Control::Terminate).await;
                    return Ok(());
                }
                other => {
                    let text = format!("capgate: unexpected message type {:?}", other as char);
                    self.reply(error_response("08P01", &text));
                    return Err(WireError::Malformed("unexpected message type"));
                }
            }
        }
    }

    /// Queues a reply of the proxy's own, after everything forwarded before it.
    fn reply(&self, message: Message) {
        let _ = self
            .owe
            .send(Owed::Local(wire::encode(message.tag, &message.body)));
    }

    /// Queues a ReadyForQuery carrying upstream's transaction status at that point.
    fn ready(&self) {
        let _ = self.owe.send(Owed::Ready);
    }

    fn deny(&self, denial: &Denial, ready: bool) {
        self.reply(error_response(denial.sqlstate, &denial.message));
        if ready {
            self.ready();
        }
    }

    /// Sends what the guard authorised (or a control message of the proxy's) upstream;
    /// `answered` when it ends with a request upstream answers with ReadyForQuery (a Query or
    /// a Sync). `steps`: what each message or statement in it owes, and the name changes
    /// upstream's answers will confirm.
    async fn forward(
        &mut self,
        outgoing: impl Into<Outgoing<'_>>,
        steps: Vec<Step>,
        answered: bool,
    ) -> Result<(), WireError> {
        lock(&self.shared.names).expect(steps, answered);
        if answered {
            self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
            let _ = self.owe.send(Owed::Upstream);
        }
        self.upstream.send(outgoing).await?;
        Ok(())
    }

    async fn query(&mut self, frame: BytesMut) -> Result<(), WireError> {
        let sql = match cstr(&frame[5..]) {
            Ok((sql, _)) => sql.to_owned(),
            Err(e) => {
                self.deny(&protocol_denial(e), true);
                return Ok(());
            }
        };
        let (checked, authorized) = match self.check(&sql, frame).await {
            Ok(checked) => checked,
            Err(denial) => {
                self.deny(&denial, true);
                return Ok(());
            }
        };
        if let (true, Some(budget)) = (checked.writes, self.row_budget) {
            return self.budgeted(&authorized, checked.steps, budget).await;
        }
        if !self.transaction_ends(checked.ends).await? {
            self.ready();
            return Ok(());
        }
        self.forward(&authorized, checked.steps, true).await
    }

    async fn sync(&mut self, frame: BytesMut) -> Result<(), WireError> {
        let sync = frame[0] == b'S';
        if self.discarding {
            if sync {
                self.discarding = false;
                self.end_sequence().await?;
            }
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        if batch.is_empty() {
            self.unsynced = !sync;
            let control = if sync { Control::Sync } else { Control::Flush };
            return self.forward(control, Vec::new(), sync).await;
        }
        let (ends, staged, authorized) = match self.check_batch(batch, &frame).await {
            Ok(checked) => checked,
            Err(denial) => {
                self.deny(&denial, false);
                self.discarding = !sync;
                if sync {
                    self.end_sequence().await?;
                }
                return Ok(());
            }
        };
        if !self.transaction_ends(ends).await? {
            if sync {
                self.end_sequence().await?;
            }
            self.discarding = !sync;
            return Ok(());
        }
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        for (name, bound) in staged.portals {
            match bound {
                Some(bound) => self.portals.insert(name, (bound, epoch)),
                None => self.portals.remove(&name),
            };
        }
        self.unsynced = !sync;
        self.forward(&authorized, staged.steps, sync).await
    }

    /// Answers a Sync the proxy did not forward with its batch: with upstream's own
    /// ReadyForQuery if messages forwarded before (up to a Flush) still wait for a Sync
    /// there, else with one of the proxy's. Either way exactly one per Sync.
    async fn end_sequence(&mut self) -> Result<(), WireError> {
        if !self.unsynced {
            self.ready();
            return Ok(());
        }
        self.unsynced = false;
        self.forward(Control::Sync, Vec::new(), true).await
    }

    /// Before a COMMIT goes upstream, the transaction's deferred audit records are stored; if
    /// they cannot be, the transaction is rolled back instead and the client told why.
    /// Returns whether the statement may go on.
    async fn transaction_ends(&mut self, ends: Option<Transaction>) -> Result<bool, WireError> {
        match ends {
            Some(Transaction::Commit) => {
                let events = std::mem::take(&mut *lock(&self.deferred));
                if events.is_empty() {
                    return Ok(true);
                }
                match self.proxy.ledger.audit_batch(&events).await {
                    Ok(()) => Ok(true),
                    Err(failure) => {
                        tracing::error!(code = failure.code.as_str(), reason = %failure.reason, writes = events.len(), "audit records unstorable at commit; rolling back");
                        for event in events {
                            self.proxy.ledger.record_later(event);
                        }
                        let (answers, mut discard) = mpsc::unbounded_channel();
                        lock(&self.shared.names).expect(vec![Step::plain(Owes::Statement)], true);
                        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
                        let _ = self.owe.send(Owed::Intercepted(answers));
                        self.upstream
                            .send(Control::Statement(OwnStatement::Rollback))
                            .await?;
                        discard.close();
                        self.reply(error_response("42501", &format!(
                            "capgate: the audit records of this transaction's writes could not be stored ({}: {}); the transaction was rolled back",
                            failure.code, failure.reason
                        )));
                        Ok(false)
                    }
                }
            }
            Some(Transaction::Rollback) => {
                self.release_deferred();
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// Deferred records of writes that will never commit still belong in the trail.
    fn release_deferred(&self) {
        for event in std::mem::take(&mut *lock(&self.deferred)) {
            self.proxy.ledger.record_later(event);
        }
    }

    /// Runs one write inside a transaction (or savepoint) and keeps its effect only if it
    /// changed at most `budget` rows.
    async fn budgeted(
        &mut self,
        query: &Authorized<BytesMut>,
        steps: Vec<Step>,
        budget: u64,
    ) -> Result<(), WireError> {
        let in_transaction = self.shared.status.load(Ordering::SeqCst) == b'T';
        let (open, keep, undo) = if in_transaction {
            (
                OwnStatement::Savepoint,
                OwnStatement::ReleaseSavepoint,
                OwnStatement::RollbackToSavepoint,
            )
        } else {
            (
                OwnStatement::Begin,
                OwnStatement::Commit,
                OwnStatement::Rollback,
            )
        };
        let opened = self
            .run_intercepted(Control::Statement(open), Vec::new())
            .await?;
        if opened.iter().any(|m| m.tag == b'E') {
            for message in opened {
                self.reply(message);
            }
            return Ok(());
        }
        let answer = self.run_intercepted(query, steps).await?;
        let failed = answer.iter().any(|m| m.tag == b'E');
        let changed = answer
            .iter()
            .filter(|m| m.tag == b'C')
            .filter_map(|m| rows_in_tag(&m.body))
            .max()
            .unwrap_or(0);
        let over = changed > budget;
        let close = if failed || over { undo } else { keep };
        let closed = self
            .run_intercepted(Control::Statement(close), Vec::new())
            .await?;
        let ready = closed
            .into_iter()
            .rev()
            .find(|m| m.tag == b'Z')
            .unwrap_or(wire::ready_for_query(b'I'));
        if over {
            tracing::warn!(changed, budget, "row budget exceeded; rolled back");
            let text = format!("capgate: row budget exceeded: the statement changed {changed} rows, more than the token's budget of {budget}; nothing was changed");
            self.reply(error_response("42501", &text));
        } else {
            for message in answer.into_iter().filter(|m| m.tag != b'Z') {
                self.reply(message);
            }
        }
        self.reply(ready);
        Ok(())
    }

    /// Sends one request and collects upstream's answers up to ReadyForQuery. `steps` as
    /// for [`Session::forward`]; none means a single statement that changes no name.
    async fn run_intercepted(
        &mut self,
        request: impl Into<Outgoing<'_>>,
        mut steps: Vec<Step>,
    ) -> Result<Vec<Message>, WireError> {
        if steps.is_empty() {
            steps.push(Step::plain(Owes::Statement));
        }
        lock(&self.shared.names).expect(steps, true);
        let (answers, mut collected_answers) = mpsc::unbounded_channel();
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let _ = self.owe.send(Owed::Intercepted(answers));
        self.upstream.send(request).await?;
        let mut collected = Vec::new();
        while let Some(message) = collected_answers.recv().await {
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
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
