//! PostgreSQL 18's own regression suite (`src/test/regress/sql`, shared data read in place)
//! run through the classifier. Each statement is labelled independently of the classifier,
//! from its parse tree: by node type, with an explicit list of read-only node types, its
//! own list of built-ins with side effects, and the functions the suite itself defines.
//! No mutating statement may come out as a read; plain reads may be denied (judged more
//! than `read`) in under 0.1% of cases.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use pg_query::protobuf::{CopyStmt, ObjectType, SelectStmt};
use pg_query::NodeRef;

use super::{classify, Limits};
use capgate_core::scope::Verb;

/// Where the suite lives: `$CAPGATE_SHARED_DATA/postgres-regress-18`, else
/// `shared/data/postgres-regress-18` beside the repository or one of its ancestors.
fn corpus_dir() -> Option<PathBuf> {
    if let Ok(shared) = std::env::var("CAPGATE_SHARED_DATA") {
        let dir = PathBuf::from(shared).join("postgres-regress-18");
        return dir.is_dir().then_some(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .skip(1)
        .map(|a| a.join("shared/data/postgres-regress-18"))
        .find(|dir| dir.is_dir())
}

/// A file's SQL without psql's meta-commands and inline COPY data.
fn sql_of(script: &str) -> String {
    let mut out = String::with_capacity(script.len());
    let mut in_copy_data = false;
    for line in script.lines() {
        if in_copy_data {
            in_copy_data = line.trim_end() != "\\.";
            out.push('\n');
            continue;
        }
        let lower = line.to_ascii_lowercase();
        let copy_from_stdin = lower.contains("copy ") && lower.contains("from stdin");
        if line.trim_start().starts_with('\\') {
            in_copy_data = copy_from_stdin;
            out.push('\n');
            continue;
        }
        // A meta-command after a query (`SELECT … \gset`) ends it.
        match line.find(" \\g").or_else(|| line.find(" \\crosstabview")) {
            Some(at) => {
                out.push_str(&line[..at]);
                out.push_str(";\n");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
        in_copy_data = copy_from_stdin && line.trim_end().ends_with(';');
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    /// Changes data, schema, sessions or the server, or may (user code, side effects).
    Mutating,
    /// Reads and nothing else.
    PlainRead,
    /// Session bookkeeping (SET, BEGIN, EXECUTE of something prepared elsewhere…): judged
    /// by what it refers to, not counted here.
    Neutral,
}

/// Built-ins with effects beyond their result, named from PostgreSQL's documentation
/// (not from the classifier's data): sequences, locks, notifications, settings, large
/// objects, files, transaction ids, server control, SQL given as text.
fn has_side_effects(function: &str) -> bool {
    const NAMES: &[&str] = &[
        "nextval",
        "setval",
        "currval",
        "lastval",
        "set_config",
        "pg_notify",
        "txid_current",
        "pg_current_xact_id",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_switch_wal",
        "pg_create_restore_point",
        "setseed",
        "pg_log_backend_memory_contexts",
        "pg_import_system_collations",
        "pg_read_file",
        "pg_read_binary_file",
        "pg_promote",
        "pg_logical_emit_message",
        "query_to_xml",
        "table_to_xml",
        "cursor_to_xml",
        "schema_to_xml",
        "database_to_xml",
        "ts_stat",
        "pg_sequence_last_value",
        "pg_stat_file",
        "pg_clear_attribute_stats",
        "pg_restore_attribute_stats",
        "pg_clear_relation_stats",
        "pg_restore_relation_stats",
        "ts_rewrite",
        "pg_stat_force_next_flush",
        "pg_stat_clear_snapshot",
        "loread",
        "lowrite",
        "pg_sequence_parameters",
        "pg_get_sequence_data",
    ];
    const PREFIXES: &[&str] = &[
        "pg_advisory",
        "pg_try_advisory",
        "lo_",
        "dblink",
        "pg_ls_",
        "pg_stat_reset",
        "pg_replication_origin",
        "pg_create_",
        "pg_drop_replication",
        "pg_copy_",
        "pg_replication_slot",
        "pg_logical_slot",
        "pg_wal_replay",
        "pg_backup",
        // index maintenance
        "brin_summarize",
        "brin_desummarize",
        "gin_clean_pending_list",
    ];
    NAMES.contains(&function)
        || PREFIXES.iter().any(|p| function.starts_with(p))
        || function.contains("_to_xml")
}

fn function_name(names: &[pg_query::protobuf::Node]) -> Option<(Option<String>, String)> {
    let parts: Vec<String> = names
        .iter()
        .filter_map(|n| match &n.node {
            Some(pg_query::NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect();
    match parts.as_slice() {
        [name] => Some((None, name.clone())),
        [schema, name] => Some((Some(schema.clone()), name.clone())),
        _ => None,
    }
}

/// Functions, aggregates and range types (whose constructors are functions) the suite
/// defines, read from its text: many of the definitions use psql variables and do not parse.
fn defined_in_text(script: &str, into: &mut HashSet<String>) {
    let lower = script.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || c == '(' || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    let bare = |word: &str| -> String {
        word.rsplit('.')
            .next()
            .unwrap_or(word)
            .trim_matches('"')
            .to_owned()
    };
    for (i, pair) in words.windows(2).enumerate() {
        if pair[0] == "create" || pair[0] == "replace" {
            if let (Some(kind), Some(name)) = (words.get(i + 1), words.get(i + 2)) {
                if matches!(*kind, "function" | "procedure" | "aggregate") {
                    into.insert(bare(name));
                }
                if *kind == "type" && words.get(i + 4) == Some(&"range") {
                    let name = bare(name);
                    into.insert(match name.rfind("range") {
                        Some(at) => format!("{}multirange{}", &name[..at], &name[at + 5..]),
                        None => format!("{name}_multirange"),
                    });
                    into.insert(name);
                }
            }
        }
        if pair[0] == "multirange_type_name" {
            into.insert(bare(pair[1].trim_start_matches('=')));
            if let Some(name) = words.get(i + 2) {
                into.insert(bare(name.trim_end_matches(',')));
            }
        }
    }
}

/// Functions and aggregates the suite defines: calling one runs user code.
fn defined_functions(tree: &pg_query::ParseResult, into: &mut HashSet<String>) {
    for (node, ..) in tree.protobuf.nodes() {
        let names = match node {
            NodeRef::CreateFunctionStmt(f) => &f.funcname,
            NodeRef::DefineStmt(d) if d.kind() == ObjectType::ObjectAggregate => &d.defnames,
            _ => continue,
        };
        if let Some((_, name)) = function_name(names) {
            into.insert(name);
        }
    }
}

/// Every node of the tree with its type name, found by a walk of its JSON form (pg_query's
/// own node iterator skips some fields, such as functions in FROM and CASE operands).
fn every_node(tree: &pg_query::ParseResult) -> Vec<(String, serde_json::Value)> {
    let mut found = Vec::new();
    let Ok(root) = serde_json::to_value(&tree.protobuf) else {
        return found;
    };
    let mut stack = vec![&root];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::Array(items) => stack.extend(items),
            serde_json::Value::Object(map) => {
                for (key, child) in map {
                    if key.starts_with(|c: char| c.is_ascii_uppercase()) && child.is_object() {
                        found.push((key.clone(), child.clone()));
                    }
                    stack.push(child);
                }
            }
            _ => {}
        }
    }
    found
}

fn select_mutates(select: &SelectStmt) -> bool {
    select.into_clause.is_some() || !select.locking_clause.is_empty()
}

fn copy_reads(copy: &CopyStmt) -> bool {
    !copy.is_from && !copy.is_program && copy.filename.is_empty()
}

fn label(tree: &pg_query::ParseResult, user_functions: &HashSet<String>) -> Label {
    let Some(top) = tree
        .protobuf
        .stmts
        .first()
        .and_then(|s| s.stmt.as_ref())
        .and_then(|s| s.node.as_ref())
    else {
        return Label::Neutral;
    };
    use pg_query::NodeEnum as N;
    let read_only_top = match top {
        // The explicit list of read-only node types (their subtrees are checked below).
        N::SelectStmt(_) | N::VariableShowStmt(_) => true,
        N::DeclareCursorStmt(cursor) => !matches!(
            cursor.query.as_deref().and_then(|q| q.node.as_ref()),
            Some(N::SelectStmt(select)) if select_mutates(select)
        ),
        N::CopyStmt(copy) => copy_reads(copy),
        N::ExplainStmt(explain) => !explain.options.iter().any(|o| {
            matches!(&o.node, Some(N::DefElem(d)) if d.defname == "analyze"
                && !matches!(d.arg.as_deref().and_then(|a| a.node.as_ref()), Some(N::Boolean(b)) if !b.boolval))
        }),
        N::TransactionStmt(_)
        | N::VariableSetStmt(_)
        | N::ExecuteStmt(_)
        | N::DeallocateStmt(_)
        | N::FetchStmt(_)
        | N::ClosePortalStmt(_)
        | N::ListenStmt(_)
        | N::UnlistenStmt(_)
        | N::DiscardStmt(_) => return Label::Neutral,
        N::PrepareStmt(_) => false,
        _ => return Label::Mutating,
    };
    let plans_only = matches!(top, N::ExplainStmt(_)) && read_only_top;
    let mutates = !plans_only
        && every_node(tree)
            .iter()
            .any(|(kind, node)| match kind.as_str() {
                "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" | "CreateTableAsStmt" => {
                    true
                }
                "SelectStmt" => {
                    !node["into_clause"].is_null()
                        || node["locking_clause"]
                            .as_array()
                            .is_some_and(|l| !l.is_empty())
                }
                "FuncCall" => {
                    let parts: Vec<&str> = node["funcname"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|n| n["node"]["String"]["sval"].as_str())
                        .collect();
                    match parts.as_slice() {
                        [name] => has_side_effects(name) || user_functions.contains(*name),
                        ["pg_catalog", name] => has_side_effects(name),
                        _ => true,
                    }
                }
                _ => false,
            });
    match (mutates, read_only_top) {
        (true, _) => Label::Mutating,
        (false, true) => Label::PlainRead,
        // PREPARE of a plain read touches nothing by itself.
        (false, false) => Label::Neutral,
    }
}

#[derive(Default, Debug)]
struct Tally {
    files: usize,
    statements: usize,
    unparsed: usize,
    mutating: usize,
    mutating_as_read: Vec<String>,
    plain_reads: usize,
    false_denies: Vec<String>,
}

#[test]
fn the_postgres_regression_suite_is_classified_safely() {
    let Some(dir) = corpus_dir() else {
        eprintln!(
            "\n!!! PostgreSQL 18 regression SQL not found (shared/data/postgres-regress-18 beside \
             the repository, or $CAPGATE_SHARED_DATA): the corpus test did NOT run !!!\n"
        );
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the regression corpus is missing under CI"
        );
        return;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let mut parsed = Vec::new();
    let mut user_functions = HashSet::new();
    let mut tally = Tally {
        files: files.len(),
        ..Tally::default()
    };
    for file in &files {
        let script = std::fs::read_to_string(file).unwrap_or_default();
        defined_in_text(&script, &mut user_functions);
        let sql = sql_of(&script);
        let statements: Vec<String> = match pg_query::split_with_scanner(&sql) {
            Ok(parts) => parts.into_iter().map(str::to_owned).collect(),
            Err(_) => sql.split(";\n").map(str::to_owned).collect(),
        };
        for statement in statements {
            let statement = statement.trim().to_owned();
            if statement.is_empty() {
                continue;
            }
            tally.statements += 1;
            match pg_query::parse(&statement, pg_query::ParserOptions::DEFAULT) {
                Ok(tree) if tree.protobuf.stmts.len() == 1 => {
                    defined_functions(&tree, &mut user_functions);
                    parsed.push((statement, tree));
                }
                _ => tally.unparsed += 1,
            }
        }
    }
    let limits = Limits::default();
    for (statement, tree) in &parsed {
        let label = label(tree, &user_functions);
        if label == Label::Neutral {
            continue;
        }
        // The proxy asks the server which pure built-ins' names the session's schema
        // overloads; here the suite's own definitions stand in for that answer.
        let classified = classify(statement, "public", &limits).map(|mut statements| {
            for statement in &mut statements {
                statement.calls_overloads_as_impure(&user_functions);
            }
            statements
        });
        let verdict = classified.as_ref().map(|statements| {
            statements
                .iter()
                .filter_map(|s| s.max_verb())
                .max()
                .unwrap_or(Verb::Read)
        });
        let impure: Vec<String> = classified
            .iter()
            .flatten()
            .flat_map(|s| s.impure_functions.iter().cloned())
            .collect();
        let is_read = matches!(verdict, Ok(Verb::Read));
        match label {
            Label::Mutating => {
                tally.mutating += 1;
                if is_read {
                    tally.mutating_as_read.push(statement.clone());
                }
            }
            Label::PlainRead => {
                tally.plain_reads += 1;
                if !is_read {
                    tally
                        .false_denies
                        .push(format!("{verdict:?} {impure:?}: {statement}"));
                }
            }
            Label::Neutral => {}
        }
    }
    let rate = tally.false_denies.len() as f64 / tally.plain_reads.max(1) as f64;
    println!(
        "regression corpus: {} files, {} statements ({} not parsed alone), {} mutating \
         ({} classified read), {} plain reads ({} denied: {:.3}%)",
        tally.files,
        tally.statements,
        tally.unparsed,
        tally.mutating,
        tally.mutating_as_read.len(),
        tally.plain_reads,
        tally.false_denies.len(),
        rate * 100.0
    );
    for denied in &tally.false_denies {
        let line: String = denied.chars().take(160).collect();
        println!("  denied read: {}", line.replace('\n', " "));
    }
    assert!(tally.statements > 30_000, "{tally:?}");
    assert!(
        tally.mutating_as_read.is_empty(),
        "mutating statements classified as read: {:#?}",
        &tally.mutating_as_read[..tally.mutating_as_read.len().min(20)]
    );
    assert!(
        rate < 0.001,
        "false denies of plain reads: {:.3}%",
        rate * 100.0
    );
}
