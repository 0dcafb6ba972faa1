//! SQL classification with PostgreSQL's own parser (`pg_query`): every statement of a query
//! string becomes a list of (verb, object) accesses, from a walk over the *whole* parse tree.
//!
//! The tree is walked generically ([`walk`]: its JSON form, every node visited, iteratively),
//! so a DELETE in a CTE, a DROP in a rule action, a side-effecting function in a WHERE clause
//! or an EXPLAIN ANALYZE that executes are all found. Anything not recognised is `admin` on
//! the database, never `read`. Which functions are pure and which settings harmless is the
//! [`lexicon`]'s. Deep statements are parsed and walked on the [`pool`]'s large-stack threads:
//! libpg_query recurses on nested SQL, and nesting is also capped before parsing.

use capgate_core::scope::Verb;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Object {
    Relation {
        schema: String,
        name: String,
    },
    Schema(String),
    /// Anything database-wide: roles, settings, extensions, side-effecting functions.
    Database,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Access {
    pub verb: Verb,
    pub object: Object,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub text: String,
    /// Empty: touches nothing (BEGIN, COMMIT, SELECT 1, harmless SET).
    pub accesses: Vec<Access>,
    /// Every prepared statement this one runs (`EXECUTE name`, however deeply wrapped: in
    /// CREATE TABLE AS, EXPLAIN ANALYZE…). The caller adds what each of them does, as the
    /// server will find it when this statement runs; the accesses above are only this
    /// statement's own.
    pub executes: Vec<String>,
    /// EXPLAIN without ANALYZE: what it would execute is planned, not run (its tables read).
    pub plans_only: bool,
    /// How running this statement changes the session's prepared statement names.
    pub names: Option<NameChange>,
    /// BEGIN, COMMIT, ROLLBACK and the like: where a transaction's writes become durable.
    pub transaction: Option<Transaction>,
    /// Functions called that are not known to be side-effect free (each makes the statement
    /// a `write` on the database): named in a denial, so the agent knows why.
    pub impure_functions: Vec<String>,
    /// Pure built-ins called without a schema. PostgreSQL resolves such a call against the
    /// session's schema too, where an overload with better-matching argument types wins: the
    /// session treats any of these names that its database overloads as impure.
    pub unqualified_pure_calls: Vec<String>,
}

/// A change to the session's prepared statement names, made when the statement succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameChange {
    /// `PREPARE name AS …`: the statement's accesses are the prepared statement's.
    Prepare(String),
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate(String),
    /// `DEALLOCATE ALL`, `DISCARD ALL`: every named statement (not the unnamed one).
    DeallocateAll,
    /// DO and CALL run code that may prepare or deallocate anything.
    Doubt,
}

fn name_change(node: Option<&pg_query::NodeEnum>) -> Option<NameChange> {
    use pg_query::protobuf::DiscardMode;
    use pg_query::NodeEnum as N;
    match node? {
        N::PrepareStmt(stmt) => Some(NameChange::Prepare(stmt.name.clone())),
        N::DeallocateStmt(stmt) if stmt.isall => Some(NameChange::DeallocateAll),
        N::DeallocateStmt(stmt) => Some(NameChange::Deallocate(stmt.name.clone())),
        N::DiscardStmt(stmt) if stmt.target() == DiscardMode::DiscardAll => {
            Some(NameChange::DeallocateAll)
        }
        N::DoStmt(_) | N::CallStmt(_) => Some(NameChange::Doubt),
        _ => None,
    }
}

/// Transaction control, as far as auditing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transaction {
    Begin,
    /// COMMIT, END, PREPARE TRANSACTION: the transaction's writes become durable.
    Commit,
    /// ROLLBACK, ABORT: its writes are undone.
    Rollback,
    /// SAVEPOINT, RELEASE, ROLLBACK TO, COMMIT/ROLLBACK PREPARED.
    Other,
}

fn transaction_control(node: Option<&pg_query::NodeEnum>) -> Option<Transaction> {
    use pg_query::protobuf::TransactionStmtKind as Kind;
    let Some(pg_query::NodeEnum::TransactionStmt(stmt)) = node else {
        return None;
    };
    Some(match stmt.kind() {
        Kind::TransStmtBegin | Kind::TransStmtStart => Transaction::Begin,
        Kind::TransStmtCommit | Kind::TransStmtPrepare => Transaction::Commit,
        Kind::TransStmtRollback => Transaction::Rollback,
        _ => Transaction::Other,
    })
}

impl Statement {
    pub fn max_verb(&self) -> Option<Verb> {
        self.accesses.iter().map(|a| a.verb).max()
    }

