//! SQL classification with PostgreSQL's own parser (`pg_query`): every statement of a query
//! string becomes a list of (verb, object) accesses, from a walk over the *whole* parse tree.
//!
//! The tree is walked generically (its JSON form, every node visited, iteratively), so a
//! DELETE in a CTE, a DROP in a rule action, a side-effecting function in a WHERE clause or an
//! EXPLAIN ANALYZE that executes are all found. Anything not recognised is `admin` on the
//! database, never `read`. Parsing and the walk run on a thread with a large stack: libpg_query
//! recurses on nested SQL, and nesting is also capped before parsing.

use std::collections::BTreeSet;

use pg_query::protobuf::{AlterTableType, ObjectType};
use serde_json::{Map, Value};

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

fn submit(sql: &str, schema: &str, reply: Reply) -> Result<(), ClassifyError> {
    pool()
        .lock()
        .map_err(|_| ClassifyError::Internal("classifier pool unavailable".into()))?
        .send(Job {
            sql: sql.to_owned(),
            schema: schema.to_owned(),
            reply,
        })
        .map_err(|_| ClassifyError::Internal("classifier pool stopped".into()))
}

type Outcome = Result<Vec<Statement>, ClassifyError>;

/// Where a worker sends its answer: a blocking caller or an async one.
enum Reply {
    Blocking(std::sync::mpsc::Sender<Outcome>),
    Async(tokio::sync::oneshot::Sender<Outcome>),
}

struct Job {
    sql: String,
    schema: String,
    reply: Reply,
}

/// Worker threads with large stacks (libpg_query and serde recurse on nested trees), started
/// once: spawning a 64 MiB-stack thread per statement cost more than the parse itself.
fn pool() -> &'static std::sync::Mutex<std::sync::mpsc::Sender<Job>> {
    static POOL: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 8);
        for i in 0..workers {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("capgate-sql-classify-{i}"))
                .stack_size(64 << 20)
                .spawn(move || loop {
                    let job = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let outcome = classify_here(&job.sql, &job.schema);
                    match job.reply {
                        Reply::Blocking(reply) => drop(reply.send(outcome)),
                        Reply::Async(reply) => drop(reply.send(outcome)),
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a classifier worker");
            }
        }
        std::sync::Mutex::new(jobs)
    })
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
            sql.get(start..start + len)
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

struct Walk<'a> {
    default_schema: &'a str,
    accesses: BTreeSet<Access>,
    ctes: BTreeSet<String>,
    reads: Vec<(String, String)>,
    locking: bool,
    explain_only: bool,
    executes: Vec<String>,
    impure_functions: Vec<String>,
    unqualified_pure_calls: Vec<String>,
}

