# Sourced by benches/peers.sh and benches/callgrind.sh: starts the processes a benchmark needs
# and stops every one of them on exit. A Capgate "stack" is one broker (embedded SQLite store,
# fresh data dir, the bench keys below) with its PostgreSQL and HTTP proxies, all from one
# binary, so two binaries (before/after) can run side by side without sharing any state.
# Nothing here is a public interface; the two scripts are.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DB=${BENCH_DB:-capgate_bench}   # dedicated database: `pgbench -i` recreates its tables
PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
PG_USER=${PG_USER:-postgres}
# Published bench keys (like the test keys): they only ever open a throwaway broker.
BENCH_AGENT_KEY=cgk_bench_agent_0123456789abcdef0123
BENCH_PG_ADAPTER_KEY=cga_bench_pg_adapter_0123456789abcdef
BENCH_HTTP_ADAPTER_KEY=cga_bench_http_adapter_0123456789abcd
UPSTREAM_CREDENTIAL=upstream-secret
# Decisions are still recorded (audit spool shipped to the broker); per-decision log lines at
# info level are not, as nginx and PgBouncer run without access logs here.
PROXY_LOG=${PROXY_LOG:-warn}
# The guard's Datalog time limit (default 20 ms) is a wall-clock bound: callgrind, 50x slower,
# needs a looser one or it turns slow runs into `policy_run_limit` denies.
DATALOG_MAX_TIME=${DATALOG_MAX_TIME:-}
datalog_section() { [[ -z $DATALOG_MAX_TIME ]] || printf '[datalog]\nmax_time = "%s"\n' "$DATALOG_MAX_TIME"; }

PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/capgate-bench.XXXXXX")
chmod 755 "$WORK" # PgBouncer runs as postgres and reads its config here

stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ -n ${KEEP_WORK:-} ]] && echo "work dir kept: $WORK" >&2 || rm -rf "$WORK"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

die() { echo "error: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
# Waits until `cmd...` succeeds, for at most $1 seconds.
wait_for() {
  local limit=$1 start=$SECONDS
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS - start < limit)) || return 1
    sleep 0.2
  done
}

