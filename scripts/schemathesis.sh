#!/usr/bin/env bash
# Runs schemathesis against a real broker: openapi.yaml and the server must agree on every
# route (status codes, bounds, required fields, content types). Starts `capgate serve` on the
# embedded store with the demo capgate.toml in a temporary directory, mints an agent token for
# the routes adapters call with one, runs every check for a bounded time, stops the broker.
#
#   scripts/schemathesis.sh            # about 2 minutes; CAPGATE_BIN=path to use another build
#   ST_MAX_TIME=30 scripts/schemathesis.sh
#
# Needs `pip install schemathesis` (version pinned below) and `curl`.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

max_time=${ST_MAX_TIME:-110}
bin=${CAPGATE_BIN:-}
if [[ -z $bin ]]; then
  cargo build --quiet --bin capgate
  bin=${CARGO_TARGET_DIR:-target}/debug/capgate
fi

work=$(mktemp -d)
broker_pid=
cleanup() {
  [[ -n $broker_pid ]] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cp -r policies "$work/policies"
sed "s/^listen = .*/listen = \"127.0.0.1:$port\"/" capgate.toml >"$work/capgate.toml"
"$bin" serve --config "$work/capgate.toml" 2>"$work/broker.log" &
broker_pid=$!
url="http://127.0.0.1:$port"
for _ in $(seq 1 100); do
  curl -fsS "$url/v1/health" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$url/v1/health" >/dev/null || { cat "$work/broker.log"; exit 1; }

# The demo credentials from capgate.toml (public, in README.md).
export ST_AGENT_KEY=cgk_ef3d9d5f0792cebce732585f5521f2be
export ST_OPERATOR_KEY=cgo_f1ebd0029c62047451cfc50d5457477a
export ST_ADAPTER_KEY=cga_f5c677a8f75b9f559198b22282d27c16
ST_AGENT_TOKEN=$(curl -fsS "$url/v1/tokens" -H "Authorization: Bearer $ST_AGENT_KEY" \
  -H 'Content-Type: application/json' \
  -d '{"authorization_details":[{"type":"capgate","locations":["http://railway-staging/volumes/"],"actions":["read","write","delete"]}],"ttl_seconds":900}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
export ST_AGENT_TOKEN

python3 -m schemathesis.cli --version
# One worker: hypothesis parses lambda sources with `ast` on each worker thread, and CPython
# 3.11 can fail that under threads ("AST constructor recursion depth mismatch").
set +e
python3 -m schemathesis.cli --config-file scripts/schemathesis.toml run openapi.yaml \
  --url "$url" --checks all --max-time "$max_time" --workers 1 --no-color "$@"
status=$?
set -e
if ((status != 0)); then
  echo "schemathesis failed (exit $status); broker log: $work/broker.log (tail below)"
  tail -n 20 "$work/broker.log"
fi
exit $status
