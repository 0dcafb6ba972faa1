#!/usr/bin/env bash
# pgbench through the Capgate PostgreSQL proxy vs directly: select-only (-S) and the default
# TPC-B-like run, printing TPS for both and the ratio (goal: >= 80% of direct).
# Needs the local PostgreSQL (127.0.0.1:5432, trust, database `test`) and a release build:
#   cargo build --release && benches/pgbench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CAPGATE_BIN:-target/release/capgate}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
CLIENTS=${CLIENTS:-4}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker_port=$(free_port)
pg_port=$(free_port)
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
sleep 1.5  # the proxy syncs keys and containment settings

pgbench -h 127.0.0.1 -p 5432 -U postgres -i -s 1 -q test >/dev/null 2>&1
run() { # label, extra args, connection args...
  local out
  out=$(pgbench -n -T "$SECONDS_PER_RUN" -c "$CLIENTS" -j 2 "$@" 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
}
direct_s=$(run -S -h 127.0.0.1 -p 5432 -U postgres test)
proxy_s=$(PGPASSWORD=$token run -S -h 127.0.0.1 -p "$pg_port" -U deploy-bot staging)
direct_b=$(run -h 127.0.0.1 -p 5432 -U postgres test)
proxy_b=$(PGPASSWORD=$token run -h 127.0.0.1 -p "$pg_port" -U deploy-bot staging)
ratio() { python3 -c "print(f'{100*float($2)/float($1):.0f}%')"; }
printf '%-28s %12s %12s %8s\n' "" "direct tps" "proxy tps" "ratio"
printf '%-28s %12.0f %12.0f %8s\n' "select-only (-S)" "$direct_s" "$proxy_s" "$(ratio "$direct_s" "$proxy_s")"
printf '%-28s %12.0f %12.0f %8s\n' "TPC-B-like (default)" "$direct_b" "$proxy_b" "$(ratio "$direct_b" "$proxy_b")"
echo "(goal: >= 80% of direct; $CLIENTS clients, ${SECONDS_PER_RUN}s per run, every write audited synchronously)"
