#!/usr/bin/env bash
# Instructions per request of Capgate's proxies under `valgrind --tool=callgrind`: a count that
# stays put on a noisy machine, where throughput does not (issue #15).
#
#   http_get        one GET through the HTTP proxy (route match, guard, token strip, credential
#                   injection, hyper client to an nginx upstream, response relay)
#   pg_select       one `pgbench -S` statement through the PostgreSQL proxy (frame, pg_query
#                   classification, guard, relay of the answer)
#   pg_prepared     the same statement with -M prepared (Bind/Execute of a statement parsed and
#                   classified once per connection; each Execute still a guard decision)
#   pg_tpcb         one pgbench TPC-B-like transaction (7 statements; its writes recorded at the
#                   broker before COMMIT) through the PostgreSQL proxy
#   guard_http      one warm guard decision (inclusive cost of $GUARD_FN) in the HTTP run
#   guard_pg        the same in the pg_select run
#
# The real binary runs under callgrind; clients outside valgrind (curl with keep-alive, pgbench
# with one connection) send N1 then N2 requests, each batch on a fresh connection, with a dump
# after each: (cost(N2) - cost(N1)) / (N2 - N1) leaves out start-up, connection set-up and login.
# Everything the process does meanwhile counts, background threads included (the audit spool
# writer and its shipping to the broker, the sync long-poll), as it is work per request too.
# Only the proxy process is measured: not the broker, not PostgreSQL, not the client.
#
#   benches/callgrind.sh                 # measure and print (builds target/release/capgate)
#   CAPGATE_BIN=path benches/callgrind.sh --check   # fail if a count grew > 20% over the baseline
#   benches/callgrind.sh --update        # rewrite benches/callgrind-baseline.txt
#
# Env: CAPGATE_BIN; TOLERANCE (percent, 20); BASELINE (benches/callgrind-baseline.txt);
# N1/N2 (requests per batch, 100/600 for HTTP and pg -S; TPC-B uses a fifth);
# CALLGRIND_OUT (a directory: keep each batch's profile there, <run>.n<N>.callgrind, for
# callgrind_annotate or benches/callgrind-profile.py);
# CALLGRIND_ARGS (extra valgrind options, e.g. --dump-instr=yes); GUARD_FN (the guard's
# decision function as callgrind names it). Needs the local PostgreSQL (BENCH_DB, as peers.sh).
# Counts are for a release build with TOKIO_WORKER_THREADS=2 (set here): another profile,
# toolchain or dependency update moves them, so update the baseline with the change that did it.
set -euo pipefail
source "$(dirname "$0")/stack.sh"

mode=print
case ${1:-} in
  --check) mode=check ;;
  --update) mode=update ;;
  "") ;;
  *) die "usage: $0 [--check|--update]" ;;
esac
TOLERANCE=${TOLERANCE:-20}
BASELINE=${BASELINE:-$REPO/benches/callgrind-baseline.txt}
N1=${N1:-100}
N2=${N2:-600}
TX1=$((N1 / 5))
TX2=$((N2 / 5))
GUARD_FN=${GUARD_FN:-capgate_core::guard::Guard::evaluate}
export TOKIO_WORKER_THREADS=2 # the count of parked/woken workers must not depend on the machine
DATALOG_MAX_TIME=${DATALOG_MAX_TIME:-10s}
started=$SECONDS

ensure_packages valgrind nginx-light postgresql-client
resolve_capgate_bin
ensure_bench_db
pgbench_init

