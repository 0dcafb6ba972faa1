//! Judging what a session asks for before any of it reaches upstream: a simple Query's
//! statements, an extended-protocol batch's Parse, Bind and Execute messages. Every
//! statement is judged by its own accesses plus those of every prepared statement it runs,
//! looked up by name as the server will find it then (`names`); what a request changes about
//! names is staged with it and applied only when upstream confirms. A request's operations
//! are gathered into one [`Plan`] and asked of the guard in one call, which wraps the
//! request's bytes: what the session forwards is that `Authorized` and nothing else.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;

use super::super::classify::{classify_async, Access, NameChange, Object, Statement, Transaction};
use super::super::names::{Change, Entry, Owes, Prepared, Step};
use super::super::parameters::{self, read_bind, read_parse_types};
use super::super::wire::cstr;
use super::{lock, protocol_denial, Denial, Session};
use capgate_core::containment::audit::AuditEvent;
use capgate_core::guard::{
    decision_verb, Authorized, Ledger, LedgerDenial, Outcome, Refusal, Request as GuardRequest,
    Stage,
};
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

/// What one request asks the guard, gathered while its messages are checked and asked in
/// one call once they all are: each operation at its stage, and where it came from.
#[derive(Default)]
pub(super) struct Plan {
    operations: Vec<(GuardRequest, Stage)>,
    /// For each operation, the statement it is about (an index into `sources`).
    origins: Vec<usize>,
    sources: Vec<Source>,
}

/// A statement a refusal is about: what explains the refusal and previews its effect.
enum Source {
    /// A statement of a simple Query, run now.
    Query {
        text: String,
        impure_functions: Vec<String>,
    },
    /// A statement of a Parse, prepared now.
    Parse { impure_functions: Vec<String> },
    /// A run of a prepared statement, with the values its Bind gave.
    Execute {
        prepared: Arc<Prepared>,
        binding: Bound,
    },
}

/// One statement of a Parse, kept until the batch shows whether it also runs there.
struct ParsedStatement {
    accesses: Vec<Access>,
    text: String,
    impure_functions: Vec<String>,
}

impl Plan {
    /// Adds one operation per access of a statement. The approval digest covers what is
    /// shown: a long statement is cut for the approver but carries the SHA-256 of all of
    /// it, so statements sharing a prefix stay distinct.
    fn ask(
        &mut self,
        proxy: &super::super::PgProxy,
        accesses: &[Access],
        sql: &str,
        parameters: Option<&str>,
        stage: Stage,
        source: Source,
    ) {
        let origin = self.sources.len();
        self.sources.push(source);
        let mut attributes = vec![("sql".to_owned(), parameters::bounded(sql.to_owned()))];
        if let Some(parameters) = parameters {
            attributes.push(("parameters".into(), parameters.to_owned()));
        }
        for access in accesses {
            let request = GuardRequest {
                resource: super::super::resource::resource(&proxy.config.database, &access.object),
                verb: access.verb,
                environment: proxy.config.environment.clone(),
                attributes: attributes.clone(),
            };
            self.operations.push((request, stage));
            self.origins.push(origin);
        }
    }
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
    /// statement in it, in one call that wraps the Query message itself.
    pub(super) async fn check(
        &mut self,
        sql: &str,
        frame: BytesMut,
    ) -> Result<(Checked, Authorized<BytesMut>), Denial> {
        let statements = self.classify(sql).await?;
        let control = statements.iter().any(|s| s.transaction.is_some());
        let mut checked = Checked {
            statements: statements.len(),
            writes: false,
            ends: None,
            steps: Vec::new(),
        };
        let mut plan = Plan::default();
        let mut overlay = Vec::new();
        for statement in statements {
            let (accesses, changes) = self.check_statement(&statement, &overlay)?;
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
            let source = Source::Query {
                text: statement.text.clone(),
                impure_functions: statement.impure_functions,
            };
            plan.ask(
                &self.proxy,
                &accesses,
                &statement.text,
                None,
                Stage::Run,
                source,
            );
        }
        if checked.writes && self.row_budget.is_some() && checked.statements > 1 {
            return Err(Denial {
                sqlstate: "42501",
                message: "capgate: a multi-statement write cannot run under a row budget; send one statement at a time".into(),
            });
        }
        let authorized = self.authorize_plan(plan, control, frame).await?;
        Ok((checked, authorized))
    }

