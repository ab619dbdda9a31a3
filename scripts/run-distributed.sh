#!/usr/bin/env bash
# Starts the orders system as separate processes on this machine, over the
# PostgreSQL, RabbitMQ and Redis on loopback (see DATABASE_URL, AMQP_URL,
# REDIS_URL), with an SMTP server that prints the emails (Python's aiosmtpd,
# when it is installed and ORDERS_SMTP is not set). Prints the gateway's URL;
# Ctrl-C stops everything.
#
#   scripts/run-distributed.sh                 # one process per service
#   ORDERS_REPLICAS=2 scripts/run-distributed.sh  # two of each worker
#   ORDERS_RELEASE=0 scripts/run-distributed.sh   # debug build
#   ORDERS_BUILD=0 scripts/run-distributed.sh     # use the binary already built
#   ORDERS_BUILD=0 ORDERS_BIN=/path/to/orders scripts/run-distributed.sh  # or that one
#   ORDERS_JWT_SECRET=... scripts/run-distributed.sh  # tokens signed with this secret
#
# The API requires bearer tokens: every process gets ORDERS_JWT_SECRET (a random
# one unless set), and the script prints how to mint an admin's and a
# customer's token with it.
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export ORDERS_NAMESPACE="${ORDERS_NAMESPACE:-orders}"
export RUST_LOG="${RUST_LOG:-info}"
# No transparent huge pages for mimalloc, even where the host enables them for
# every process (docs/src/operations.md, "Memory allocator").
export MIMALLOC_ALLOW_THP="${MIMALLOC_ALLOW_THP:-0}"
# The secret that signs the bearer tokens (docs/src/operations.md,
# "Authentication"); random per run unless given.
export ORDERS_JWT_SECRET="${ORDERS_JWT_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
GATEWAY="${ORDERS_GATEWAY:-127.0.0.1:8080}"
BASE_PORT="${ORDERS_BASE_PORT:-8100}"
REPLICAS="${ORDERS_REPLICAS:-1}"
LOGS="${ORDERS_LOGS:-target/distributed-logs}"
mkdir -p "$LOGS"

profile=release
if [[ "${ORDERS_RELEASE:-1}" == 0 ]]; then profile=debug; fi
if [[ "${ORDERS_BUILD:-1}" == 0 ]]; then :
elif [[ "$profile" == release ]]; then cargo build --release -p orders --bin orders; else cargo build -p orders --bin orders; fi
BIN="${ORDERS_BIN:-target/$profile/orders}"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo "stopping ${#pids[@]} processes"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM EXIT

if [[ -z "${ORDERS_SMTP:-}" ]]; then
  smtp_port=$((BASE_PORT + 99))
  if python3 -c 'import aiosmtpd' 2>/dev/null; then
    python3 -m aiosmtpd -n -l "127.0.0.1:$smtp_port" >"$LOGS/smtp.log" 2>&1 &
    pids+=($!)
    echo "SMTP server (prints every email): 127.0.0.1:$smtp_port, log $LOGS/smtp.log"
  else
    echo "warning: aiosmtpd is not installed (pip install aiosmtpd); emails will fail to send" >&2
  fi
  export ORDERS_SMTP="127.0.0.1:$smtp_port"
fi

port=$BASE_PORT
declare -A urls
start() { # service listen-port
  local service=$1 p=$2 pool=8
  case $service in inventory) pool=12 ;; payment | notification | relay) pool=4 ;; esac
  "$BIN" serve --services "$service" --listen "127.0.0.1:$p" --pg-pool "$pool" >"$LOGS/$service-$p.log" 2>&1 &
  pids+=($!)
  echo "  $service (pid $!) on 127.0.0.1:$p, log $LOGS/$service-$p.log"
}
echo "starting the services:"
for service in order inventory payment notification query; do
  for ((i = 0; i < REPLICAS; i++)); do
    start "$service" "$port"
    urls[$service]="${urls[$service]:+${urls[$service]},}http://127.0.0.1:$port"
    port=$((port + 1))
  done
done
start relay "$port"
export ORDERS_ORDER_URL="${urls[order]}" ORDERS_INVENTORY_URL="${urls[inventory]}" ORDERS_QUERY_URL="${urls[query]}"
"$BIN" serve --services gateway --listen "$GATEWAY" >"$LOGS/gateway.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 120); do
  if curl -fsS "http://$GATEWAY/health" >/dev/null 2>&1; then break; fi
  sleep 0.5
done
echo
echo "gateway: http://$GATEWAY   (health: curl http://$GATEWAY/health; metrics of every process: curl http://$GATEWAY/metrics)"
echo "bearer tokens are required on /api; mint one with this run's secret:"
echo "  export ORDERS_JWT_SECRET=$ORDERS_JWT_SECRET"
echo "  ADMIN=\$($BIN token --role admin)"
echo "  ADA=\$($BIN token --role customer --email ada@example.com --ttl 8h)"
echo "  curl -H \"authorization: Bearer \$ADMIN\" http://$GATEWAY/api/stats"
echo "load: cargo run --release -p orders-load -- --target http://$GATEWAY --token \"\$ADMIN\" --orders 5000 --concurrency 64"
echo "Ctrl-C stops everything."
wait -n "${pids[@]}" || true
echo "a process exited; see $LOGS" >&2
