//! What the classifier knows about names: settings a session may change, built-in functions
//! free of side effects (derived from PostgreSQL's catalog by `scripts/gen-pure-functions.sh`
//! into `pure_functions.txt`), and functions that act on the server itself.

use std::collections::HashSet;
use std::sync::OnceLock;

/// Settings a session may change freely; any other SET/RESET is `admin`.
pub(super) const HARMLESS_SETTINGS: [&str; 10] = [
    "application_name",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "datestyle",
    "intervalstyle",
    "timezone",
    "extra_float_digits",
    "client_min_messages",
    "transaction_isolation",
];

/// Generated from `pg_proc` (immutable or stable functions, aggregates and window functions
/// of `pg_catalog`, minus documented exceptions); see the script for the rules.
const PURE_FUNCTIONS: &str = include_str!("pure_functions.txt");

/// The PostgreSQL version whose catalog `pure_functions.txt` was generated from.
#[cfg(test)]
pub(super) fn catalog_version() -> Option<&'static str> {
    PURE_FUNCTIONS
        .lines()
        .find_map(|line| line.strip_prefix("# postgresql "))
}

/// A built-in (pg_catalog) function known to have no effect beyond its result. Anything
/// else, including every user-defined function, makes a statement at least a `write`.
pub fn is_pure(function: &str) -> bool {
    static NAMES: OnceLock<HashSet<&'static str>> = OnceLock::new();
    NAMES
        .get_or_init(|| {
            PURE_FUNCTIONS
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .collect()
        })
        .contains(function)
}

/// Functions that act on the server, sessions, files or other databases: `admin`.
const DANGEROUS_FUNCTIONS: [&str; 18] = [
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_file_write",
    "set_config",
    "lo_unlink",
    "lo_import",
    "lo_export",
    "lo_create",
    "lo_put",
    "dblink",
    "dblink_exec",
    "dblink_connect",
];

pub(super) fn acts_on_the_server(function: &str) -> bool {
    DANGEROUS_FUNCTIONS.contains(&function)
        || function.starts_with("dblink")
        || function.starts_with("lo_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_list_is_loaded_with_its_version_and_keeps_the_exceptions_out() {
        assert!(catalog_version().is_some_and(|v| v.starts_with("18")));
        for pure in [
            "rank",
            "row_number",
            "variance",
            "percentile_cont",
            "lower",
            "now",
        ] {
            assert!(is_pure(pure), "{pure}");
        }
        for impure in [
            "nextval",
            "setval",
            "txid_current",
            "pg_current_xact_id",
            "pg_advisory_lock",
            "pg_notify",
            "set_config",
            "lo_import",
            "pg_read_file",
            "query_to_xml",
            "table_to_xml",
            "setseed",
            "",
            "# postgresql 18.4",
        ] {
            assert!(!is_pure(impure), "{impure}");
        }
    }
}
