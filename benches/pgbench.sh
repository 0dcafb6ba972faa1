#!/usr/bin/env bash
# pgbench through the Capgate PostgreSQL proxy vs directly: select-only (-S), the same with
# prepared statements (-M prepared) and the default TPC-B-like run, printing TPS and the
# ratio to direct (goal: >= 80%). A byte relay that checks nothing (examples/tcp_relay.rs)
# runs too: what one more hop costs on this machine bounds what any proxy can reach here.
# Needs the local PostgreSQL (127.0.0.1:5432, trust, database `test`) and a release build:
#   cargo build --release --bin capgate --example tcp_relay && benches/pgbench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CAPGATE_BIN:-target/release/capgate}
RELAY_BIN=${RELAY_BIN:-$(dirname "$BIN")/examples/tcp_relay}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
CLIENTS=${CLIENTS:-4}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker_port=$(free_port)
pg_port=$(free_port)
relay_port=$(free_port)
agent_key=cgk_bench_agent_0123456789abcdef0123
adapter_key=cga_bench_adapter_0123456789abcdef01
sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

cat > "$work/broker.toml" <<TOML
listen = "127.0.0.1:$broker_port"
data_dir = "$work/data"
policies = "$PWD/policies"
adapter_policies = "$PWD/policies/adapters"
[[environments]]
name = "staging"
resources = ["pg://staging/"]
[[identity.api_keys]]
agent = "deploy-bot"
sha256 = "$(sha $agent_key)"
[[adapters]]
name = "pg-bench"
sha256 = "$(sha $adapter_key)"
TOML
cat > "$work/pg.toml" <<TOML
listen = "127.0.0.1:$pg_port"
broker = "http://127.0.0.1:$broker_port"
environment = "staging"
database = "staging"
name = "pg-bench"
adapter_policies = "$PWD/policies/adapters"
adapter_key_env = "CAPGATE_ADAPTER_KEY"
audit_spool = "$work/spool.jsonl"
[upstream]
addr = "127.0.0.1:5432"
database = "test"
user = "postgres"
TOML

"$BIN" serve --config "$work/broker.toml" 2>"$work/broker.log" &
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$broker_port/v1/health" >/dev/null && break; sleep 0.1; done
CAPGATE_ADAPTER_KEY=$adapter_key RUST_LOG=warn "$BIN" proxy pg --config "$work/pg.toml" 2>"$work/pg.log" &
token=$(CAPGATE_CREDENTIAL=$agent_key "$BIN" token request --broker "http://127.0.0.1:$broker_port" \
  --scope pg://staging/:write --scope pg://staging/:read --ttl 1h)
"$RELAY_BIN" "127.0.0.1:$relay_port" 127.0.0.1:5432 &
sleep 1.5  # the proxy syncs keys and containment settings

pgbench -h 127.0.0.1 -p 5432 -U postgres -i -s 1 -q test >/dev/null 2>&1
run() { # label, extra args, connection args...
  local out
  out=$(pgbench -n -T "$SECONDS_PER_RUN" -c "$CLIENTS" -j 2 "$@" 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
}
ratio() { python3 -c "print(f'{100*float($2)/float($1):.0f}%')"; }
printf '%-30s %11s %11s %11s %9s %9s\n' "" "direct tps" "relay tps" "proxy tps" "relay/dir" "proxy/dir"
row() { # label, pgbench args...
  local label=$1 direct relay proxy
  shift
  direct=$(run "$@" -h 127.0.0.1 -p 5432 -U postgres test)
  relay=$(run "$@" -h 127.0.0.1 -p "$relay_port" -U postgres test)
  proxy=$(PGPASSWORD=$token run "$@" -h 127.0.0.1 -p "$pg_port" -U deploy-bot staging)
  printf '%-30s %11.0f %11.0f %11.0f %9s %9s\n' "$label" "$direct" "$relay" "$proxy" \
    "$(ratio "$direct" "$relay")" "$(ratio "$direct" "$proxy")"
}
row "select-only (-S)" -S
row "select-only, prepared" -S -M prepared
row "TPC-B-like (default)"
echo "(goal: proxy >= 80% of direct; relay = a byte relay checking nothing, the ceiling for any"
echo " proxy on this machine; $CLIENTS clients, ${SECONDS_PER_RUN}s per run; every statement parsed"
echo " and authorized, every decision audited, writes recorded at the broker before COMMIT)"
