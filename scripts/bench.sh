#!/usr/bin/env bash
# Every benchmark of the workspace, in one session on this machine. Figures go to
# docs/benchmarks.md by hand, with the machine and the command.
#
#   scripts/bench.sh            # everything (about 10 minutes)
#   scripts/bench.sh postgres   # one part: memory | postgres | rabbit | projections
#
# The PostgreSQL part runs benches/peers/run.sh: the machine (cores, PostgreSQL
# version, pg_test_fsync rate), the server's own limit (../shared/bench/raw-limit.sh),
# the store bench against raw INSERTs, and the postgres-es + cqrs-es comparison (a
# package of its own that the CI test build never compiles).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres
ensure_rabbitmq
export RAW_LIMIT=${RAW_LIMIT:-$(pwd)/../shared/bench/raw-limit.sh}
part=${1:-all}

if [ "$part" = all ] || [ "$part" = memory ]; then
  step "es-core: the in-memory store"
  cargo bench -q --bench memory_store
fi
if [ "$part" = all ] || [ "$part" = postgres ]; then
  step "es-postgres: the store, raw SQL, the server's limit and postgres-es"
  bash benches/peers/run.sh
fi
if [ "$part" = all ] || [ "$part" = rabbit ]; then
  step "es-rabbit: confirmed publish vs raw lapin, consume, relay"
  cargo bench -q -p es-rabbit --bench rabbit
  cargo bench -q -p es-tests --bench relay
fi
if [ "$part" = all ] || [ "$part" = projections ]; then
  step "es-projections: throughput and a 1,000,000-event rebuild"
  cargo bench -q -p es-projections --bench projection
fi
