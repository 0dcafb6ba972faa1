//! Blast-radius preview for SQL approvals: what a statement waiting for approval would
//! touch, measured without running it, and attached to its approval request.
//!
//! An UPDATE or DELETE is rewritten from its parse tree into a count over the same
//! FROM/USING/WHERE (CTEs included); DROP TABLE and TRUNCATE report each table's rows and
//! what depends on it (`pg_depend`). Everything runs on a separate upstream connection that
//! is read-only at login, inside `BEGIN READ ONLY` with a short `statement_timeout`, and is
//! cancelled at a deadline. A statement is not measured (and says why) when the count could
//! run anything with effects or would not be the whole story: functions not known to be pure
//! (the classifier's lexicon), triggers, rules, row-level security, views that call such
//! functions, foreign tables, or foreign keys that cascade.

use std::time::Duration;

use pg_query::protobuf::{self, node::Node as N, Node, ObjectType};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::classify::{classify_async, Object};
use super::parameters::Value;
use super::upstream::{self, error_text, UpstreamLogin};
use super::wire::{encode, read_message};
use super::PgProxy;
use capgate_core::scope::Verb;

/// Each statement the preview runs is stopped by the server after this long.
const STATEMENT_TIMEOUT_MS: u64 = 2000;
/// The whole measurement is abandoned (and its query cancelled) after this long.
const DEADLINE: Duration = Duration::from_secs(5);
/// Dependents listed for a DROP or TRUNCATE; more are counted, not named.
const MAX_DEPENDENTS: usize = 10;

/// What to run to measure a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Plan {
    /// UPDATE/DELETE: rows matched (`count`, with the statement's parameters) out of the
    /// target table's rows (`total`).
    Count {
        count: String,
        total: String,
        verb: Verb,
        /// The table changed: (schema, or "" for the search path; name).
        target: (String, String),
    },
    /// DROP TABLE / TRUNCATE: each table (schema, or "" for the search path; name), with
    /// the query counting its rows.
    Tables {
        what: &'static str,
        tables: Vec<(String, String, String)>,
    },
}

fn string(s: &str) -> Node {
    Node {
        node: Some(N::String(protobuf::String { sval: s.into() })),
    }
}

/// `SELECT pg_catalog.count(*) FROM x` parsed, for its well-formed SelectStmt.
fn count_template(distinct: bool) -> Result<protobuf::SelectStmt, String> {
    let sql = if distinct {
        "SELECT pg_catalog.count(DISTINCT x.ctid) FROM x"
    } else {
        "SELECT pg_catalog.count(*) FROM x"
    };
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| format!("template: {e}"))?;
    match parsed
        .protobuf
        .stmts
        .into_iter()
        .next()
        .and_then(|raw| raw.stmt)
        .and_then(|stmt| stmt.node)
    {
        Some(N::SelectStmt(select)) => Ok(*select),
        _ => Err("template is not a SELECT".into()),
    }
}

fn deparse(select: protobuf::SelectStmt) -> Result<String, String> {
    N::SelectStmt(Box::new(select))
        .deparse(Default::default())
        .map_err(|e| format!("cannot deparse: {e}"))
}

/// The count of rows the statement would change: `count(*)` over the target alone, or
/// `count(DISTINCT target.ctid)` when other tables join in (a target row matched twice is
/// still changed once).
fn count_query(
    relation: &protobuf::RangeVar,
    others: &[Node],
    where_clause: Option<Box<Node>>,
    with_clause: Option<protobuf::WithClause>,
) -> Result<String, String> {
    let mut select = count_template(!others.is_empty())?;
    if !others.is_empty() {
        let mut qualifier = match &relation.alias {
            Some(alias) => vec![alias.aliasname.clone()],
            None if relation.schemaname.is_empty() => vec![relation.relname.clone()],
            None => vec![relation.schemaname.clone(), relation.relname.clone()],
        };
        qualifier.push("ctid".into());
        let column = Node {
            node: Some(N::ColumnRef(protobuf::ColumnRef {
                fields: qualifier.iter().map(String::as_str).map(string).collect(),
                location: -1,
            })),
        };
        let Some(Some(N::ResTarget(target))) = select.target_list.first_mut().map(|n| &mut n.node)
        else {
            return Err("template has no target".into());
        };
        let Some(Some(N::FuncCall(call))) = target.val.as_mut().map(|v| &mut v.node) else {
            return Err("template target is not a call".into());
        };
        call.args = vec![column];
    }
    select.from_clause = std::iter::once(Node {
        node: Some(N::RangeVar(relation.clone())),
    })
    .chain(others.iter().cloned())
    .collect();
    select.where_clause = where_clause;
    select.with_clause = with_clause;
    deparse(select)
}

