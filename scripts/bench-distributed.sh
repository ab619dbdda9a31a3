#!/usr/bin/env bash
# Measures the distributed deployment (scripts/run-distributed.sh, each run in
# a namespace of its own) under the load generator over HTTP, and prints per
# completed order:
#
#   - CPU time by component, from /proc before and after: PostgreSQL (the
#     postmaster and every backend, live or exited), RabbitMQ (the broker's
#     beam.smp and its children), the deployment's orders processes, its SMTP test
#     server (aiosmtpd) and Redis; the total with and without the SMTP server
#   - PostgreSQL transactions (pg_stat_database.xact_commit of the database:
#     every client's, so run nothing else meanwhile) and, when the
#     pg_stat_statements extension is usable, statements and the top 10 by calls
#   - broker publishes and deliveries (es-rabbit's counters, from every
#     process's /metrics)
#
# for a closed-loop run at saturation (BENCH_ORDERS orders, BENCH_CONCURRENCY
# clients), then the latency percentiles of open-loop runs at fixed rates
# (BENCH_OPEN_RATES: orders/s, or a percentage of the saturation throughput).
# With BENCH_RAW=1 (the default) it also runs the raw pipeline baseline
# (benches/raw-pipeline: the same number of broker hops and commits with raw
# lapin and sqlx) and prints the throughput as a ratio to it.
#
#   scripts/bench-distributed.sh                                  # 2,000 orders, 128 clients
#   BENCH_ORDERS=300 BENCH_OPEN_SECS=5 scripts/bench-distributed.sh   # a quick one
#   ORDERS_BIN=/path/new/orders ORDERS_BIN_BASE=/path/old/orders BENCH_ROUNDS=3 \
#     scripts/bench-distributed.sh                                # old, new, old, new, ...
#
# Two binaries run alternated (base, new, base, new, ...), each run in a
# fresh namespace, and the summary has one column per binary (medians over
# BENCH_ROUNDS): the host's speed drifts, so only figures measured side by
# side compare.
#
# Settings (environment):
#   ORDERS_BIN, ORDERS_BIN_BASE   the binaries (default target/release/orders; no base)
#   ORDERS_LOAD_BIN               the load generator (default target/release/orders-load)
#   BENCH_ROUNDS                  rounds of each binary (default 1)
#   BENCH_ORDERS, BENCH_CONCURRENCY   the closed loop (default 2000 at 128)
#   BENCH_OPEN_RATES              open-loop rates (default "10 50% 80%"; "" for none)
#   BENCH_OPEN_SECS               seconds of each open-loop run (default 20) ...
#   BENCH_OPEN_ORDERS             ... or this many orders each
#   BENCH_OPEN_CONCURRENCY        open-loop clients (default 256)
#   BENCH_PRODUCTS                products the load spreads over (default 100)
#   BENCH_IDLE_SECS               the idle window measured first (default 10)
#   BENCH_SETTLE_SECS             wait after each load, for PostgreSQL's statistics (default 11)
#   BENCH_RAW, BENCH_RAW_HOPS, BENCH_RAW_COMMITS   the raw baseline, after each round
#                                 (default 1, 10, 8), at BENCH_CONCURRENCY orders in flight
#   BENCH_RAW_ORDERS              its orders (default BENCH_ORDERS)
#   BENCH_RAW_BIN                 its binary (default: built from benches/raw-pipeline)
#   DATABASE_URL, AMQP_URL, REDIS_URL, ORDERS_GATEWAY, ORDERS_NAMESPACE (a prefix)
#
# PostgreSQL updates pg_stat_database from each backend at most once a second,
# and up to 10 s late once a backend is idle: every snapshot after a load
# waits BENCH_SETTLE_SECS first. The background work of the idle deployment
# (gauges, relay polls) during that wait is taken off at the rate measured in
# the idle window; so is the load generator's creation of its products
# (measured once per run with --orders 0).
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
BIN="${ORDERS_BIN:-target/release/orders}"
BASE_BIN="${ORDERS_BIN_BASE:-}"
LOAD_BIN="${ORDERS_LOAD_BIN:-target/release/orders-load}"
PREFIX="${ORDERS_NAMESPACE:-bench$$}"
ROUNDS="${BENCH_ROUNDS:-1}"
ORDERS="${BENCH_ORDERS:-2000}"
CONCURRENCY="${BENCH_CONCURRENCY:-128}"
OPEN_RATES="${BENCH_OPEN_RATES-10 50% 80%}"
OPEN_SECS="${BENCH_OPEN_SECS:-20}"
OPEN_ORDERS="${BENCH_OPEN_ORDERS:-}"
OPEN_CONCURRENCY="${BENCH_OPEN_CONCURRENCY:-256}"
PRODUCTS="${BENCH_PRODUCTS:-100}"
IDLE_SECS="${BENCH_IDLE_SECS:-10}"
SETTLE_SECS="${BENCH_SETTLE_SECS:-11}"
RAW="${BENCH_RAW:-1}"
RAW_HOPS="${BENCH_RAW_HOPS:-10}"
RAW_COMMITS="${BENCH_RAW_COMMITS:-8}"
RAW_ORDERS="${BENCH_RAW_ORDERS:-$ORDERS}"
GATEWAY="${ORDERS_GATEWAY:-127.0.0.1:8080}"
LOGS_DIR="${ORDERS_LOGS:-target/bench-distributed-logs}"
HELPER="scripts/bench-distributed.py"

