//! Judging what a session asks for before any of it reaches upstream: a simple Query's
//! statements, an extended-protocol batch's Parse, Bind and Execute messages. Every
//! statement is judged by its own accesses plus those of every prepared statement it runs,
//! looked up by name as the server will find it then (`names`); what a request changes about
//! names is staged with it and applied only when upstream confirms.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;

use super::super::classify::{classify_async, Access, NameChange, Object, Statement, Transaction};
use super::super::names::{Change, Entry, Owes, Prepared, Step};
use super::super::parameters::{self, read_bind, read_parse_types};
use super::super::wire::cstr;
use super::{lock, protocol_denial, Denial, Session};
use capgate_core::containment::audit::AuditEvent;
use capgate_core::guard::{Ledger, LedgerDenial, Outcome, Request as GuardRequest};
use capgate_core::scope::Verb;

/// How deep EXECUTE may nest through prepared statements before the proxy stops looking
/// (PostgreSQL itself would run out of stack on a cycle).
const MAX_EXECUTE_DEPTH: usize = 8;

/// What a checked query string holds.
pub(super) struct Checked {
    pub statements: usize,
    /// Any access of `write` or worse.
    pub writes: bool,
    /// Where the string commits or rolls back a transaction, if it does.
    pub ends: Option<Transaction>,
    /// What each statement owes upstream's answer, and the name changes it makes.
    pub steps: Vec<Step>,
}

/// What a batch changes once it is forwarded; nothing changes for a batch that is refused,
/// because upstream never sees it.
#[derive(Default)]
pub(super) struct Staged {
    /// Portals bound (with the statements they may run) or closed.
    pub portals: Vec<(String, Option<Bound>)>,
    /// What each message owes upstream's answer, and the name changes it makes.
    pub steps: Vec<Step>,
    /// Name changes of the batch's earlier messages, which all succeeded if a later one runs.
    overlay: Vec<Change>,
}

/// What a portal was bound to: the statements it may run (one, unless a change to its
/// statement's name was still in flight when it was bound) and the Bind's parameter values.
pub(super) struct Binding {
    pub statements: Vec<Arc<Prepared>>,
    pub values: Vec<parameters::Value>,
}

pub(super) type Bound = Arc<Binding>;

/// How far a statement goes when it is judged. A Parse only prepares it: an access that
/// needs an approval is judged then for everything but the approval, which is asked for at
/// each execution, over the statement and the parameter values that execution binds (an
/// approval of the text alone would admit any value).
#[derive(Clone, Copy)]
pub(super) enum Phase<'a> {
    Prepare,
    Run {
        /// The bound values as shown to approvers (none for a simple Query).
        parameters: Option<&'a str>,
        /// What the statement runs with, for a preview of its effect.
        types: &'a [u32],
        values: &'a [parameters::Value],
    },
}

impl Phase<'_> {
    const SIMPLE: Phase<'static> = Phase::Run {
        parameters: None,
        types: &[],
        values: &[],
    };
}

/// A name that may hold anything: its use is a deny.
fn in_doubt(name: &str) -> Denial {
    Denial {
        sqlstate: "26000",
        message: format!("capgate denied: prepared statement {name:?} may have been changed in a way the proxy cannot follow (DO, CALL or an unexpected answer); DEALLOCATE it and prepare it again"),
    }
}

fn unprepared(name: &str) -> Denial {
    Denial {
        sqlstate: "26000",
        message: format!("capgate: prepared statement {name:?} was not prepared through Capgate"),
    }
}

fn exists(name: &str) -> Denial {
    Denial {
        sqlstate: "42P05",
        message: format!("capgate: prepared statement {name:?} already exists"),
    }
}

/// The name changes one statement makes when it succeeds.
fn changes_of(statement: &Statement) -> Vec<Change> {
    match &statement.names {
        Some(NameChange::Prepare(name)) => vec![Change::Create(
            name.clone(),
            Arc::new(Prepared {
                text: statement.text.clone(),
                accesses: statement.accesses.clone(),
                executes: statement.executes.clone(),
                plans_only: statement.plans_only,
                writes: statement.accesses.iter().any(|a| a.verb != Verb::Read),
                transaction: None,
                changes: Vec::new(),
                param_types: Vec::new(),
                deferred: false,
            }),
        )],
        Some(NameChange::Deallocate(name)) => vec![Change::Drop(name.clone())],
        Some(NameChange::DeallocateAll) => vec![Change::DropAll],
        Some(NameChange::Doubt) => vec![Change::Doubt],
        None => Vec::new(),
    }
}