fn classify_statement(text: String, tree: &Value, default_schema: &str) -> Statement {
    let mut walk = Walk {
        default_schema,
        accesses: BTreeSet::new(),
        ctes: BTreeSet::new(),
        reads: Vec::new(),
        locking: false,
        explain_only: false,
        executes: Vec::new(),
        impure_functions: Vec::new(),
        unqualified_pure_calls: Vec::new(),
    };
    // Iterative: the tree can be deep.
    let mut stack: Vec<&Value> = vec![tree];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items.iter()),
            Value::Object(map) => {
                if map.contains_key("relname") && map.contains_key("schemaname") {
                    walk.range_var(map);
                }
                for (key, child) in map {
                    if key.starts_with(|c: char| c.is_ascii_uppercase()) {
                        if let Value::Object(fields) = child {
                            walk.node(key, fields);
                        }
                    }
                    stack.push(child);
                }
            }
            _ => {}
        }
    }
    let reads_verb = if walk.locking {
        Verb::Write
    } else {
        Verb::Read
    };
    let reads = std::mem::take(&mut walk.reads);
    let mut locked_relations = 0usize;
    for (schema, name) in reads {
        if schema.is_empty() && walk.ctes.contains(&name) {
            continue; // a CTE, not a table; its body was classified where it is defined
        }
        let schema = if schema.is_empty() {
            walk.default_schema.to_owned()
        } else {
            schema
        };
        walk.accesses.insert(Access {
            verb: reads_verb,
            object: Object::Relation { schema, name },
        });
        locked_relations += 1;
    }
    if walk.locking && locked_relations == 0 {
        // FOR UPDATE with no table to pin it on (a CTE): still a request to lock.
        walk.add(Verb::Write, Object::Database);
    }
    // A relation that is written (or worse) needs no separate read: the stronger verb covers it.
    let stronger: BTreeSet<Object> = walk
        .accesses
        .iter()
        .filter(|a| a.verb != Verb::Read)
        .map(|a| a.object.clone())
        .collect();
    let mut accesses: Vec<Access> = walk
        .accesses
        .into_iter()
        .filter(|a| a.verb != Verb::Read || !stronger.contains(&a.object))
        .collect();
    if walk.explain_only {
        // EXPLAIN without ANALYZE plans but executes nothing.
        accesses = accesses
            .into_iter()
            .filter(|a| matches!(a.object, Object::Relation { .. }))
            .map(|a| Access {
                verb: Verb::Read,
                object: a.object,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
    }
    Statement {
        text,
        accesses,
        executes: walk.executes,
        plans_only: walk.explain_only,
        names: None,
        transaction: None,
        impure_functions: walk.impure_functions,
        unqualified_pure_calls: walk.unqualified_pure_calls,
    }
}

fn field<'v>(fields: &'v Map<String, Value>, name: &str) -> &'v Value {
    fields.get(name).unwrap_or(&Value::Null)
}