die() { echo "error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing: $2"; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") >/dev/null 2>&1; }

# Fails when a port the deployment listens on is taken: the health check and
# the metrics would reach another deployment.
ports_free() {
  local base=${ORDERS_BASE_PORT:-8100} replicas=${ORDERS_REPLICAS:-1} p
  port_open "${GATEWAY%:*}" "${GATEWAY#*:}" &&
    die "something already listens on $GATEWAY (another deployment?): stop it or set ORDERS_GATEWAY"
  for p in $(seq "$base" $((base + 5 * replicas))) $((base + 99)); do
    port_open 127.0.0.1 "$p" &&
      die "something already listens on 127.0.0.1:$p (another deployment?): stop it or set ORDERS_BASE_PORT"
  done
  return 0
}

# ---------------------------------------------------------------- checks
need python3 "install python3"
need psql "install the PostgreSQL client (Debian: postgresql-client)"
need curl "install curl"
need redis-cli "install redis-tools (it also cleans up the run's keys)"
command -v rabbitmqctl >/dev/null 2>&1 ||
  echo "warning: rabbitmqctl is missing: the runs' queues are left to expire (30 min)" >&2
psql -X -At "$DATABASE_URL" -c 'SELECT 1' >/dev/null 2>&1 ||
  die "PostgreSQL does not answer at $DATABASE_URL (scripts/services.sh has ensure_postgres)"
amqp_host=$(python3 -c 'import sys, urllib.parse as u; p = u.urlparse(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or 5672)' "$AMQP_URL")
port_open "${amqp_host% *}" "${amqp_host#* }" || die "RabbitMQ does not answer at ${amqp_host/ /:} ($AMQP_URL)"
redis-cli -u "$REDIS_URL" ping 2>/dev/null | grep -q PONG || die "Redis does not answer at $REDIS_URL"
if [[ -z "${ORDERS_SMTP:-}" ]]; then
  python3 -c 'import aiosmtpd' 2>/dev/null ||
    die "aiosmtpd is not installed (pip install aiosmtpd): without the SMTP server every email fails and the figures are wrong"
fi
if [[ ! -x "$LOAD_BIN" ]]; then
  [[ -n "${ORDERS_LOAD_BIN:-}" ]] && die "ORDERS_LOAD_BIN=$LOAD_BIN is not an executable"
  cargo build --release -p orders-load --bin orders-load
fi
if [[ ! -x "$BIN" ]]; then
  [[ -n "${ORDERS_BIN:-}" ]] && die "ORDERS_BIN=$BIN is not an executable"
  cargo build --release -p orders --bin orders
fi
[[ -z "$BASE_BIN" || -x "$BASE_BIN" ]] || die "ORDERS_BIN_BASE=$BASE_BIN is not an executable"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive number"
ports_free

# pg_stat_statements counts statements only when the server preloads it and
# the database has the extension; neither is changed here.
export BENCH_PGSS=0 BENCH_PGSS_WHY=""
pgss_preloaded=$(psql -X -At "$DATABASE_URL" -c "SELECT current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%'")
pgss_created=$(psql -X -At "$DATABASE_URL" -c "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'")
if [[ "$pgss_preloaded" != t ]]; then
  BENCH_PGSS_WHY="pg_stat_statements is not in shared_preload_libraries"
elif [[ "$pgss_created" == 0 ]]; then
  BENCH_PGSS_WHY="the extension is not created in this database (CREATE EXTENSION pg_stat_statements)"
elif psql -X -At "$DATABASE_URL" -c 'SELECT 1 FROM pg_stat_statements LIMIT 1' >/dev/null 2>&1; then
  BENCH_PGSS=1
else
  BENCH_PGSS_WHY="pg_stat_statements cannot be read"
fi

WORK=$(mktemp -d)
export BENCH_RESULTS="$WORK/results.tsv"
: >"$BENCH_RESULTS"
mkdir -p "$LOGS_DIR"

# ---------------------------------------------------------------- one run
deployment=""
NS=""
stop_deployment() {
  if [[ -n "$deployment" ]]; then
    kill -INT -- "-$deployment" 2>/dev/null || true
    wait "$deployment" 2>/dev/null || true
    deployment=""
  fi
}

clean_namespace() { # namespace
  local ns=$1 schema queue
  for schema in $(psql -X -At "$DATABASE_URL" -c "SELECT nspname FROM pg_namespace WHERE nspname LIKE '${ns}\_%'"); do
    psql -X -q "$DATABASE_URL" -c "DROP SCHEMA \"$schema\" CASCADE" >/dev/null 2>&1 || true
  done
  if command -v rabbitmqctl >/dev/null 2>&1; then
    for queue in $(rabbitmqctl list_queues name -q 2>/dev/null | grep "^$ns\." || true); do
      rabbitmqctl delete_queue "$queue" >/dev/null 2>&1 || true
    done
  fi
  redis-cli -u "$REDIS_URL" --scan --pattern "$ns:*" | xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null || true
}

cleanup() {
  trap - INT TERM EXIT
  stop_deployment
  [[ -n "$NS" ]] && clean_namespace "$NS"
  rm -rf "$WORK"
}
trap cleanup INT TERM EXIT

snap() { python3 "$HELPER" snap "$WORK/$1.json"; }

# Waits for the work orders set off after they completed, then for
# PostgreSQL's statistics.
settle() {
  python3 "$HELPER" quiet
  sleep "$SETTLE_SECS"
}

# load NAME ORDERS CONCURRENCY [RATE]: one orders-load run, its CPU time
# recorded, its report in $WORK/NAME.out.
load() {
  local name=$1 orders=$2 clients=$3 rate=()
  [[ -n "${4:-}" ]] && rate=(--rate "$4")
  local token=()
  [[ -n "${TOKEN:-}" ]] && token=(--token "$TOKEN")
  python3 "$HELPER" run "$WORK/$name.rusage" "$LOAD_BIN" --target "http://$GATEWAY" \
    --orders "$orders" --concurrency "$clients" --products "$PRODUCTS" "${rate[@]}" "${token[@]}" \
    >"$WORK/$name.out" || die "orders-load failed ($name); logs in $LOGS_DIR/$NS*"
}

run_one() { # label binary round
  local label=$1 bin=$2 round=$3
  ports_free
  NS="${PREFIX}_${round}_${label}"
  local logs="$LOGS_DIR/$NS"
  export BENCH_LABEL=$label BENCH_ROUND=$round
  # The API wants a bearer token from a binary that checks them: an admin
  # token signed with this run's secret (none for a binary without tokens).
  export ORDERS_JWT_SECRET="${ORDERS_JWT_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
  TOKEN=$("$bin" token --role admin --ttl 24h 2>/dev/null || true)
  echo
  echo "=== round $round: $label ($bin), namespace $NS"
  ORDERS_NAMESPACE="$NS" ORDERS_BUILD=0 ORDERS_BIN="$bin" ORDERS_LOGS="$logs" \
    ORDERS_PREFETCH="${ORDERS_PREFETCH:-64}" ORDERS_QUEUE_EXPIRES_SECS="${ORDERS_QUEUE_EXPIRES_SECS:-1800}" \
    RUST_LOG="${RUST_LOG:-warn}" ORDERS_GATEWAY="$GATEWAY" \
    setsid scripts/run-distributed.sh >"$logs.log" 2>&1 &
  deployment=$!
  for _ in $(seq 1 120); do
    if curl -fsS "http://$GATEWAY/health" >/dev/null 2>&1; then break; fi
    kill -0 "$deployment" 2>/dev/null || die "the deployment exited; see $logs.log and $logs/"
    sleep 0.5
  done
  curl -fsS "http://$GATEWAY/health" >/dev/null || die "the deployment did not start; see $logs.log"
  # The deployment's processes (its process group) and their ports.
  export BENCH_PGID=$deployment
  BENCH_ORDERS_EXE=$(realpath "$bin")
  export BENCH_ORDERS_EXE
  BENCH_PORTS=$(sed -n 's/^  [a-z]* (pid [0-9]*) on 127\.0\.0\.1:\([0-9]*\),.*/\1/p' "$logs.log" | tr '\n' ' ')
  export BENCH_PORTS
  [[ -n "$BENCH_PORTS" ]] || die "no service ports in $logs.log"
  if grep -q "aiosmtpd is not installed" "$logs.log"; then die "the deployment has no SMTP server; see $logs.log"; fi
  sleep 2
  settle

  snap idle0
  sleep "$IDLE_SECS"
  snap idle1
  BENCH_DELTA_OUT="$WORK/idle.delta" python3 "$HELPER" phase idle idle "$WORK/idle0.json" "$WORK/idle1.json" "" ""

  snap setup0
  load setup 0 1
  settle
  snap setup1
  BENCH_DELTA_OUT="$WORK/setup.delta" python3 "$HELPER" phase setup setup \
    "$WORK/setup0.json" "$WORK/setup1.json" "$WORK/setup.out" "$WORK/setup.rusage" "" "$WORK/idle.delta"

  echo "--- closed loop: $ORDERS orders, $CONCURRENCY clients"
  snap closed0
  load closed "$ORDERS" "$CONCURRENCY"
  sed 's/^/  /' "$WORK/closed.out"
  settle
  snap closed1
  python3 "$HELPER" phase "closed loop" closed "$WORK/closed0.json" "$WORK/closed1.json" \
    "$WORK/closed.out" "$WORK/closed.rusage" "$WORK/setup.delta" "$WORK/idle.delta"
  local max
  max=$(sed -n 's/^completed\/s: *\([0-9.]*\).*/\1/p' "$WORK/closed.out")

  local spec rate orders i=0
  for spec in $OPEN_RATES; do
    i=$((i + 1))
    if [[ "$spec" == *% ]]; then
      rate=$(python3 -c 'import sys; print(max(1, round(float(sys.argv[1]) * float(sys.argv[2]) / 100)))' "$max" "${spec%\%}")
    else
      rate=$spec
    fi
    orders=${OPEN_ORDERS:-$(python3 -c 'import sys; print(max(1, round(float(sys.argv[1]) * float(sys.argv[2]))))' "$rate" "$OPEN_SECS")}
    echo "--- open loop at $rate orders/s ($spec): $orders orders"
    snap "open${i}_0"
    load "open$i" "$orders" "$OPEN_CONCURRENCY" "$rate"
    settle
    snap "open${i}_1"
    python3 "$HELPER" phase "open loop $spec" open "$WORK/open${i}_0.json" "$WORK/open${i}_1.json" \
      "$WORK/open$i.out" "$WORK/open$i.rusage" "$WORK/setup.delta" "$WORK/idle.delta"
  done

  stop_deployment
  clean_namespace "$NS"
  NS=""
}

# ---------------------------------------------------------------- the raw baseline
RAW_BIN="${BENCH_RAW_BIN:-${CARGO_TARGET_DIR:-benches/raw-pipeline/target}/release/es-raw-pipeline-bench}"
run_raw() { # round
  echo
  echo "=== round $1: raw baseline: $RAW_HOPS hops, $RAW_COMMITS commits, $RAW_ORDERS orders, $CONCURRENCY in flight"
  export BENCH_PGID=0 BENCH_PORTS="" BENCH_ORDERS_EXE="" BENCH_LABEL=raw BENCH_ROUND=$1
  snap raw0
  python3 "$HELPER" run "$WORK/raw.rusage" "$RAW_BIN" --hops "$RAW_HOPS" --commits "$RAW_COMMITS" \
    --orders "$RAW_ORDERS" --concurrency "$CONCURRENCY" >"$WORK/raw.out" || {
    cat "$WORK/raw.out"
    die "the raw baseline failed"
  }
  sleep "$SETTLE_SECS"
  snap raw1
  sed 's/^/  /' "$WORK/raw.out"
  python3 "$HELPER" raw "$WORK/raw0.json" "$WORK/raw1.json" "$WORK/raw.out" "$WORK/raw.rusage"
}

# ---------------------------------------------------------------- main
others=$(psql -X -At "$DATABASE_URL" -c "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); PostgreSQL $(psql -X -At "$DATABASE_URL" -c 'SHOW server_version')"
echo "binaries: ${BASE_BIN:+base $BASE_BIN, }new $BIN; load generator $LOAD_BIN"
if [[ "$BENCH_PGSS" == 1 ]]; then
  echo "pg_stat_statements: available"
else
  echo "pg_stat_statements: unavailable ($BENCH_PGSS_WHY)"
fi
if [[ "$others" != 0 ]]; then
  echo "warning: $others other client connections to this database: their transactions count too"
fi

if [[ "$RAW" == 1 && -z "${BENCH_RAW_BIN:-}" ]]; then
  cargo build -q --release --manifest-path benches/raw-pipeline/Cargo.toml ||
    die "building benches/raw-pipeline failed"
fi
for round in $(seq 1 "$ROUNDS"); do
  if [[ -n "$BASE_BIN" ]]; then run_one base "$BASE_BIN" "$round"; fi
  run_one new "$BIN" "$round"
  if [[ "$RAW" == 1 ]]; then run_raw "$round"; fi
done

echo
echo "=== summary (per completed order unless stated)"
python3 "$HELPER" summary "$BENCH_RESULTS"