/// A statement that may have run partly before failing still leaves doubt behind.
fn failure_changes(changes: &[Change]) -> Vec<Change> {
    changes
        .iter()
        .filter(|c| matches!(c, Change::Doubt))
        .cloned()
        .collect()
}

impl<W: tokio::io::AsyncWrite + Unpin + Send> Session<'_, W> {
    /// Classifies a simple Query string and asks the guard about every access of every
    /// statement in it.
    pub(super) async fn check(&mut self, sql: &str) -> Result<Checked, Denial> {
        let statements = self.classify(sql).await?;
        let control = statements.iter().any(|s| s.transaction.is_some());
        let mut checked = Checked {
            statements: statements.len(),
            writes: false,
            ends: None,
            steps: Vec::new(),
        };
        let mut overlay = Vec::new();
        for statement in statements {
            let (accesses, changes, _) = self
                .check_statement(&statement, control, &overlay, Phase::SIMPLE)
                .await?;
            checked.writes |= accesses.iter().any(|a| a.verb != Verb::Read);
            if matches!(
                statement.transaction,
                Some(Transaction::Commit | Transaction::Rollback)
            ) {
                checked.ends = statement.transaction;
            }
            overlay.extend(changes.iter().cloned());
            checked.steps.push(Step {
                owes: Owes::Statement,
                err: failure_changes(&changes),
                ok: changes,
            });
        }
        Ok(checked)
    }

    /// Authorizes what one classified statement touches, its own accesses and those of what
    /// it executes; returns them with the name changes it makes, and whether an approval
    /// waits for its execution.
    async fn check_statement(
        &mut self,
        statement: &Statement,
        control: bool,
        overlay: &[Change],
        phase: Phase<'_>,
    ) -> Result<(Vec<Access>, Vec<Change>, bool), Denial> {
        let mut accesses = statement.accesses.clone();
        for name in &statement.executes {
            self.resolve(name, overlay, statement.plans_only, 0, &mut accesses)?;
        }
        accesses.sort();
        accesses.dedup();
        let deferred = self
            .authorize_all(&accesses, &statement.text, control, phase)
            .await
            .map_err(|denial| explained(denial, statement))?;
        if let Some(NameChange::Prepare(name)) = &statement.names {
            // PostgreSQL refuses a name in use; so does the proxy, and for a name in doubt.
            if self.candidates(name, overlay).iter().any(Option::is_some) {
                return Err(exists(name));
            }
        }
        Ok((accesses, changes_of(statement), deferred))
    }

    fn candidates(&self, name: &str, overlay: &[Change]) -> Vec<Option<Entry>> {
        lock(&self.shared.names).candidates(name, overlay)
    }

    /// Adds what running the prepared statement `name` touches, as the server may find it
    /// when it runs (every possible outcome of changes in flight), including what it runs
    /// in turn.
    fn resolve(
        &self,
        name: &str,
        overlay: &[Change],
        plans_only: bool,
        depth: usize,
        accesses: &mut Vec<Access>,
    ) -> Result<(), Denial> {
        if depth >= MAX_EXECUTE_DEPTH {
            return Err(Denial {
                sqlstate: "42501",
                message: format!("capgate denied: EXECUTE of {name:?} nests more than {MAX_EXECUTE_DEPTH} prepared statements deep"),
            });
        }
        let candidates = self.candidates(name, overlay);
        if candidates.iter().all(Option::is_none) {
            return Err(unprepared(name));
        }
        for candidate in candidates {
            match candidate {
                None => {} // the server would refuse to run it
                Some(Entry::Unknown) => return Err(in_doubt(name)),
                Some(Entry::Known(prepared)) => {
                    accesses.extend(executed(&prepared.accesses, plans_only));
                    for inner in &prepared.executes {
                        let plans_only = plans_only || prepared.plans_only;
                        self.resolve(inner, overlay, plans_only, depth + 1, accesses)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The statements `name` may hold for a Bind: every candidate known, none in doubt.
    fn bindable(&self, name: &str, overlay: &[Change]) -> Result<Vec<Arc<Prepared>>, Denial> {
        let mut bound = Vec::new();
        for candidate in self.candidates(name, overlay) {
            match candidate {
                None => {}
                Some(Entry::Unknown) => return Err(in_doubt(name)),
                Some(Entry::Known(prepared)) => bound.push(prepared),
            }
        }
        if bound.is_empty() {
            return Err(unprepared(name));
        }
        Ok(bound)
    }

    async fn classify(&self, sql: &str) -> Result<Vec<Statement>, Denial> {
        let mut statements =
            classify_async(sql, &self.proxy.config.default_schema, &self.proxy.limits)
                .await
                .map_err(|e| Denial {
                    sqlstate: "42501",
                    message: format!("capgate denied: statement not classified ({e})"),
                })?;
        for statement in &mut statements {
            statement.calls_overloads_as_impure(&self.overloaded);
        }
        Ok(statements)
    }

    /// Classifies one Parse and authorizes what it touches (approvals wait for executions).
    async fn parse(
        &mut self,
        sql: &str,
        param_types: Vec<u32>,
        control: bool,
        overlay: &[Change],
    ) -> Result<Prepared, Denial> {
        let statements = self.classify(sql).await?;
        let mut parsed = Prepared {
            text: sql.to_owned(),
            accesses: Vec::new(),
            executes: Vec::new(),
            plans_only: false,
            writes: false,
            transaction: None,
            changes: Vec::new(),
            param_types,
            deferred: false,
        };
        for statement in statements {
            let (accesses, changes, deferred) = self
                .check_statement(&statement, control, overlay, Phase::Prepare)
                .await?;
            parsed.deferred |= deferred;
            parsed.writes |= accesses.iter().any(|a| a.verb != Verb::Read);
            parsed.transaction = parsed.transaction.or(statement.transaction);
            parsed.accesses.extend(statement.accesses.iter().cloned());
            parsed.executes.extend(statement.executes.iter().cloned());
            parsed.plans_only |= statement.plans_only;
            parsed.changes.extend(changes);
        }
        Ok(parsed)
    }

    /// Checks an extended-protocol batch: every Parse is classified and authorized, every
    /// Execute of a statement parsed earlier is authorized again (the token may have been
    /// revoked, a freeze begun, a limit reached since) against every statement its portal
    /// may run. Returns how the batch ends a transaction, and what to apply and expect once
    /// it is forwarded.
    pub(super) async fn check_batch(
        &mut self,
        batch: &[BytesMut],
    ) -> Result<(Option<Transaction>, Staged), Denial> {
        let mut staged = Staged::default();
        let mut fresh: Vec<Arc<Prepared>> = Vec::new();
        let mut bound_here: Vec<String> = Vec::new();
        let mut ends = None;
        let control = self.batch_has_control(batch);
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        for frame in batch {
            let body = frame.get(5..).unwrap_or_default();
            match frame.first() {
                Some(b'P') => {
                    let (name, rest) = cstr(body).map_err(protocol_denial)?;
                    let (sql, rest) = cstr(rest).map_err(protocol_denial)?;
                    let types = read_parse_types(rest).map_err(protocol_denial)?;
                    let overlay = &staged.overlay;
                    if !name.is_empty()
                        && self.candidates(name, overlay).iter().any(Option::is_some)
                    {
                        return Err(exists(name));
                    }
                    let parsed = self.parse(sql, types, control, overlay).await?;
                    if parsed.writes && self.row_budget.is_some() {
                        return Err(Denial {
                            sqlstate: "42501",
                            message: "capgate: under a row budget, writes must use the simple query protocol".into(),
                        });
                    }
                    let parsed = Arc::new(parsed);
                    fresh.push(parsed.clone());
                    let created = Change::Create(name.to_owned(), parsed);
                    staged.overlay.push(created.clone());
                    // A failed Parse of the unnamed statement has dropped the old one, or
                    // was skipped and kept it: either way, it is not the new one.
                    let err = if name.is_empty() {
                        vec![Change::Forget(String::new())]
                    } else {
                        Vec::new()
                    };
                    staged.steps.push(Step {
                        owes: Owes::Parse,
                        ok: vec![created],
                        err,
                    });
                }
                Some(b'B') => {
                    let (portal, rest) = cstr(body).map_err(protocol_denial)?;
                    let (statement, rest) = cstr(rest).map_err(protocol_denial)?;
                    let values = read_bind(rest).map_err(protocol_denial)?;
                    let bound = Arc::new(Binding {
                        statements: self.bindable(statement, &staged.overlay)?,
                        values,
                    });
                    if !portal.is_empty() && self.portal(&staged, portal, epoch).is_some() {
                        return Err(Denial {
                            sqlstate: "42P03",
                            message: format!("capgate: portal {portal:?} already exists"),
                        });
                    }
                    bound_here.push(portal.to_owned());
                    staged.portals.push((portal.to_owned(), Some(bound)));
                    staged.steps.push(Step::plain(Owes::Bind));
                }
                Some(b'E') => {
                    let (portal, _) = cstr(body).map_err(protocol_denial)?;
                    // The unnamed portal must be bound in the same batch: a Bind that failed
                    // upstream would otherwise leave an older portal running under this name.
                    let usable = !portal.is_empty() || bound_here.iter().any(|p| p.is_empty());
                    let bound = self
                        .portal(&staged, portal, epoch)
                        .filter(|_| usable)
                        .ok_or_else(|| Denial {
                            sqlstate: "34000",
                            message: format!("capgate: portal {portal:?} was not bound in this batch or transaction"),
                        })?;
                    for parsed in bound.statements.iter() {
                        // Parsed in this batch: authorized moments ago, once is enough,
                        // unless an approval waits for the values this execution binds.
                        if parsed.deferred || !fresh.iter().any(|p| Arc::ptr_eq(p, parsed)) {
                            let mut accesses = parsed.accesses.clone();
                            for name in &parsed.executes {
                                self.resolve(
                                    name,
                                    &staged.overlay,
                                    parsed.plans_only,
                                    0,
                                    &mut accesses,
                                )?;
                            }
                            accesses.sort();
                            accesses.dedup();
                            let shown = parameters::render(&bound.values, &parsed.param_types);
                            let parameters = (!shown.is_empty()).then_some(shown.as_str());
                            let phase = Phase::Run {
                                parameters,
                                types: &parsed.param_types,
                                values: &bound.values,
                            };
                            self.authorize_all(&accesses, &parsed.text, control, phase)
                                .await?;
                        }
                        if parsed.transaction.is_some() {
                            ends = parsed.transaction;
                        }
                    }
                    let ok = match &bound.statements[..] {
                        [one] => one.changes.clone(),
                        several if several.iter().all(|p| p.changes.is_empty()) => Vec::new(),
                        _ => vec![Change::Doubt],
                    };
                    staged.overlay.extend(ok.iter().cloned());
                    staged.steps.push(Step {
                        owes: Owes::Execute,
                        err: failure_changes(&ok),
                        ok,
                    });
                }
                Some(b'C') => {
                    let (kind, rest) = body.split_first().ok_or(Denial {
                        sqlstate: "08P01",
                        message: "capgate: empty Close message".into(),
                    })?;
                    let (name, _) = cstr(rest).map_err(protocol_denial)?;
                    let mut step = Step::plain(Owes::Close);
                    match kind {
                        b'S' => {
                            staged.overlay.push(Change::Drop(name.to_owned()));
                            step.ok.push(Change::Drop(name.to_owned()));
                        }
                        _ => staged.portals.push((name.to_owned(), None)),
                    }
                    staged.steps.push(step);
                }
                Some(b'D') => staged.steps.push(Step::plain(Owes::Describe)),
                _ => {}
            }
        }
        Ok((ends, staged))
    }

    /// Whether any statement of the batch controls transactions, judged on what is known
    /// before checking: a Parse of one, or an Execute of one prepared earlier.
    fn batch_has_control(&self, batch: &[BytesMut]) -> bool {
        let controls = |name: &str| {
            self.candidates(name, &[]).iter().any(|c| match c {
                Some(Entry::Known(p)) => p.transaction.is_some(),
                Some(Entry::Unknown) => true,
                None => false,
            })
        };
        batch.iter().any(|frame| {
            let body = frame.get(5..).unwrap_or_default();
            match frame.first() {
                Some(b'P') => cstr(body)
                    .and_then(|(_, rest)| cstr(rest))
                    .map(|(sql, _)| looks_like_transaction_control(sql))
                    .unwrap_or(true),
                Some(b'B') => cstr(body)
                    .and_then(|(_, rest)| cstr(rest))
                    .map(|(statement, _)| controls(statement))
                    .unwrap_or(true),
                Some(b'E') => cstr(body)
                    .map(|(portal, _)| {
                        self.portals.get(portal).is_some_and(|(b, _)| {
                            b.statements.iter().any(|p| p.transaction.is_some())
                        })
                    })
                    .unwrap_or(true),
                _ => false,
            }
        })
    }

    fn portal(&self, staged: &Staged, name: &str, epoch: u64) -> Option<Bound> {
        match staged.portals.iter().rev().find(|(n, _)| n == name) {
            Some((_, bound)) => bound.clone(),
            // Portals die with their transaction upstream.
            None => self
                .portals
                .get(name)
                .filter(|(_, bound)| *bound == epoch)
                .map(|(p, _)| p.clone()),
        }
    }

    /// Asks the guard about each access; a statement that touches nothing still needs a
    /// valid token. `control`: the request also controls transactions, so no write in it
    /// may have its audit record deferred to a commit. Returns whether an approval was left
    /// for the execution (only when preparing).
    pub(super) async fn authorize_all(
        &self,
        accesses: &[Access],
        sql: &str,
        control: bool,
        phase: Phase<'_>,
    ) -> Result<bool, Denial> {
        if accesses.is_empty() {
            self.proxy
                .guard
                .verify_token(&self.token)
                .map_err(|(code, reason)| Denial {
                    sqlstate: "42501",
                    message: format!("capgate denied: {} ({reason})", code.as_str()),
                })?;
        }
        // A write inside an open transaction block becomes durable only at COMMIT, so its
        // audit record need only be stored by then; the COMMIT is held until it is. Only
        // when nothing is in flight: otherwise the block may already have ended upstream.
        let in_block = !control
            && self.shared.status.load(Ordering::SeqCst) == b'T'
            && self.shared.in_flight.load(Ordering::SeqCst) == 0;
        let mut deferred = false;
        for access in accesses {
            let defer = in_block && access.verb == Verb::Write;
            deferred |= self.authorize(access, sql, defer, phase).await?;
        }
        Ok(deferred)
    }

    /// One access; `Ok(true)`: prepared, its approval left for each execution.
    async fn authorize(
        &self,
        access: &Access,
        sql: &str,
        defer: bool,
        phase: Phase<'_>,
    ) -> Result<bool, Denial> {
        let resource =
            super::super::resource::resource(&self.proxy.config.database, &access.object);
        // The approval digest covers what is shown: a long statement is cut for the approver
        // but carries the SHA-256 of all of it, so statements sharing a prefix stay distinct.
        let mut attributes = vec![(
            "sql".into(),
            super::super::parameters::bounded(sql.to_owned()),
        )];
        if let Phase::Run {
            parameters: Some(parameters),
            ..
        } = phase
        {
            attributes.push(("parameters".into(), parameters.to_owned()));
        }
        let request = GuardRequest {
            resource,
            verb: access.verb,
            environment: self.proxy.config.environment.clone(),
            attributes,
        };
        let guard = &self.proxy.guard;
        if matches!(phase, Phase::Prepare) && guard.containment().needs_approval(access.verb) {
            // Judged without consuming or requesting an approval: one presented now (for
            // the text alone) must not be spent on a Parse, and one asked for now could
            // not name the values.
            let decision = guard.decide(&self.token, &request);
            return match decision.outcome {
                Outcome::Allow | Outcome::ApprovalRequired { .. } => Ok(true),
                Outcome::Deny { .. } => Err(denial_of(&decision, &request)),
            };
        }
        let deferring = Deferring {
            inner: self.proxy.ledger.as_ref(),
            deferred: &self.deferred,
        };
        let ledger: &dyn Ledger = if defer {
            &deferring
        } else {
            self.proxy.ledger.as_ref()
        };
        match guard
            .authorize_with(&self.token, &request, (), ledger)
            .await
        {
            Ok(_) => Ok(false),
            Err(decision) => {
                if let (
                    Outcome::ApprovalRequired {
                        approval_id: Some(id),
                        ..
                    },
                    Phase::Run { types, values, .. },
                ) = (&decision.outcome, phase)
                {
                    self.preview(id, sql, types, values);
                }
                Err(denial_of(&decision, &request))
            }
        }
    }

    /// Measures what the statement would touch and attaches it to approval `id`, off the
    /// request path: the denial goes back to the client at once.
    fn preview(&self, id: &str, sql: &str, types: &[u32], values: &[parameters::Value]) {
        let proxy = self.proxy.clone();
        let (id, sql, types, values) = (
            id.to_owned(),
            sql.to_owned(),
            types.to_vec(),
            values.to_vec(),
        );
        tokio::spawn(async move {
            let text = super::super::preview::measure(&proxy, &sql, &types, &values).await;
            if let Err(e) = proxy.ledger.attach_preview(&id, &text).await {
                tracing::warn!(approval_id = %id, error = %e, "cannot attach the preview");
            }
        });
    }
}

/// The client's answer to a decision that is not an allow.
fn denial_of(decision: &capgate_core::guard::Decision, request: &GuardRequest) -> Denial {
    Denial {
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
    }
}

/// What running (or, under EXPLAIN without ANALYZE, planning) a prepared statement touches.
fn executed(accesses: &[Access], plans_only: bool) -> Vec<Access> {
    if !plans_only {
        return accesses.to_vec();
    }
    accesses
        .iter()
        .filter(|a| matches!(a.object, Object::Relation { .. }))
        .map(|a| Access {
            verb: Verb::Read,
            object: a.object.clone(),
        })
        .collect()
}

/// A cheap, conservative look at a statement before it is classified: anything that might
/// be transaction control says yes (the classifier decides what it really is).
fn looks_like_transaction_control(sql: &str) -> bool {
    const WORDS: [&str; 9] = [
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
        "prepare",
    ];
    let lower = sql.to_ascii_lowercase();
    WORDS.iter().any(|w| lower.contains(w))
}

/// A denial that names the functions which made the statement a write, when there are any.
fn explained(mut denial: Denial, statement: &Statement) -> Denial {
    if !statement.impure_functions.is_empty() {
        denial.message.push_str(&format!(
            "; the statement is a write on the database because it calls {}, not known to be free of side effects",
            statement.impure_functions.join(", ")
        ));
    }
    denial
}

/// The session's ledger while a write's audit record waits for its transaction's COMMIT;
/// everything else goes straight to the adapter's ledger.
struct Deferring<'a> {
    inner: &'a dyn Ledger,
    deferred: &'a std::sync::Mutex<Vec<AuditEvent>>,
}

#[async_trait::async_trait]
impl Ledger for Deferring<'_> {
    async fn request_approval(
        &self,
        token: &str,
        operation: &capgate_core::containment::Operation,
    ) -> Result<String, LedgerDenial> {
        self.inner.request_approval(token, operation).await
    }

    async fn consume_approval(
        &self,
        token: &str,
        approval_id: &str,
        digest: &str,
    ) -> Result<(), LedgerDenial> {
        self.inner
            .consume_approval(token, approval_id, digest)
            .await
    }

    async fn count(&self, token: &str, verb: Verb) -> Result<(), LedgerDenial> {
        self.inner.count(token, verb).await
    }

    async fn count_use(&self, token: &str) -> Result<(), LedgerDenial> {
        self.inner.count_use(token).await
    }

    async fn audit(&self, event: AuditEvent) -> Result<(), LedgerDenial> {
        lock(self.deferred).push(event);
        Ok(())
    }

    fn record_later(&self, event: AuditEvent) {
        self.inner.record_later(event);
    }
}
