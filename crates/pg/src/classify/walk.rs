//! The walk over one statement's parse tree: every node visited (iteratively, in its JSON
//! form), each table, function, setting and prepared statement it touches turned into an
//! access, with anything not recognised counted as `admin` on the database.

use std::collections::BTreeSet;

use pg_query::protobuf::{AlterTableType, ObjectType};
use serde_json::{Map, Value};

use super::lexicon;
use super::{Access, Object, Statement};
use capgate_core::scope::Verb;

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

pub(super) fn classify_statement(text: String, tree: &Value, default_schema: &str) -> Statement {
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