    /// What one classified statement touches, its own accesses and those of what it
    /// executes, with the name changes it makes.
    fn check_statement(
        &self,
        statement: &Statement,
        overlay: &[Change],
    ) -> Result<(Vec<Access>, Vec<Change>), Denial> {
        let mut accesses = statement.accesses.clone();
        for name in &statement.executes {
            self.resolve(name, overlay, statement.plans_only, 0, &mut accesses)?;
        }
        accesses.sort();
        accesses.dedup();
        if let Some(NameChange::Prepare(name)) = &statement.names {
            // PostgreSQL refuses a name in use; so does the proxy, and for a name in doubt.
            if self.candidates(name, overlay).iter().any(Option::is_some) {
                return Err(exists(name));
            }
        }
        Ok((accesses, changes_of(statement)))
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

    /// Classifies one Parse; what it touches is asked about when the batch is (see
    /// [`Session::check_batch`]).
    async fn parse(
        &mut self,
        sql: &str,
        param_types: Vec<u32>,
        overlay: &[Change],
    ) -> Result<(Prepared, Vec<ParsedStatement>), Denial> {
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
        };
        let mut asks = Vec::with_capacity(statements.len());
        for statement in statements {
            let (accesses, changes) = self.check_statement(&statement, overlay)?;
            parsed.writes |= accesses.iter().any(|a| a.verb != Verb::Read);
            parsed.transaction = parsed.transaction.or(statement.transaction);
            parsed.accesses.extend(statement.accesses.iter().cloned());
            parsed.executes.extend(statement.executes.iter().cloned());
            parsed.plans_only |= statement.plans_only;
            parsed.changes.extend(changes);
            asks.push(ParsedStatement {
                accesses,
                text: statement.text,
                impure_functions: statement.impure_functions,
            });
        }
        Ok((parsed, asks))
    }

