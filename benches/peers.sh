#!/usr/bin/env bash
# Capgate against the hop users already deploy, in one run on one machine (issue #15):
# pgbench directly, through PgBouncer (session mode; transaction mode too for TPC-B) and through
# Capgate's PostgreSQL proxy; wrk directly, through nginx as a keep-alive reverse proxy and
# through Capgate's HTTP proxy, all against the same upstream (nginx answering 200 "ok").
# Prints a markdown table with capgate/peer ratios next to the goals, and the CPU each hop
# spent per request (from /proc, user+sys), which is steadier than throughput on a busy machine.
#
#   benches/peers.sh                                  # builds target/release/capgate first
#   CAPGATE_BIN=/path/to/capgate benches/peers.sh
#   CAPGATE_BIN=new CAPGATE_BIN_BEFORE=old benches/peers.sh   # adds a "before" column
#
# Settings (env): SECONDS_PER_RUN (10), CLIENTS (4 pgbench clients), PGBENCH_JOBS (2),
# WRK_CONNECTIONS (16), WRK_THREADS (2), ROUNDS (1: each row runs its columns in turn ROUNDS
# times and prints the median), SCALE (pgbench scale, 1), BENCH_DB (capgate_bench, created if
# missing; `pgbench -i` recreates its tables, nothing else is touched), PG_HOST/PG_PORT/PG_USER
# (127.0.0.1:5432 postgres, trust auth), PROXY_LOG (warn).
# Installs pgbouncer, nginx-light and wrk with apt-get when missing.
set -euo pipefail
source "$(dirname "$0")/stack.sh"

SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
CLIENTS=${CLIENTS:-4}
PGBENCH_JOBS=${PGBENCH_JOBS:-2}
WRK_CONNECTIONS=${WRK_CONNECTIONS:-16}
WRK_THREADS=${WRK_THREADS:-2}
ROUNDS=${ROUNDS:-1}
# The guard's Datalog time limit (20 ms by default) is wall-clock: with the load generator,
# PostgreSQL and the proxy on two busy cores it denied about 1 read in 3,000 here
# (policy_run_limit), and a denied pgbench client stops for the rest of the run, which says
# nothing about cost. The limit is loosened for the bench; denials are still counted below.
DATALOG_MAX_TIME=${DATALOG_MAX_TIME:-1s}

ensure_packages pgbouncer nginx-light wrk postgresql-client
resolve_capgate_bin
STACKS=(after)
BINS=([0]="$CAPGATE_BIN")
if [[ -n ${CAPGATE_BIN_BEFORE:-} ]]; then
  [[ -x $CAPGATE_BIN_BEFORE ]] || die "CAPGATE_BIN_BEFORE=$CAPGATE_BIN_BEFORE is not an executable"
  STACKS+=(before)
  BINS+=("$(realpath "$CAPGATE_BIN_BEFORE")")
fi

ensure_bench_db
pgbench_init
start_upstream
start_nginx_proxy
start_pgbouncer
for i in "${!STACKS[@]}"; do
  start_broker "${STACKS[$i]}" "${BINS[$i]}"
  issue_tokens "${STACKS[$i]}" "${BINS[$i]}"
  start_pg_proxy "${STACKS[$i]}" "${BINS[$i]}"
  start_http_proxy "${STACKS[$i]}" "${BINS[$i]}" "http://127.0.0.1:$UPSTREAM_PORT"
done

