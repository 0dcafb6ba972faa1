#!/usr/bin/env bash
# Where the proxies' CPU time goes under load, kernel included (callgrind sees only user-space
# instructions): `perf record -e cpu-clock` on the Capgate proxy process while pgbench -S
# (4 clients) or wrk (16 connections) runs through it, then the split by binary/kernel and the
# top symbols. cpu-clock is a timer, so it works on VMs without hardware counters.
#
#   CAPGATE_BIN=path benches/perf.sh          # PERF_SECONDS (10), PERF_OUT (dir to keep perf.data)
set -euo pipefail
source "$(dirname "$0")/stack.sh"

PERF_SECONDS=${PERF_SECONDS:-10}
ensure_packages linux-perf nginx-light wrk postgresql-client
resolve_capgate_bin
ensure_bench_db
pgbench_init
start_upstream
start_broker perf "$CAPGATE_BIN"
issue_tokens perf "$CAPGATE_BIN"
start_pg_proxy perf "$CAPGATE_BIN"
start_http_proxy perf "$CAPGATE_BIN" "http://127.0.0.1:$UPSTREAM_PORT"
out=${PERF_OUT:-$WORK}
mkdir -p "$out"

profile() { # name, pid, load command...
  local name=$1 pid=$2
  shift 2
  "$@" >"$WORK/$name.load.log" 2>&1 &
  local load=$!
  sleep 1 # past connection set-up
  perf record -q -e cpu-clock -F 1999 -p "$pid" -o "$out/$name.perf.data" -- sleep "$PERF_SECONDS" 2>/dev/null
  wait "$load" || { cat "$WORK/$name.load.log" >&2; die "$name load failed"; }
  echo "## $name ($(grep -m1 -E '^tps|^Requests/sec' "$WORK/$name.load.log"))"
  echo
  echo "Samples by binary (kernel = syscalls, network stack, scheduler):"
  # (|| true: head closing the pipe early is not a failure)
  perf report -i "$out/$name.perf.data" --stdio --sort dso 2>/dev/null | grep -E '^ +[0-9]' | head -8 || true
  echo
  echo "Top symbols:"
  perf report -i "$out/$name.perf.data" --stdio --sort dso,sym 2>/dev/null | grep -E '^ +[0-9]' | head -"${PERF_TOP:-25}" || true
  echo
}
profile pg_select "${PG_PROXY_PID[perf]}" env PGPASSWORD="${READ_TOKEN[perf]}" pgbench -n -S -c 4 -j 2 \
  -T $((PERF_SECONDS + 2)) -h 127.0.0.1 -p "${PG_PROXY_PORT[perf]}" -U bench-agent bench
profile http_get "${HTTP_PROXY_PID[perf]}" wrk -t2 -c16 -d$((PERF_SECONDS + 2))s \
  -H "Authorization: Bearer ${HTTP_TOKEN[perf]}" "http://127.0.0.1:${HTTP_PROXY_PORT[perf]}/v2/volumes/vol-1"
