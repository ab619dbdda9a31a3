#!/usr/bin/env bash
# Measures the distributed deployment: starts it (scripts/run-distributed.sh, in
# its own namespace), drives it with the load generator over HTTP, prints the
# load report and PostgreSQL transactions per order, then stops it and removes
# what the namespace left (schemas, queues, Redis keys).
#
#   scripts/bench-distributed.sh                          # 2,000 orders, 128 clients
#   BENCH_ORDERS=4000 BENCH_CONCURRENCY=64 scripts/bench-distributed.sh
#   ORDERS_BIN=/path/to/orders scripts/bench-distributed.sh   # another build
#   BENCH_RATE=50 scripts/bench-distributed.sh             # open loop, 50 orders/s
#
# Run two builds one after the other (ORDERS_BIN) to compare them: the host's
# speed drifts, so only figures measured side by side compare.
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
BIN="${ORDERS_BIN:-target/release/orders}"
LOAD_BIN="${ORDERS_LOAD_BIN:-target/release/orders-load}"
NS="${ORDERS_NAMESPACE:-bench$$}"
ORDERS="${BENCH_ORDERS:-2000}"
CONCURRENCY="${BENCH_CONCURRENCY:-128}"
GATEWAY="${ORDERS_GATEWAY:-127.0.0.1:8080}"
LOGS="${ORDERS_LOGS:-target/bench-distributed-logs/$NS}"
[[ -x "$BIN" && -x "$LOAD_BIN" ]] || cargo build --release -p orders --bin orders -p orders-load
mkdir -p "$(dirname "$LOGS")"

xacts() { psql -At "$DATABASE_URL" -c "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"; }

cleanup() {
  trap - INT TERM EXIT
  if [[ -n "${deployment:-}" ]]; then
    kill -INT -- "-$deployment" 2>/dev/null || true
    wait "$deployment" 2>/dev/null || true
  fi
  for schema in $(psql -At "$DATABASE_URL" -c "SELECT nspname FROM pg_namespace WHERE nspname LIKE '${NS}\_%'"); do
    psql -q "$DATABASE_URL" -c "DROP SCHEMA \"$schema\" CASCADE" >/dev/null 2>&1 || true
  done
  if command -v rabbitmqctl >/dev/null 2>&1; then
    for queue in $(rabbitmqctl list_queues name -q 2>/dev/null | grep "^$NS\." || true); do
      rabbitmqctl delete_queue "$queue" >/dev/null 2>&1 || true
    done
  fi
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli --scan --pattern "$NS:*" | xargs -r -n 500 redis-cli del >/dev/null || true
  fi
}
trap cleanup INT TERM EXIT

ORDERS_NAMESPACE="$NS" ORDERS_BUILD=0 ORDERS_BIN="$BIN" ORDERS_LOGS="$LOGS" \
  ORDERS_PREFETCH="${ORDERS_PREFETCH:-64}" ORDERS_QUEUE_EXPIRES_SECS="${ORDERS_QUEUE_EXPIRES_SECS:-1800}" \
  RUST_LOG="${RUST_LOG:-warn}" ORDERS_GATEWAY="$GATEWAY" \
  setsid scripts/run-distributed.sh >"$LOGS.log" 2>&1 &
deployment=$!
for _ in $(seq 1 120); do
  if curl -fsS "http://$GATEWAY/health" >/dev/null 2>&1; then break; fi
  sleep 0.5
done
curl -fsS "http://$GATEWAY/health" >/dev/null || { echo "the deployment did not start; see $LOGS.log" >&2; exit 1; }
sleep 2

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); binary $BIN; namespace $NS"
rate=()
[[ -n "${BENCH_RATE:-}" ]] && rate=(--rate "$BENCH_RATE")
before=$(xacts)
"$LOAD_BIN" --target "http://$GATEWAY" --orders "$ORDERS" --concurrency "$CONCURRENCY" "${rate[@]}"
after=$(xacts)
echo "PostgreSQL transactions per order: $(( (after - before) / ORDERS ))"