fn total_query(relation: &protobuf::RangeVar) -> Result<String, String> {
    let mut select = count_template(false)?;
    let mut bare = relation.clone();
    bare.alias = None;
    select.from_clause = vec![Node {
        node: Some(N::RangeVar(bare)),
    }];
    deparse(select)
}

/// Plans the measurement of one statement, or says why it cannot be measured.
pub(super) fn plan(sql: &str) -> Result<Plan, String> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| format!("cannot parse: {e}"))?;
    let mut stmts = parsed.protobuf.stmts.into_iter();
    let (Some(raw), None) = (stmts.next(), stmts.next()) else {
        return Err("only a single statement is measured".into());
    };
    match raw.stmt.and_then(|s| s.node) {
        Some(N::DeleteStmt(delete)) => {
            let relation = delete.relation.ok_or("DELETE without a table")?;
            Ok(Plan::Count {
                count: count_query(
                    &relation,
                    &delete.using_clause,
                    delete.where_clause,
                    delete.with_clause,
                )?,
                total: total_query(&relation)?,
                verb: Verb::Delete,
                target: (relation.schemaname.clone(), relation.relname.clone()),
            })
        }
        Some(N::UpdateStmt(update)) => {
            let relation = update.relation.ok_or("UPDATE without a table")?;
            Ok(Plan::Count {
                count: count_query(
                    &relation,
                    &update.from_clause,
                    update.where_clause,
                    update.with_clause,
                )?,
                total: total_query(&relation)?,
                verb: Verb::Write,
                target: (relation.schemaname.clone(), relation.relname.clone()),
            })
        }
        Some(N::TruncateStmt(truncate)) => {
            let mut tables = Vec::new();
            for node in truncate.relations {
                let Some(N::RangeVar(relation)) = node.node else {
                    return Err("TRUNCATE of something other than a table".into());
                };
                tables.push(table(relation)?);
            }
            Ok(Plan::Tables {
                what: "TRUNCATE",
                tables,
            })
        }
        Some(N::DropStmt(drop)) if drop.remove_type() == ObjectType::ObjectTable => {
            let mut tables = Vec::new();
            for object in drop.objects {
                let Some(N::List(list)) = object.node else {
                    return Err("DROP TABLE of an unexpected name".into());
                };
                let names: Vec<String> = list
                    .items
                    .into_iter()
                    .filter_map(|n| match n.node {
                        Some(N::String(s)) => Some(s.sval),
                        _ => None,
                    })
                    .collect();
                let relation = match names.as_slice() {
                    [name] => protobuf::RangeVar {
                        relname: name.clone(),
                        inh: true,
                        relpersistence: "p".into(),
                        location: -1,
                        ..Default::default()
                    },
                    [schema, name] => protobuf::RangeVar {
                        schemaname: schema.clone(),
                        relname: name.clone(),
                        inh: true,
                        relpersistence: "p".into(),
                        location: -1,
                        ..Default::default()
                    },
                    _ => return Err("DROP TABLE names a table in another database".into()),
                };
                tables.push(table(relation)?);
            }
            Ok(Plan::Tables {
                what: "DROP TABLE",
                tables,
            })
        }
        _ => Err("only UPDATE, DELETE, DROP TABLE and TRUNCATE are measured".into()),
    }
}

fn table(relation: protobuf::RangeVar) -> Result<(String, String, String), String> {
    if !relation.catalogname.is_empty() {
        return Err("a table in another database".into());
    }
    let total = total_query(&relation)?;
    Ok((relation.schemaname, relation.relname, total))
}