# CPU ticks (user+sys, all threads) of the given processes and their children (nginx workers).
cpu_ticks() {
  local pid total=0 kid
  for pid in "$@"; do
    for kid in $pid $(ps --ppid "$pid" -o pid= 2>/dev/null); do
      [[ -r /proc/$kid/stat ]] || continue
      total=$((total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$kid/stat")))
    done
  done
  echo "$total"
}
TICKS=$(getconf CLK_TCK)

# One measurement: measure TOOL TOKEN ARGS... runs pgbench (TOKEN as PGPASSWORD) or wrk (TOKEN
# as the bearer token) and leaves RESULT (tps or req/s), COUNT (requests), P50/P99 (ms, wrk
# only) and CPU_US[label]: CPU microseconds per request of each process group in WATCH
# ("label:pid pid...").
declare -A CPU_US FLAGGED
NOTES=()
measure() {
  local tool=$1 token=$2 out before=() label w i=0
  shift 2
  for w in "${WATCH[@]}"; do before+=("$(cpu_ticks ${w#*:})"); done
  P50=0 P99=0
  if [[ $tool == pgbench ]]; then
    # A client aborted by an error (a deny is one) makes pgbench exit 2 after printing its tps:
    # kept as a note under the table rather than thrown away.
    out=$(PGPASSWORD=$token pgbench -n -T "$SECONDS_PER_RUN" -c "$CLIENTS" -j "$PGBENCH_JOBS" "$@" 2>&1) || {
      NOTES+=("$CURRENT: pgbench exited with an error: $(grep -m1 -iE 'error|abort' <<<"$out")")
      FLAGGED[$CURRENT]=1
    }
    RESULT=$(sed -n '/^tps = /{s/^tps = \([0-9.]*\).*/\1/p;q}' <<<"$out")
    COUNT=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
  else
    out=$(wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"${SECONDS_PER_RUN}s" --latency \
      -H "Authorization: Bearer $token" "$@" 2>&1) || { echo "$out" >&2; die "wrk $* failed"; }
    # A proxy that denies answers fast: more than 0.1% of errors voids the run, fewer are noted.
    local errors total
    errors=$(awk '/Non-2xx/ { n += $NF } /Socket errors/ { for (i = 4; i <= NF; i += 2) n += $i } END { print n + 0 }' <<<"$out")
    total=$(awk '/requests in/ { print $1 }' <<<"$out")
    if ((errors * 1000 > ${total:-0})); then echo "$out" >&2; die "wrk: $errors errors in ${total:-0} requests: $*"; fi
    ((errors == 0)) || {
      NOTES+=("$CURRENT: $errors of $total responses were errors (not 2xx or socket errors)")
      FLAGGED[$CURRENT]=1
    }
    RESULT=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    COUNT=$(awk '/requests in/ { print $1 }' <<<"$out")
    P50=$(latency_ms 50% <<<"$out")
    P99=$(latency_ms 99% <<<"$out")
  fi
  [[ -n $RESULT && ${COUNT:-0} -gt 0 ]] || { echo "$out" >&2; die "no result from $tool $*"; }
  CPU_US=()
  for w in "${WATCH[@]}"; do
    label=${w%%:*}
    CPU_US[$label]=$(awk -v a="${before[$i]}" -v b="$(cpu_ticks ${w#*:})" -v t="$TICKS" -v n="$COUNT" \
      'BEGIN { printf "%.1f", (b - a) * 1e6 / t / n }')
    i=$((i + 1))
  done
}
latency_ms() { # wrk's "    50%  931.00us" -> 0.931
  awk -v q="$1" '$1 == q {
    v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    if (u == "us") v /= 1000; else if (u == "s") v *= 1000; else if (u == "m") v *= 60000;
    printf "%.3f", v; exit }'
}

# Which processes a column's CPU is charged to.
watch_for() {
  case $1 in
    pgbouncer*) WATCH=("peer:$(cat "$WORK/pgbouncer/pgbouncer.pid")") ;;
    nginx) WATCH=("peer:$(cat "$WORK/nginx-proxy/nginx.pid")") ;;
    pg-*) WATCH=("proxy:${PG_PROXY_PID[${1#pg-}]}" "broker:${BROKER_PID[${1#pg-}]}") ;;
    http-*) WATCH=("proxy:${HTTP_PROXY_PID[${1#http-}]}" "broker:${BROKER_PID[${1#http-}]}") ;;
    *) WATCH=() ;;
  esac
}