callgrind() { # output file base; then the command. Runs in the background job of the proxy:
  local out=$1 # exec keeps the job's pid, which callgrind_control is then given
  shift
  # shellcheck disable=SC2086 # CALLGRIND_ARGS is a list of options
  exec valgrind --tool=callgrind --callgrind-out-file="$out" ${CALLGRIND_ARGS:-} "$@"
}
dump() { callgrind_control -d "$1" >>"$WORK/callgrind_control.log" 2>&1 || die "callgrind_control -d $1 failed"; }
total_ir() { awk '/^summary:/ { print $2; exit }' "$1"; }
# Inclusive instructions of one function in a dump (0 if never called).
inclusive_ir() {
  callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null |
    awk -v fn="$2" '!found && index($0, ":" fn " [") { gsub(",", "", $1); print $1; found = 1 }
      END { if (!found) print 0 }'
}
per_request() { # cost1 cost2 n1 n2
  awk -v a="$1" -v b="$2" -v n1="$3" -v n2="$4" 'BEGIN { printf "%.0f", (b - a) / (n2 - n1) }'
}
# Waits for callgrind to write dump file number $2 of base $1.
wait_dump() { wait_for 60 test -s "$1.$2" || die "no callgrind dump $1.$2"; }

start_broker cg "$CAPGATE_BIN"
issue_tokens cg "$CAPGATE_BIN"
start_upstream

declare -A COUNT
# --- HTTP: curl sends a batch of GETs on one keep-alive connection (URL globbing).
http_batch() { # n
  local codes
  codes=$(curl -s -o /dev/null -w '%{http_code}\n' -H "Authorization: Bearer ${HTTP_TOKEN[cg]}" \
    "http://127.0.0.1:${HTTP_PROXY_PORT[cg]}/v2/volumes/v[10001-$((10000 + $1))]")
  [[ $(grep -c '^200$' <<<"$codes") == "$1" ]] || die "HTTP batch: not every answer was 200: $(sort <<<"$codes" | uniq -c | tr '\n' ' ')"
}
out=$WORK/http.callgrind
READY_WAIT=180 start_http_proxy cg "$CAPGATE_BIN" "http://127.0.0.1:$UPSTREAM_PORT" callgrind "$out"
pid=${HTTP_PROXY_PID[cg]}
callgrind_control -z "$pid" >>"$WORK/callgrind_control.log" 2>&1 || die "callgrind_control -z failed"
http_batch "$N1"
dump "$pid"
http_batch "$N2"
dump "$pid"
wait_dump "$out" 2
COUNT[http_get]=$(per_request "$(total_ir "$out.1")" "$(total_ir "$out.2")" "$N1" "$N2")
COUNT[guard_http]=$(per_request "$(inclusive_ir "$out.1" "$GUARD_FN")" "$(inclusive_ir "$out.2" "$GUARD_FN")" "$N1" "$N2")
keep() { # run name, first dump, second dump, n1, n2: both batches, for a per-request profile
  [[ -n ${CALLGRIND_OUT:-} ]] || return 0
  mkdir -p "$CALLGRIND_OUT"
  cp "$2" "$CALLGRIND_OUT/$1.n$4.callgrind"
  cp "$3" "$CALLGRIND_OUT/$1.n$5.callgrind"
}
keep http_get "$out.1" "$out.2" "$N1" "$N2"
kill "$pid"