fn strings(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|n| n["node"]["String"]["sval"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Walk<'_> {
    fn add(&mut self, verb: Verb, object: Object) {
        self.accesses.insert(Access { verb, object });
    }

    fn relation(&self, rv: &Value) -> Option<Object> {
        let name = rv["relname"].as_str()?.to_owned();
        let schema = rv["schemaname"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or(self.default_schema);
        Some(Object::Relation {
            schema: schema.to_owned(),
            name,
        })
    }

    fn qualified(&self, names: &[String]) -> Object {
        match names {
            [name] => Object::Relation {
                schema: self.default_schema.to_owned(),
                name: name.clone(),
            },
            [schema, name] => Object::Relation {
                schema: schema.clone(),
                name: name.clone(),
            },
            [_, schema, name] => Object::Relation {
                schema: schema.clone(),
                name: name.clone(),
            },
            _ => Object::Database,
        }
    }

    fn range_var(&mut self, map: &Map<String, Value>) {
        let name = map
            .get("relname")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let schema = map
            .get("schemaname")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if !name.is_empty() {
            self.reads.push((schema, name));
        }
    }

    fn node(&mut self, kind: &str, f: &Map<String, Value>) {
        match kind {
            "SelectStmt" => {
                if field(f, "locking_clause")
                    .as_array()
                    .is_some_and(|l| !l.is_empty())
                {
                    self.locking = true;
                }
                if let Some(into) = field(f, "into_clause")
                    .get("rel")
                    .and_then(|rv| self.relation(rv))
                {
                    self.add(Verb::Admin, into);
                }
            }
            "InsertStmt" | "UpdateStmt" => {
                if let Some(target) = self.relation(field(f, "relation")) {
                    self.add(Verb::Write, target);
                }
            }
            "DeleteStmt" => {
                if let Some(target) = self.relation(field(f, "relation")) {
                    let verb = if field(f, "where_clause").is_null() {
                        Verb::Delete
                    } else {
                        Verb::Write
                    };
                    self.add(verb, target);
                }
            }
            "MergeStmt" => {
                // CMD_DELETE is 5 in PostgreSQL's CmdType.
                let deletes = field(f, "merge_when_clauses")
                    .as_array()
                    .is_some_and(|clauses| {
                        clauses
                            .iter()
                            .any(|c| c["node"]["MergeWhenClause"]["command_type"] == 5)
                    });
                if let Some(target) = self.relation(field(f, "relation")) {
                    self.add(if deletes { Verb::Delete } else { Verb::Write }, target);
                }
            }
            "TruncateStmt" => {
                for rv in field(f, "relations").as_array().into_iter().flatten() {
                    if let Some(target) = self.relation(&rv["node"]["RangeVar"]) {
                        self.add(Verb::Delete, target);
                    }
                }
            }
            "DropStmt" => self.drop(f),
            "AlterTableStmt" => {
                let target = self
                    .relation(field(f, "relation"))
                    .unwrap_or(Object::Database);
                let drops = field(f, "cmds")
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|cmd| {
                        let subtype = cmd["node"]["AlterTableCmd"]["subtype"]
                            .as_i64()
                            .unwrap_or(-1) as i32;
                        matches!(
                            AlterTableType::try_from(subtype),
                            Ok(AlterTableType::AtDropColumn
                                | AlterTableType::AtDropConstraint
                                | AlterTableType::AtDropNotNull
                                | AlterTableType::AtDropExpression
                                | AlterTableType::AtDropIdentity
                                | AlterTableType::AtDropInherit
                                | AlterTableType::AtDropOf)
                        )
                    });
                self.add(if drops { Verb::Delete } else { Verb::Admin }, target);
            }
            "CopyStmt" => {
                let target = self.relation(field(f, "relation"));
                if field(f, "is_program").as_bool() == Some(true) {
                    self.add(Verb::Admin, Object::Database);
                } else if field(f, "is_from").as_bool() == Some(true) {
                    self.add(Verb::Write, target.unwrap_or(Object::Database));
                } else if !field(f, "filename").as_str().unwrap_or("").is_empty() {
                    self.add(Verb::Admin, Object::Database); // server-side file
                }
            }
            "ExplainStmt" => {
                let analyze = field(f, "options")
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|o| {
                        let def = &o["node"]["DefElem"];
                        def["defname"] == "analyze"
                            && !matches!(
                                def["arg"]["node"]["Boolean"]["boolval"],
                                Value::Bool(false)
                            )
                    });
                if !analyze {
                    self.explain_only = true;
                }
            }
            "CommonTableExpr" => {
                if let Some(name) = field(f, "ctename").as_str() {
                    self.ctes.insert(name.to_owned());
                }
            }
            "FuncCall" => self.function(&strings(field(f, "funcname"))),
            "VariableSetStmt" => self.set(f),
            "TransactionStmt" if read_write_requested(field(f, "options")) => {
                self.add(Verb::Admin, Object::Database);
            }
            "TransactionStmt" => {} // BEGIN, COMMIT, ROLLBACK, SAVEPOINT: touch nothing
            "ExecuteStmt" => match field(f, "name").as_str() {
                Some(name) => self.executes.push(name.to_owned()),
                None => self.add(Verb::Admin, Object::Database),
            },
            "LockStmt" => {
                for rv in field(f, "relations").as_array().into_iter().flatten() {
                    if let Some(target) = self.relation(&rv["node"]["RangeVar"]) {
                        self.add(Verb::Write, target);
                    }
                }
            }
            "NotifyStmt" => self.add(Verb::Write, Object::Database),
            // Statements that touch nothing by themselves (their inner queries are walked).
            "RawStmt" | "PrepareStmt" | "DeclareCursorStmt" | "FetchStmt" | "ClosePortalStmt"
            | "DeallocateStmt" | "VariableShowStmt" | "ListenStmt" | "UnlistenStmt"
            | "DiscardStmt" => {}
            "DropdbStmt"
            | "DropRoleStmt"
            | "DropTableSpaceStmt"
            | "DropOwnedStmt"
            | "DropSubscriptionStmt"
            | "DropUserMappingStmt" => self.add(Verb::Delete, Object::Database),
            "CreateStmt" | "CreateTableAsStmt" | "ViewStmt" | "IndexStmt" | "CreateSeqStmt" => {
                let target = field(f, "relation")
                    .as_object()
                    .or_else(|| field(f, "view").as_object())
                    .and_then(|rv| self.relation(&Value::Object(rv.clone())))
                    .or_else(|| field(f, "into").get("rel").and_then(|rv| self.relation(rv)))
                    .or_else(|| {
                        field(f, "sequence")
                            .as_object()
                            .and_then(|rv| self.relation(&Value::Object(rv.clone())))
                    })
                    .unwrap_or(Object::Database);
                self.add(Verb::Admin, target);
            }
            other if other.ends_with("Stmt") => self.add(Verb::Admin, Object::Database),
            _ => {}
        }
    }

    fn drop(&mut self, f: &Map<String, Value>) {
        let kind = ObjectType::try_from(field(f, "remove_type").as_i64().unwrap_or(-1) as i32);
        let objects = field(f, "objects").as_array().cloned().unwrap_or_default();
        match kind {
            Ok(
                ObjectType::ObjectTable
                | ObjectType::ObjectView
                | ObjectType::ObjectMatview
                | ObjectType::ObjectIndex
                | ObjectType::ObjectSequence
                | ObjectType::ObjectForeignTable,
            ) => {
                for object in objects {
                    let names = strings(&object["node"]["List"]["items"]);
                    let target = self.qualified(&names);
                    self.add(Verb::Delete, target);
                }
            }
            Ok(ObjectType::ObjectSchema) => {
                for object in objects {
                    match object["node"]["String"]["sval"].as_str() {
                        Some(schema) => self.add(Verb::Delete, Object::Schema(schema.to_owned())),
                        None => self.add(Verb::Delete, Object::Database),
                    }
                }
            }
            _ => self.add(Verb::Delete, Object::Database),
        }
    }

    fn function(&mut self, name: &[String]) {
        let (schema, function) = match name {
            [function] => (None, function.as_str()),
            [schema, function] => (Some(schema.as_str()), function.as_str()),
            _ => {
                self.add(Verb::Admin, Object::Database);
                return;
            }
        };
        let builtin = schema.is_none_or(|s| s == "pg_catalog");
        if builtin && lexicon::acts_on_the_server(function) {
            self.add(Verb::Admin, Object::Database);
        } else if !(builtin && lexicon::is_pure(function)) {
            self.add(Verb::Write, Object::Database);
            self.impure_functions.push(name.join("."));
        } else if schema.is_none() {
            self.unqualified_pure_calls.push(function.to_owned());
        }
    }

    fn set(&mut self, f: &Map<String, Value>) {
        let name = field(f, "name").as_str().unwrap_or("").to_ascii_lowercase();
        // VAR_SET_MULTI (SET TRANSACTION …, SET SESSION CHARACTERISTICS …) carries DefElems.
        if name == "transaction" || name == "session characteristics" {
            if read_write_requested(field(f, "args")) {
                self.add(Verb::Admin, Object::Database);
            }
            return;
        }
        // RESET ALL has an empty name; everything not on the short list is admin.
        if !lexicon::HARMLESS_SETTINGS.contains(&name.as_str()) {
            self.add(Verb::Admin, Object::Database);
        }
    }
}

/// `transaction_read_only = false` (BEGIN READ WRITE, SET TRANSACTION READ WRITE).
fn read_write_requested(options: &Value) -> bool {
    options.as_array().into_iter().flatten().any(|o| {
        let def = &o["node"]["DefElem"];
        def["defname"] == "transaction_read_only"
            && def["arg"]["node"]["AConst"]["val"]["Ival"]["ival"]
                .as_i64()
                .unwrap_or(0)
                == 0
    })
}

#[cfg(test)]
mod corpus;
mod lexicon;

pub use lexicon::is_pure as is_pure_builtin;
#[cfg(test)]
mod tests;