# One row: run_row COLUMN... where a column is "name|tool|token|arg|arg..." ('|' never occurs
# in a token). Each column is measured in turn, ROUNDS times; medians land in MED_*.
declare -A MED_RESULT MED_P50 MED_P99 MED_CPU
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
run_row() {
  local col r name fields args f label key
  local -A results p50s p99s cpus
  for ((r = 0; r < ROUNDS; r++)); do
    for col in "$@"; do
      IFS='|' read -r -a fields <<<"$col"
      name=${fields[0]}
      args=()
      for f in "${fields[@]:3}"; do [[ -n $f ]] && args+=("$f"); done
      watch_for "$name"
      CURRENT="$ROW_LABEL, $name"
      measure "${fields[1]}" "${fields[2]}" "${args[@]}"
      results[$name]+="$RESULT "
      p50s[$name]+="$P50 "
      p99s[$name]+="$P99 "
      for label in "${!CPU_US[@]}"; do cpus[$name/$label]+="${CPU_US[$label]} "; done
      printf '  %-14s %10.0f %s\n' "$name" "$RESULT" \
        "$(for label in "${!CPU_US[@]}"; do printf '%s=%sus/req ' "$label" "${CPU_US[$label]}"; done)" >&2
    done
  done
  MED_RESULT=() MED_P50=() MED_P99=() MED_CPU=()
  for col in "$@"; do
    name=${col%%|*}
    MED_RESULT[$name]=$(tr ' ' '\n' <<<"${results[$name]}" | grep . | median)
    MED_P50[$name]=$(tr ' ' '\n' <<<"${p50s[$name]}" | grep . | median)
    MED_P99[$name]=$(tr ' ' '\n' <<<"${p99s[$name]}" | grep . | median)
  done
  for key in "${!cpus[@]}"; do MED_CPU[$key]=$(tr ' ' '\n' <<<"${cpus[$key]}" | grep . | median); done
}