# --- PostgreSQL: pgbench, one client, a fixed seed (the same statements in every run).
pg_batch() { # token, transactions, pgbench args...
  local token=$1 n=$2 result
  shift 2
  result=$(PGPASSWORD=$token pgbench -n -c 1 -j 1 -t "$n" --random-seed=7 "$@" \
    -h 127.0.0.1 -p "${PG_PROXY_PORT[cg]}" -U bench-agent bench 2>&1) || { echo "$result" >&2; die "pgbench $* failed"; }
  grep -q "^number of transactions actually processed: $n/$n" <<<"$result" || { echo "$result" >&2; die "pgbench $*: not all $n processed"; }
}
out=$WORK/pg.callgrind
READY_WAIT=180 start_pg_proxy cg "$CAPGATE_BIN" callgrind "$out"
pid=${PG_PROXY_PID[cg]}
callgrind_control -z "$pid" >>"$WORK/callgrind_control.log" 2>&1 || die "callgrind_control -z failed"
pg_batch "${READ_TOKEN[cg]}" "$N1" -S
dump "$pid"
pg_batch "${READ_TOKEN[cg]}" "$N2" -S
dump "$pid"
pg_batch "${READ_TOKEN[cg]}" "$N1" -S -M prepared
dump "$pid"
pg_batch "${READ_TOKEN[cg]}" "$N2" -S -M prepared
dump "$pid"
pg_batch "${WRITE_TOKEN[cg]}" "$TX1"
dump "$pid"
pg_batch "${WRITE_TOKEN[cg]}" "$TX2"
dump "$pid"
wait_dump "$out" 6
COUNT[pg_select]=$(per_request "$(total_ir "$out.1")" "$(total_ir "$out.2")" "$N1" "$N2")
COUNT[guard_pg]=$(per_request "$(inclusive_ir "$out.1" "$GUARD_FN")" "$(inclusive_ir "$out.2" "$GUARD_FN")" "$N1" "$N2")
COUNT[pg_prepared]=$(per_request "$(total_ir "$out.3")" "$(total_ir "$out.4")" "$N1" "$N2")
COUNT[pg_tpcb]=$(per_request "$(total_ir "$out.5")" "$(total_ir "$out.6")" "$TX1" "$TX2")
keep pg_select "$out.1" "$out.2" "$N1" "$N2"
keep pg_prepared "$out.3" "$out.4" "$N1" "$N2"
keep pg_tpcb "$out.5" "$out.6" "$TX1" "$TX2"
kill "$pid"
((COUNT[guard_http] > 0 && COUNT[guard_pg] > 0)) || die "$GUARD_FN never ran: set GUARD_FN to the guard's decision function"

KEYS=(http_get pg_select pg_prepared pg_tpcb guard_http guard_pg)
echo "instructions per request (callgrind Ir), $(basename "$CAPGATE_BIN"), N1=$N1 N2=$N2, $((SECONDS - started)) s:"
declare -A BASE
if [[ -r $BASELINE ]]; then
  while read -r key value _; do [[ $key == \#* || -z $key ]] || BASE[$key]=$value; done <"$BASELINE"
fi
failed=0
for key in "${KEYS[@]}"; do
  line=$(printf '  %-11s %10s' "$key" "${COUNT[$key]}")
  if [[ -n ${BASE[$key]:-} ]]; then
    change=$(awk -v a="${COUNT[$key]}" -v b="${BASE[$key]}" 'BEGIN { printf "%+.1f", 100 * (a - b) / b }')
    line+=$(printf '   baseline %10s  %6s%%' "${BASE[$key]}" "$change")
    if awk -v c="$change" -v t="$TOLERANCE" 'BEGIN { exit !(c > t) }'; then
      line+="   GREW MORE THAN $TOLERANCE%"
      failed=1
    fi
  elif [[ $mode == check ]]; then
    line+="   no baseline"
    failed=1
  fi
  echo "$line"
done

case $mode in
  update)
    {
      echo "# Instructions per request (callgrind Ir) from benches/callgrind.sh; --check fails when one"
      echo "# grows by more than its tolerance (TOLERANCE, 20%). Measured $(date -u +%F) on $(git -C "$(dirname "$0")/.." rev-parse --short HEAD 2>/dev/null || echo "an unknown commit") ($(basename "$CAPGATE_BIN")),"
      echo "# $(valgrind --version), N1=$N1 N2=$N2, TOKIO_WORKER_THREADS=2."
      for key in "${KEYS[@]}"; do echo "$key ${COUNT[$key]}"; done
    } >"$BASELINE"
    echo "baseline written: $BASELINE"
    ;;
  check)
    ((failed == 0)) || die "instruction counts grew more than $TOLERANCE% over $BASELINE (or have no baseline)"
    echo "within $TOLERANCE% of $BASELINE"
    ;;
esac
