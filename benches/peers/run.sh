#!/usr/bin/env bash
# Every es-postgres benchmark in one session against one database:
# the machine (cores, memory, PostgreSQL version, pg_test_fsync rate), the
# server's own limit (raw-limit.sh, pgbench), the store bench (es-postgres vs
# raw INSERTs through sqlx) and the peer bench (es-postgres + Repository vs
# postgres-es + cqrs-es).
#
#   benches/peers/run.sh                  # ~4 minutes
#   BENCH_SECS=6 RAW_SECS=8 benches/peers/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
RAW_LIMIT=${RAW_LIMIT:-$(pwd)/../shared/bench/raw-limit.sh}
export BENCH_SECS=${BENCH_SECS:-3}

echo "## machine"
if ! psql "$URL" -Atc 'select 1' >/dev/null; then
  echo "PostgreSQL at $URL does not answer (or has no free connection slot)" >&2
  exit 1
fi
echo "cores: $(nproc); memory: $(free -g | awk '/^Mem:/ {print $2}') GiB; load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "postgres: $(psql "$URL" -Atc 'show server_version')"
FSYNC=$(ls /usr/lib/postgresql/*/bin/pg_test_fsync 2>/dev/null | tail -1 || true)
if [ -n "$FSYNC" ]; then
  tmp=$(mktemp -d)
  echo "pg_test_fsync (fdatasync, one 8kB write): $("$FSYNC" -s 2 -f "$tmp/f" | awk '$1 == "fdatasync" {print $2, $3; exit}')"
  rm -rf "$tmp"
fi

echo
echo "## raw-limit.sh (pgbench)"
if [ -x "$RAW_LIMIT" ] || [ -f "$RAW_LIMIT" ]; then
  bash "$RAW_LIMIT" "$URL" "${RAW_SECS:-5}"
else
  echo "(raw-limit.sh not found at $RAW_LIMIT)"
fi

echo
echo "## es-postgres store bench (cargo bench -p es-postgres --bench store)"
cargo bench -q -p es-postgres --bench store

echo
echo "## peers (cargo run --release --manifest-path benches/peers/Cargo.toml)"
cargo run -q --release --manifest-path benches/peers/Cargo.toml