flag() { [[ -z ${FLAGGED["$1, $2"]:-} ]] || printf ' (!)'; } # row label, column
fmt_int() { printf '%.0f' "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/; ta'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
two_stacks() { [[ ${#STACKS[@]} -gt 1 ]]; }

load_before=$(uptime)
ROWS=()
ROWS_CPU=()
pg_target() { echo "-h|127.0.0.1|-p|$1|-U|$2|$3"; }
pg_row() { # label, goal, token kind (read|write), pgbench args joined by '|', label in the CPU table
  local label=$1 goal=$2 kind=$3 args=$4 cpu_label=$5 cols=() s token
  cols+=("direct|pgbench||$args|-h|$PG_HOST|-p|$PG_PORT|-U|$PG_USER|$BENCH_DB")
  cols+=("pgbouncer|pgbench||$args|$(pg_target "$PGBOUNCER_PORT" "$PG_USER" "$BENCH_DB")")
  [[ $kind == write ]] && cols+=("pgbouncer-tx|pgbench||$args|$(pg_target "$PGBOUNCER_PORT" "$PG_USER" "${BENCH_DB}_tx")")
  for s in "${STACKS[@]}"; do
    [[ $kind == read ]] && token=${READ_TOKEN[$s]} || token=${WRITE_TOKEN[$s]}
    cols+=("pg-$s|pgbench|$token|$args|$(pg_target "${PG_PROXY_PORT[$s]}" bench-agent bench)")
  done
  echo "$label" >&2
  ROW_LABEL=$label
  run_row "${cols[@]}"
  local peer=${MED_RESULT[pgbouncer]} cg=${MED_RESULT[pg-after]} peer_cell ratio_cell
  peer_cell="PgBouncer session $(fmt_int "$peer")"
  ratio_cell=$(ratio "$cg" "$peer")
  if [[ $kind == write ]]; then
    peer_cell+=" / transaction $(fmt_int "${MED_RESULT[pgbouncer-tx]}")"
    ratio_cell+=" ($(ratio "$cg" "${MED_RESULT[pgbouncer-tx]}") vs transaction)"
  fi
  local row="| $label | $(fmt_int "${MED_RESULT[direct]}") | $peer_cell | $(fmt_int "$cg")$(flag "$label" pg-after) | $ratio_cell | $goal |"
  two_stacks && row+=" $(fmt_int "${MED_RESULT[pg-before]}")$(flag "$label" pg-before) | $(ratio "$cg" "${MED_RESULT[pg-before]}") |"
  ROWS+=("$row")
  cpu_row "$cpu_label" pgbouncer pg
}
cpu_row() { # label, peer column, capgate column prefix
  local row="| $1 | ${MED_CPU[$2/peer]} | ${MED_CPU[$3-after/proxy]} + ${MED_CPU[$3-after/broker]} | $(ratio "${MED_CPU[$3-after/proxy]}" "${MED_CPU[$2/peer]}") |"
  two_stacks && row+=" ${MED_CPU[$3-before/proxy]} + ${MED_CPU[$3-before/broker]} | $(ratio "${MED_CPU[$3-after/proxy]}" "${MED_CPU[$3-before/proxy]}") |"
  ROWS_CPU+=("$row")
}

pg_row "pgbench -S, $CLIENTS clients (tps)" ">= 0.9x" read "-S" "pgbench -S (per statement)"
pg_row "pgbench -S -M prepared (tps)" ">= 0.9x" read "-S|-M|prepared" "pgbench -S -M prepared (per statement)"
pg_row "pgbench TPC-B-like (tps)" ">= 0.9x" write "" "pgbench TPC-B-like (per transaction: 7 statements)"

echo "wrk GET, $WRK_CONNECTIONS connections" >&2
path=/v2/volumes/vol-1
# Every column sends the same request, bearer token included (nginx and the upstream ignore it).
http_cols=("direct|wrk|${HTTP_TOKEN[after]}|http://127.0.0.1:$UPSTREAM_PORT$path"
  "nginx|wrk|${HTTP_TOKEN[after]}|http://127.0.0.1:$NGINX_PROXY_PORT$path")
for s in "${STACKS[@]}"; do http_cols+=("http-$s|wrk|${HTTP_TOKEN[$s]}|http://127.0.0.1:${HTTP_PROXY_PORT[$s]}$path"); done
ROW_LABEL="wrk GET"
run_row "${http_cols[@]}"
ms() { printf '%s ms' "$1"; }
http_row() { # label, metric array, format, goal, peer prefix
  local label=$1 format=$3 goal=$4 prefix=$5
  local -n m=$2
  local row="| $label | $($format "${m[direct]}") | $prefix$($format "${m[nginx]}") | $($format "${m[http-after]}")$(flag "wrk GET" http-after) | $(ratio "${m[http-after]}" "${m[nginx]}") | $goal |"
  two_stacks && row+=" $($format "${m[http-before]}")$(flag "wrk GET" http-before) | $(ratio "${m[http-after]}" "${m[http-before]}") |"
  ROWS+=("$row")
}
http_row "wrk GET, $WRK_CONNECTIONS connections (req/s)" MED_RESULT fmt_int ">= 0.8x" "nginx reverse proxy "
http_row "wrk GET latency p50" MED_P50 ms "<= 1.5x" ""
http_row "wrk GET latency p99" MED_P99 ms "<= 2x" ""
cpu_row "wrk GET (per request)" nginx http
load_after=$(uptime)

bin_id() { printf '%s (sha256 %s)' "$1" "$(sha256sum "$1" | cut -c1-12)"; }
table() { # header, separator, rows...
  local header=$1 sep=$2
  shift 2
  if two_stacks; then
    header+=" capgate before | after / before |"
    sep+="---:|---:|"
  fi
  printf '%s\n%s\n' "$header" "$sep"
  printf '%s\n' "$@"
}
echo
echo "capgate: $(bin_id "${BINS[0]}")"
two_stacks && echo "capgate before: $(bin_id "${BINS[1]}")"
echo "$(nproc) cores; load average before:${load_before##*load average:}; after:${load_after##*load average:}"
echo "pgbench: $CLIENTS clients, $PGBENCH_JOBS threads, scale ${SCALE:-1}; wrk: $WRK_THREADS threads," \
  "$WRK_CONNECTIONS connections; ${SECONDS_PER_RUN} s per run; median of $ROUNDS round(s)"
echo
table "| run | direct | peer a user would deploy | capgate | capgate / peer | goal |" \
  "|---|---:|---:|---:|---:|---|" "${ROWS[@]}"
echo
echo "CPU in microseconds (user+sys from /proc; capgate = its proxy + its broker;"
echo "the ratios compare the proxies alone):"
echo
table "| run | peer | capgate | capgate proxy / peer |" "|---|---:|---:|---:|" "${ROWS_CPU[@]}"
if ((${#NOTES[@]})); then
  echo
  echo "(!) in a cell: some round of it had errors:"
  printf -- '- %s\n' "${NOTES[@]}"
fi
# Denials during the runs (the readiness probes, before keys and revocations synced, are not).
for log in "$WORK"/*/http.log "$WORK"/*/pg.log; do
  denials=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep ' deny ' | grep -v -e 'never been synchronised' -e 'volumes/ready' |
    grep -o 'code="[a-z_]*"' | sort | uniq -c | tr -s ' ' | paste -sd, -) || true
  [[ -z $denials ]] || echo "- denials in ${log#"$WORK"/}: $denials"
done