    /// Checks an extended-protocol batch and asks the guard about all of it in one call,
    /// which wraps the batch's bytes (its messages, then `terminator`, the Sync or Flush
    /// that ends it). Every Execute is asked about at [`Stage::Run`] with the values its
    /// portal binds, against every statement the portal may run: a statement parsed earlier
    /// is judged again (the token may have been revoked, a freeze begun, a limit reached
    /// since). A Parse that no Execute of the batch runs is asked about at
    /// [`Stage::Prepare`]: an approval it needs waits for each run's values. Returns how the
    /// batch ends a transaction, and what to apply and expect once it is forwarded.
    pub(super) async fn check_batch(
        &mut self,
        batch: Vec<BytesMut>,
        terminator: &[u8],
    ) -> Result<(Option<Transaction>, Staged, Authorized<Vec<u8>>), Denial> {
        let mut staged = Staged::default();
        let mut plan = Plan::default();
        // Parsed here: the statement, what each of its statements touches, whether it ran.
        let mut fresh: Vec<(Arc<Prepared>, Vec<ParsedStatement>, bool)> = Vec::new();
        let mut bound_here: Vec<String> = Vec::new();
        let mut ends = None;
        let control = self.batch_has_control(&batch);
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        for frame in &batch {
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
                    let (parsed, statements) = self.parse(sql, types, overlay).await?;
                    if parsed.writes && self.row_budget.is_some() {
                        return Err(Denial {
                            sqlstate: "42501",
                            message: "capgate: under a row budget, writes must use the simple query protocol".into(),
                        });
                    }
                    let parsed = Arc::new(parsed);
                    fresh.push((parsed.clone(), statements, false));
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
                        for (candidate, _, ran) in fresh.iter_mut() {
                            if Arc::ptr_eq(candidate, parsed) {
                                *ran = true;
                            }
                        }
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
                        let source = Source::Execute {
                            prepared: parsed.clone(),
                            binding: bound.clone(),
                        };
                        plan.ask(
                            &self.proxy,
                            &accesses,
                            &parsed.text,
                            (!shown.is_empty()).then_some(shown.as_str()),
                            Stage::Run,
                            source,
                        );
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
        for (_, statements, ran) in fresh {
            if ran {
                continue; // its runs were asked about, with their values
            }
            for statement in statements {
                let source = Source::Parse {
                    impure_functions: statement.impure_functions,
                };
                let (accesses, text) = (statement.accesses, statement.text);
                plan.ask(&self.proxy, &accesses, &text, None, Stage::Prepare, source);
            }
        }
        let length = batch.iter().map(|f| f.len()).sum::<usize>() + terminator.len();
        let mut bytes = Vec::with_capacity(length);
        for held in &batch {
            bytes.extend_from_slice(held);
        }
        bytes.extend_from_slice(terminator);
        let authorized = self.authorize_plan(plan, control, bytes).await?;
        Ok((ends, staged, authorized))
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

    /// Asks the guard about every operation of `plan` in one call that wraps `payload`; a
    /// request that touches nothing still needs a valid token. `control`: the request also
    /// controls transactions, so no write in it may have its audit record held for a commit.
    pub(super) async fn authorize_plan<P>(
        &self,
        plan: Plan,
        control: bool,
        payload: P,
    ) -> Result<Authorized<P>, Denial> {
        let guard = &self.proxy.guard;
        if plan.operations.is_empty() {
            return guard
                .authorize_token(&self.token, payload)
                .map_err(|decision| {
                    let message = match &decision.outcome {
                        Outcome::Deny { code, reason } => {
                            format!("capgate denied: {} ({reason})", code.as_str())
                        }
                        _ => format!("capgate denied (decision {})", decision.id),
                    };
                    Denial {
                        sqlstate: "42501",
                        message,
                    }
                });
        }
        // A write inside an open transaction block becomes durable only at COMMIT, so its
        // audit record need only be stored by then; the COMMIT is held until it is. Only
        // when nothing is in flight: otherwise the block may already have ended upstream.
        let in_block = !control
            && self.shared.status.load(Ordering::SeqCst) == b'T'
            && self.shared.in_flight.load(Ordering::SeqCst) == 0;
        let ledger = Deferring {
            inner: self.proxy.ledger.as_ref(),
            deferred: &self.deferred,
            hold_writes: in_block,
        };
        match guard
            .authorize_staged(&self.token, &plan.operations, payload, &ledger)
            .await
        {
            Ok(authorized) => Ok(authorized),
            Err(Refusal { decision, index }) => {
                let source = plan
                    .origins
                    .get(index)
                    .and_then(|origin| plan.sources.get(*origin));
                let Some(((request, _), source)) = plan.operations.get(index).zip(source) else {
                    return Err(Denial {
                        sqlstate: "42501",
                        message: format!("capgate denied (decision {})", decision.id),
                    });
                };
                if let Outcome::ApprovalRequired {
                    approval_id: Some(id),
                    ..
                } = &decision.outcome
                {
                    match source {
                        Source::Query { text, .. } => self.preview(id, text, &[], &[]),
                        Source::Execute { prepared, binding } => {
                            self.preview(id, &prepared.text, &prepared.param_types, &binding.values)
                        }
                        Source::Parse { .. } => {}
                    }
                }
                let denial = denial_of(&decision, request);
                Err(match source {
                    Source::Query {
                        impure_functions, ..
                    }
                    | Source::Parse { impure_functions } => explained(denial, impure_functions),
                    Source::Execute { .. } => denial,
                })
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
fn explained(mut denial: Denial, impure_functions: &[String]) -> Denial {
    if !impure_functions.is_empty() {
        denial.message.push_str(&format!(
            "; the statement is a write on the database because it calls {}, not known to be free of side effects",
            impure_functions.join(", ")
        ));
    }
    denial
}

/// The session's ledger for one request: with `hold_writes` (the request runs inside an open
/// transaction block), the audit records of its writes wait for the block's COMMIT; every
/// other record, and everything else, goes straight to the adapter's ledger.
struct Deferring<'a> {
    inner: &'a dyn Ledger,
    deferred: &'a std::sync::Mutex<Vec<AuditEvent>>,
    hold_writes: bool,
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
        if self.hold_writes && decision_verb(&event) == Some(Verb::Write) {
            lock(self.deferred).push(event);
            return Ok(());
        }
        self.inner.audit(event).await
    }

    fn record_later(&self, event: AuditEvent) {
        self.inner.record_later(event);
    }
}