/// Plans on a thread with a large stack: libpg_query recurses on nested SQL.
async fn plan_async(sql: String) -> Result<Plan, String> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("capgate-sql-preview".into())
        .stack_size(64 << 20)
        .spawn(move || drop(reply.send(plan(&sql))))
        .map_err(|e| format!("cannot start the planner: {e}"))?;
    answer
        .await
        .map_err(|_| "the planner stopped".to_string())?
}

/// "48,211".
pub(super) fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One row of text values (`None`: NULL).
type Row = Vec<Option<String>>;

/// A connection for measuring: read-only at login, one read-only transaction.
struct Probe {
    stream: TcpStream,
}

impl Probe {
    /// Runs one statement with parameters (types, formats and values as the client bound
    /// them) through the extended protocol; returns its rows as text.
    async fn query(
        &mut self,
        sql: &str,
        types: &[u32],
        values: &[Value],
    ) -> Result<Vec<Row>, String> {
        let io = |e: std::io::Error| format!("upstream: {e}");
        let mut parse = Vec::new();
        parse.push(0);
        parse.extend_from_slice(sql.as_bytes());
        parse.push(0);
        let n = i16::try_from(types.len()).map_err(|_| "too many parameters")?;
        parse.extend_from_slice(&n.to_be_bytes());
        for oid in types {
            parse.extend_from_slice(&oid.to_be_bytes());
        }
        let mut bind = vec![0, 0];
        let n = i16::try_from(values.len()).map_err(|_| "too many parameters")?;
        bind.extend_from_slice(&n.to_be_bytes());
        for value in values {
            bind.extend_from_slice(&value.format.to_be_bytes());
        }
        bind.extend_from_slice(&n.to_be_bytes());
        for value in values {
            match &value.bytes {
                None => bind.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(bytes) => {
                    let len = i32::try_from(bytes.len()).map_err(|_| "parameter too large")?;
                    bind.extend_from_slice(&len.to_be_bytes());
                    bind.extend_from_slice(bytes);
                }
            }
        }
        bind.extend_from_slice(&0i16.to_be_bytes());
        let mut out = encode(b'P', &parse);
        out.extend_from_slice(&encode(b'B', &bind));
        out.extend_from_slice(&encode(b'E', &[0, 0, 0, 0, 0]));
        out.extend_from_slice(&encode(b'S', &[]));
        self.stream.write_all(&out).await.map_err(io)?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let message = read_message(&mut self.stream, 1 << 20)
                .await
                .map_err(|e| format!("upstream: {e}"))?;
            match message.tag {
                b'D' => rows.push(data_row(&message.body)?),
                b'E' => error = Some(error_text(&message.body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    async fn simple(&mut self, sql: &str) -> Result<(), String> {
        self.query(sql, &[], &[]).await.map(|_| ())
    }
}

fn data_row(body: &[u8]) -> Result<Row, String> {
    let bad = || "malformed DataRow".to_string();
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let end = at.checked_add(n).ok_or_else(bad)?;
        let bytes = body.get(at..end).ok_or_else(bad)?;
        at = end;
        Ok(bytes)
    };
    let n = take(2)?;
    let n = u16::from_be_bytes([n[0], n[1]]);
    let mut row = Vec::new();
    for _ in 0..n {
        let len = take(4)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        row.push(match usize::try_from(len) {
            Ok(len) => Some(String::from_utf8_lossy(take(len)?).into_owned()),
            Err(_) => None,
        });
    }
    Ok(row)
}

fn text(value: &str) -> Value {
    Value {
        format: 0,
        bytes: Some(value.as_bytes().to_vec()),
    }
}

/// The relation named (schema may be "" for the search path), for catalog lookups.
const REGCLASS: &str = "pg_catalog.to_regclass(CASE WHEN $1 = '' THEN pg_catalog.quote_ident($2) ELSE pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2) END)";

/// Views looked through, one inside the other, before the preview gives up.
const MAX_VIEW_DEPTH: usize = 4;

/// Why counting through this relation would not be the whole story or could have effects,
/// if it would. A view is looked through: what it reads is looked at in turn.
fn refusal<'a>(
    probe: &'a mut Probe,
    schema: &'a str,
    name: &'a str,
    verb: Option<Verb>,
    lexicon_schema: &'a str,
    depth: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<String>, String>> + Send + 'a>>
{
    Box::pin(refusal_of(probe, schema, name, verb, lexicon_schema, depth))
}

async fn refusal_of(
    probe: &mut Probe,
    schema: &str,
    name: &str,
    verb: Option<Verb>,
    lexicon_schema: &str,
    depth: usize,
) -> Result<Option<String>, String> {
    let sql = format!(
        "SELECT c.relkind::text, c.relrowsecurity::text, \
           (SELECT pg_catalog.string_agg(t.tgname::text, ', ') FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal), \
           (SELECT pg_catalog.string_agg(r.rulename::text, ', ') FROM pg_catalog.pg_rewrite r WHERE r.ev_class = c.oid AND r.rulename <> '_RETURN'), \
           CASE WHEN c.relkind = 'v' THEN pg_catalog.pg_get_viewdef(c.oid) END, \
           (SELECT pg_catalog.string_agg(f.conrelid::pg_catalog.regclass::text, ', ') FROM pg_catalog.pg_constraint f WHERE f.confrelid = c.oid AND f.contype = 'f' AND f.confdeltype IN ('c', 'n', 'd')), \
           (SELECT pg_catalog.string_agg(f.conrelid::pg_catalog.regclass::text, ', ') FROM pg_catalog.pg_constraint f WHERE f.confrelid = c.oid AND f.contype = 'f' AND f.confupdtype IN ('c', 'n', 'd')) \
         FROM pg_catalog.pg_class c WHERE c.oid = {REGCLASS}"
    );
    let rows = probe
        .query(&sql, &[25, 25], &[text(schema), text(name)])
        .await?;
    let Some(row) = rows.first() else {
        return Ok(None); // not a relation (a CTE's name): nothing to look at
    };
    let field = |i: usize| row.get(i).cloned().flatten();
    let shown = if schema.is_empty() {
        name.to_owned()
    } else {
        format!("{schema}.{name}")
    };
    if field(0).as_deref() == Some("f") {
        return Ok(Some(format!(
            "{shown} is a foreign table: counting it runs a remote query"
        )));
    }
    if field(1).as_deref() == Some("true") {
        return Ok(Some(format!(
            "{shown} has row-level security: a count here may not see what the statement would"
        )));
    }
    if let Some(triggers) = field(2) {
        return Ok(Some(format!(
            "{shown} has triggers ({triggers}) that would also run"
        )));
    }
    if let Some(rules) = field(3) {
        return Ok(Some(format!(
            "{shown} has rules ({rules}) that rewrite what runs"
        )));
    }
    if let Some(definition) = field(4) {
        let statements = classify_async(&definition, lexicon_schema, &Default::default())
            .await
            .map_err(|e| format!("view {shown}: {e}"))?;
        let impure: Vec<String> = statements
            .iter()
            .flat_map(|s| s.impure_functions.clone())
            .collect();
        if !impure.is_empty()
            || statements
                .iter()
                .any(|s| s.accesses.iter().any(|a| a.verb != Verb::Read))
        {
            return Ok(Some(format!(
                "view {shown} calls functions not known to be pure ({})",
                if impure.is_empty() {
                    "unknown".into()
                } else {
                    impure.join(", ")
                }
            )));
        }
        if depth >= MAX_VIEW_DEPTH {
            return Ok(Some(format!(
                "view {shown} nests views more than {MAX_VIEW_DEPTH} deep"
            )));
        }
        for statement in &statements {
            for access in &statement.accesses {
                if let Object::Relation { schema, name } = &access.object {
                    if let Some(why) =
                        refusal(probe, schema, name, None, lexicon_schema, depth + 1).await?
                    {
                        return Ok(Some(why));
                    }
                }
            }
        }
    }
    let cascades = match verb {
        Some(Verb::Delete) => field(5),
        Some(Verb::Write) => field(6),
        _ => None,
    };
    if let Some(tables) = cascades {
        return Ok(Some(format!(
            "changes to {shown} cascade through foreign keys to {tables}"
        )));
    }
    Ok(None)
}

/// Measures; `Err` is why it was not measured.
async fn run(
    probe: &mut Probe,
    plan: Plan,
    types: &[u32],
    values: &[Value],
    schema: &str,
) -> Result<String, String> {
    probe
        .simple("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ")
        .await?;
    probe
        .simple(&format!(
            "SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"
        ))
        .await?;
    probe.simple("SET LOCAL lock_timeout = 500").await?;
    match plan {
        Plan::Count {
            count,
            total,
            verb,
            target,
        } => {
            // The count is a read, judged by the same classifier as every statement: any
            // function not known to be pure in it refuses the measurement.
            let statements = classify_async(&count, schema, &Default::default())
                .await
                .map_err(|e| format!("cannot classify the count: {e}"))?;
            let impure: Vec<String> = statements
                .iter()
                .flat_map(|s| s.impure_functions.clone())
                .collect();
            if !impure.is_empty() {
                return Err(format!(
                    "the statement calls functions not known to be pure: {}",
                    impure.join(", ")
                ));
            }
            let mut relations = Vec::new();
            for statement in &statements {
                for access in &statement.accesses {
                    match &access.object {
                        _ if access.verb != Verb::Read => {
                            return Err("the count would not be a read".into())
                        }
                        Object::Relation { schema, name } => {
                            relations.push((schema.clone(), name.clone()))
                        }
                        _ => return Err("the statement reaches beyond tables".into()),
                    }
                }
            }
            relations.sort();
            relations.dedup();
            // Only the target's foreign keys cascade; every table read is looked at.
            if let Some(why) = refusal(probe, &target.0, &target.1, Some(verb), schema, 0).await? {
                return Err(why);
            }
            for (rel_schema, name) in &relations {
                if let Some(why) = refusal(probe, rel_schema, name, None, schema, 0).await? {
                    return Err(why);
                }
            }
            let matched = single_count(probe.query(&count, types, values).await?)?;
            let all = single_count(probe.query(&total, &[], &[]).await?)?;
            Ok(format!("{} of {} rows", grouped(matched), grouped(all)))
        }
        Plan::Tables { what, tables } => {
            let mut parts = Vec::new();
            for (table_schema, name, total) in tables {
                if let Some(why) = refusal(probe, &table_schema, &name, None, schema, 0).await? {
                    return Err(why);
                }
                let rows = single_count(probe.query(&total, &[], &[]).await?)?;
                let dependents = probe
                    .query(
                        &format!(
                            "SELECT DISTINCT pg_catalog.pg_describe_object(d.classid, d.objid, 0) \
                             FROM pg_catalog.pg_depend d \
                             WHERE d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
                               AND d.refobjid = {REGCLASS} AND d.deptype IN ('n', 'a') \
                             ORDER BY 1"
                        ),
                        &[25, 25],
                        &[text(&table_schema), text(&name)],
                    )
                    .await?;
                let names: Vec<String> = dependents
                    .into_iter()
                    .filter_map(|r| r.into_iter().next().flatten())
                    .collect();
                let shown = if table_schema.is_empty() {
                    name.clone()
                } else {
                    format!("{table_schema}.{name}")
                };
                let listed = match names.len() {
                    0 => "no dependents".to_owned(),
                    n if n <= MAX_DEPENDENTS => format!("dependents: {}", names.join(", ")),
                    n => format!("{n} dependents: {}, …", names[..MAX_DEPENDENTS].join(", ")),
                };
                parts.push(format!("{shown}: {} rows; {listed}", grouped(rows)));
            }
            Ok(format!("{what} {}", parts.join("; ")))
        }
    }
}

fn single_count(rows: Vec<Row>) -> Result<u64, String> {
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| "the count returned no number".into())
}

/// Measures what `sql` (run with these parameters) would touch: the preview's text.
pub(super) async fn measure(proxy: &PgProxy, sql: &str, types: &[u32], values: &[Value]) -> String {
    let plan = match plan_async(sql.to_owned()).await {
        Ok(plan) => plan,
        Err(why) => return format!("not measured: {why}"),
    };
    let config = &proxy.config;
    let login = UpstreamLogin {
        addr: &config.upstream.addr,
        user: &config.upstream.user,
        password: proxy.upstream_password.as_deref(),
        database: &config.upstream.database,
        application_name: "capgate-preview",
        default_schema: &config.default_schema,
        read_only: true,
    };
    let upstream = match upstream::connect(&login).await {
        Ok(upstream) => upstream,
        Err(e) => return format!("not measured: cannot connect upstream ({e})"),
    };
    let key = upstream.backend_key;
    let mut probe = Probe {
        stream: upstream.stream,
    };
    let measured = tokio::time::timeout(
        DEADLINE,
        run(&mut probe, plan, types, values, &config.default_schema),
    )
    .await;
    let text = match measured {
        Ok(Ok(text)) => text,
        Ok(Err(why)) => format!("not measured: {why}"),
        Err(_) => {
            if let Some((pid, secret)) = key {
                let _ = upstream::cancel(&config.upstream.addr, pid, secret).await;
            }
            format!("not measured: no answer within {} s", DEADLINE.as_secs())
        }
    };
    // Nothing was changed, and nothing is kept: the transaction ends with the connection.
    let _ = probe.stream.write_all(&encode(b'X', &[])).await;
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_of(sql: &str) -> (String, String) {
        match plan(sql) {
            Ok(Plan::Count { count, total, .. }) => (count, total),
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn updates_and_deletes_become_counts_over_the_same_rows() {
        assert_eq!(
            count_of("DELETE FROM bookings WHERE id > $1"),
            (
                "SELECT pg_catalog.count(*) FROM bookings WHERE id > $1".into(),
                "SELECT pg_catalog.count(*) FROM bookings".into()
            )
        );
        let (count, total) = count_of(
            "WITH old AS (SELECT id FROM trips WHERE day < now() - interval '1 year') \
             DELETE FROM ONLY s.bookings b USING old WHERE b.trip = old.id RETURNING b.id",
        );
        assert_eq!(
            count,
            "WITH old AS (SELECT id FROM trips WHERE day < now() - '1 year'::interval) \
             SELECT pg_catalog.count(DISTINCT b.ctid) FROM ONLY s.bookings b, old WHERE b.trip = old.id"
        );
        assert_eq!(total, "SELECT pg_catalog.count(*) FROM ONLY s.bookings");
        let (count, _) = count_of("UPDATE t SET v = 'x' FROM u WHERE t.id = u.id");
        assert_eq!(
            count,
            "SELECT pg_catalog.count(DISTINCT t.ctid) FROM t, u WHERE t.id = u.id"
        );
    }

    #[test]
    fn drops_and_truncates_list_their_tables_and_other_statements_are_not_measured() {
        assert_eq!(
            plan("DROP TABLE a, s.b CASCADE"),
            Ok(Plan::Tables {
                what: "DROP TABLE",
                tables: vec![
                    (
                        "".into(),
                        "a".into(),
                        "SELECT pg_catalog.count(*) FROM a".into()
                    ),
                    (
                        "s".into(),
                        "b".into(),
                        "SELECT pg_catalog.count(*) FROM s.b".into()
                    ),
                ],
            })
        );
        assert!(matches!(
            plan("TRUNCATE x"),
            Ok(Plan::Tables {
                what: "TRUNCATE",
                ..
            })
        ));
        for sql in [
            "INSERT INTO t VALUES (1)",
            "DROP VIEW v",
            "DELETE FROM a; DELETE FROM b",
            "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE",
            "not sql",
        ] {
            assert!(plan(sql).is_err(), "{sql}");
        }
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(grouped(48_211), "48,211");
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(1_000_000), "1,000,000");
        assert_eq!(grouped(999), "999");
    }
}