# Debian packages a benchmark needs, installed when missing (as root, or through sudo).
ensure_packages() {
  local missing=() pkg
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  ((${#missing[@]})) || return 0
  echo "installing ${missing[*]}" >&2
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The Capgate binary: $CAPGATE_BIN, or a fresh release build of this checkout.
resolve_capgate_bin() {
  if [[ -n ${CAPGATE_BIN:-} ]]; then
    [[ -x $CAPGATE_BIN ]] || die "CAPGATE_BIN=$CAPGATE_BIN is not an executable"
  else
    echo "CAPGATE_BIN unset: cargo build --release --features pg --bin capgate" >&2
    (cd "$REPO" && cargo build --release --features pg --bin capgate) >&2
    CAPGATE_BIN=$REPO/target/release/capgate
  fi
  CAPGATE_BIN=$(realpath "$CAPGATE_BIN")
}

# The dedicated database, created when missing; nothing else on the server is touched.
ensure_bench_db() {
  pg_isready -h "$PG_HOST" -p "$PG_PORT" -q || die "no PostgreSQL on $PG_HOST:$PG_PORT"
  if [[ -z $(psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -Atc \
    "select 1 from pg_database where datname = '$BENCH_DB'") ]]; then
    psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -qc "create database $BENCH_DB" >/dev/null
  fi
}

pgbench_init() {
  pgbench -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -i -s "${SCALE:-1}" -q "$BENCH_DB" >"$WORK/pgbench-init.log" 2>&1 ||
    { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
}

# start_broker NAME BIN: a broker with its own data dir; sets BROKER_URL[NAME].
declare -gA BROKER_URL BROKER_PID PG_PROXY_PORT PG_PROXY_PID HTTP_PROXY_PORT HTTP_PROXY_PID
declare -gA READ_TOKEN WRITE_TOKEN HTTP_TOKEN
start_broker() {
  local name=$1 bin=$2 dir=$WORK/$1 port
  port=$(free_port)
  mkdir -p "$dir/policies"
  # Grants whatever the bench agent asks for: the bench measures deciding, not issuing.
  echo 'grant($r, $v) <- agent("bench-agent"), requested($r, $v);' >"$dir/policies/bench.dl"
  cat >"$dir/broker.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "$dir/data"
policies = "$dir/policies"
adapter_policies = "$REPO/policies/adapters"
[tokens]
default_ttl = "10m"
max_ttl = "4h"
[[environments]]
name = "bench-pg"
resources = ["pg://bench/"]
[[environments]]
name = "bench-http"
resources = ["http://bench/"]
[[identity.api_keys]]
agent = "bench-agent"
sha256 = "$(sha "$BENCH_AGENT_KEY")"
[[adapters]]
name = "pg-bench"
sha256 = "$(sha "$BENCH_PG_ADAPTER_KEY")"
[[adapters]]
name = "http-bench"
sha256 = "$(sha "$BENCH_HTTP_ADAPTER_KEY")"
TOML
  RUST_LOG=$PROXY_LOG "$bin" serve --config "$dir/broker.toml" >"$dir/broker.log" 2>&1 &
  PIDS+=($!)
  BROKER_PID[$name]=$!
  BROKER_URL[$name]=http://127.0.0.1:$port
  wait_for 30 curl -sf "http://127.0.0.1:$port/v1/health" ||
    { cat "$dir/broker.log" >&2; die "broker $name did not start"; }
}

# issue_tokens NAME BIN: tokens for the bench agent from broker NAME (TTL covers long runs).
issue_tokens() {
  local name=$1 bin=$2
  request_token() {
    CAPGATE_CREDENTIAL=$BENCH_AGENT_KEY "$bin" token request --broker "${BROKER_URL[$name]}" \
      --ttl "${TOKEN_TTL:-4h}" "$@"
  }
  READ_TOKEN[$name]=$(request_token --scope pg://bench/:read)
  WRITE_TOKEN[$name]=$(request_token --scope pg://bench/:read --scope pg://bench/:write)
  HTTP_TOKEN[$name]=$(request_token --scope http://bench/volumes/:read)
}

# start_pg_proxy NAME BIN [WRAPPER...]: the PostgreSQL proxy of stack NAME in front of the
# bench database; WRAPPER (e.g. valgrind) prefixes the command.
start_pg_proxy() {
  local name=$1 bin=$2 dir=$WORK/$1 port
  shift 2
  port=$(free_port)
  cat >"$dir/pg.toml" <<TOML
listen = "127.0.0.1:$port"
broker = "${BROKER_URL[$name]}"
environment = "bench-pg"
database = "bench"
name = "pg-bench"
adapter_policies = "$REPO/policies/adapters"
adapter_key_env = "CAPGATE_ADAPTER_KEY"
audit_spool = "$dir/pg-spool.jsonl"
[upstream]
addr = "$PG_HOST:$PG_PORT"
database = "$BENCH_DB"
user = "$PG_USER"
$(datalog_section)
TOML
  CAPGATE_ADAPTER_KEY=$BENCH_PG_ADAPTER_KEY RUST_LOG=$PROXY_LOG \
    "$@" "$bin" proxy pg --config "$dir/pg.toml" >"$dir/pg.log" 2>&1 &
  PIDS+=($!)
  PG_PROXY_PID[$name]=$!
  PG_PROXY_PORT[$name]=$port
  # Ready once a statement passes: keys and containment settings have synced.
  wait_for "${READY_WAIT:-30}" env PGPASSWORD="${READ_TOKEN[$name]}" psql -h 127.0.0.1 -p "$port" \
    -U bench-agent -d bench -Atc 'select 1' ||
    { cat "$dir/pg.log" >&2; die "pg proxy $name is not answering"; }
}

# start_http_proxy NAME BIN UPSTREAM_URL [WRAPPER...]: the HTTP proxy of stack NAME; one route,
# GET /v2/volumes/{id} -> read http://bench/volumes/{id}, the upstream credential injected.
start_http_proxy() {
  local name=$1 bin=$2 upstream=$3 dir=$WORK/$1 port
  shift 3
  port=$(free_port)
  printf '%s' "$UPSTREAM_CREDENTIAL" >"$dir/upstream-credential"
  cat >"$dir/http.toml" <<TOML
listen = "127.0.0.1:$port"
broker = "${BROKER_URL[$name]}"
environment = "bench-http"
name = "http-bench"
mode = "enforce"
adapter_policies = "$REPO/policies/adapters"
adapter_key_env = "CAPGATE_ADAPTER_KEY"
audit_spool = "$dir/http-spool.jsonl"
[upstream]
url = "$upstream"
credential_header = "authorization"
credential_prefix = "Bearer "
credential_file = "$dir/upstream-credential"
[[routes]]
method = "GET"
path = "/v2/volumes/{id}"
resource = "http://bench/volumes/{id}"
verb = "read"
$(datalog_section)
TOML
  CAPGATE_ADAPTER_KEY=$BENCH_HTTP_ADAPTER_KEY RUST_LOG=$PROXY_LOG \
    "$@" "$bin" proxy http --config "$dir/http.toml" >"$dir/http.log" 2>&1 &
  PIDS+=($!)
  HTTP_PROXY_PID[$name]=$!
  HTTP_PROXY_PORT[$name]=$port
  wait_for "${READY_WAIT:-30}" curl -sf -o /dev/null -H "Authorization: Bearer ${HTTP_TOKEN[$name]}" \
    "http://127.0.0.1:$port/v2/volumes/ready" ||
    { cat "$dir/http.log" >&2; die "http proxy $name is not answering"; }
}

# start_upstream: nginx answering 200 "ok" to everything on keep-alive connections; the one
# upstream for direct, nginx-as-proxy and Capgate. Sets UPSTREAM_PORT.
start_upstream() {
  local dir=$WORK/upstream
  mkdir -p "$dir"
  UPSTREAM_PORT=$(free_port)
  nginx_conf "$dir" "server {
    listen 127.0.0.1:$UPSTREAM_PORT;
    keepalive_requests 1000000;
    location / { return 200 \"ok\\n\"; }
  }"
  start_nginx "$dir"
  wait_for 10 curl -sf -o /dev/null "http://127.0.0.1:$UPSTREAM_PORT/" || die "upstream nginx did not start"
}

# start_nginx_proxy: nginx as users deploy it in front of an API: keep-alive to the upstream
# (HTTP/1.1, pooled connections), the upstream credential injected. Sets NGINX_PROXY_PORT.
start_nginx_proxy() {
  local dir=$WORK/nginx-proxy
  mkdir -p "$dir"
  NGINX_PROXY_PORT=$(free_port)
  nginx_conf "$dir" "upstream api {
    server 127.0.0.1:$UPSTREAM_PORT;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PROXY_PORT;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Authorization \"Bearer $UPSTREAM_CREDENTIAL\";
    }
  }"
  start_nginx "$dir"
  wait_for 10 curl -sf -o /dev/null "http://127.0.0.1:$NGINX_PROXY_PORT/v2/volumes/ready" ||
    die "nginx proxy did not start"
}

nginx_conf() { # dir, http-block body
  local dir=$1 user=""
  ((EUID == 0)) && user="user nobody nogroup;"
  cat >"$dir/nginx.conf" <<CONF
$user
worker_processes auto;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  $2
}
CONF
}

start_nginx() {
  nginx -e "$1/error.log" -p "$1" -c "$1/nginx.conf" &
  PIDS+=($!)
}

# start_pgbouncer: PgBouncer in front of the bench database; session mode under the
# database's own name, transaction mode as <name>_tx. Sets PGBOUNCER_PORT.
start_pgbouncer() {
  local dir=$WORK/pgbouncer
  mkdir -p "$dir"
  PGBOUNCER_PORT=$(free_port)
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
$BENCH_DB = host=$PG_HOST port=$PG_PORT dbname=$BENCH_DB user=$PG_USER
${BENCH_DB}_tx = host=$PG_HOST port=$PG_PORT dbname=$BENCH_DB user=$PG_USER pool_mode=transaction
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = any
pool_mode = session
max_client_conn = 200
default_pool_size = 20
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
INI
  local as_user=()
  if ((EUID == 0)); then # PgBouncer refuses to run as root
    chown -R "$PG_USER" "$dir" 2>/dev/null || chown -R postgres "$dir"
    as_user=(-u "$(stat -c %U "$dir")")
  fi
  pgbouncer "${as_user[@]}" "$dir/pgbouncer.ini" >"$dir/stdout.log" 2>&1 &
  PIDS+=($!)
  wait_for 10 psql -h 127.0.0.1 -p "$PGBOUNCER_PORT" -U "$PG_USER" -d "$BENCH_DB" -Atc 'select 1' ||
    { cat "$dir"/*.log >&2; die "pgbouncer did not start"; }
}