    /// A call of a pure built-in's name that the session's schema overloads may run the
    /// overload: it makes the statement a write, like any function not known to be pure.
    pub fn calls_overloads_as_impure(&mut self, overloaded: &std::collections::HashSet<String>) {
        let shadowed: Vec<String> = self
            .unqualified_pure_calls
            .iter()
            .filter(|name| overloaded.contains(*name))
            .cloned()
            .collect();
        if shadowed.is_empty() {
            return;
        }
        let write = Access {
            verb: Verb::Write,
            object: Object::Database,
        };
        if !self.accesses.contains(&write) {
            self.accesses.push(write);
        }
        self.impure_functions.extend(shadowed);
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_query_bytes: usize,
    pub max_nesting: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_query_bytes: 1 << 20,
            max_nesting: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("query is {bytes} bytes (limit {max})")]
    TooLarge { bytes: usize, max: usize },
    #[error("query nests {depth} levels deep (limit {max})")]
    TooDeep { depth: usize, max: usize },
    #[error("query does not parse: {0}")]
    Parse(String),
    #[error("classifier failed: {0}")]
    Internal(String),
}

/// Nesting of parentheses and brackets, counted without a full lexer: it may over-count
/// inside string literals, which only fails closed.
fn nesting_depth(sql: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for b in sql.bytes() {
        match b {
            b'(' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b')' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Classifies every statement of `sql`. Unqualified tables resolve to `default_schema` (the
/// proxy pins `search_path` to it).
pub fn classify(
    sql: &str,
    default_schema: &str,
    limits: &Limits,
) -> Result<Vec<Statement>, ClassifyError> {
    precheck(sql, limits)?;
    let (reply, answer) = std::sync::mpsc::channel();
    submit(sql, default_schema, Reply::Blocking(reply))?;
    answer
        .recv()
        .map_err(|_| ClassifyError::Internal("classifier worker failed".into()))?
}

/// As [`classify`], without blocking the caller's thread: the async session awaits the worker.
pub async fn classify_async(
    sql: &str,
    default_schema: &str,
    limits: &Limits,
) -> Result<Vec<Statement>, ClassifyError> {
    precheck(sql, limits)?;
    if shallow(sql) {
        return classify_here(sql, default_schema);
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    submit(sql, default_schema, Reply::Async(reply))?;
    answer
        .await
        .map_err(|_| ClassifyError::Internal("classifier worker failed".into()))?
}

/// Statements this shallow and short recurse so little that any thread's stack will do; the
/// hand-off to a large-stack worker costs more than parsing them.
fn shallow(sql: &str) -> bool {
    sql.len() <= 16 * 1024 && nesting_depth(sql) <= 16
}

/// Size, nesting and NUL checks, before any parsing.
fn precheck(sql: &str, limits: &Limits) -> Result<(), ClassifyError> {
    if sql.len() > limits.max_query_bytes {
        return Err(ClassifyError::TooLarge {
            bytes: sql.len(),
            max: limits.max_query_bytes,
        });
    }
    let depth = nesting_depth(sql);
    if depth > limits.max_nesting {
        return Err(ClassifyError::TooDeep {
            depth,
            max: limits.max_nesting,
        });
    }
    if sql.contains('\0') {
        return Err(ClassifyError::Parse("NUL byte in query".into()));
    }
    Ok(())
}

fn classify_here(sql: &str, default_schema: &str) -> Result<Vec<Statement>, ClassifyError> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| ClassifyError::Parse(e.to_string()))?;
    let mut statements = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let start = usize::try_from(raw.stmt_location).unwrap_or(0);
        let len = usize::try_from(raw.stmt_len).unwrap_or(0);
        let text = if len == 0 {
            sql.get(start..)
        } else {
            sql.get(start..start.saturating_add(len))
        }
        .unwrap_or(sql)
        .trim()
        .to_owned();
        let tree = serde_json::to_value(raw.stmt.as_deref())
            .map_err(|e| ClassifyError::Internal(e.to_string()))?;
        let mut statement = classify_statement(text, &tree, default_schema);
        let node = raw.stmt.as_deref().and_then(|n| n.node.as_ref());
        statement.transaction = transaction_control(node);
        statement.names = name_change(node);
        statements.push(statement);
    }
    Ok(statements)
}

#[cfg(test)]
mod corpus;
mod lexicon;
mod pool;
mod walk;

use pool::{submit, Reply};
use walk::classify_statement;

pub use lexicon::is_pure as is_pure_builtin;
#[cfg(test)]
mod tests;
