#!/usr/bin/env bash
# Builds the raw pipeline baseline in release and runs it: the essential work
# of an order (H broker hops with publisher confirms through quorum queues, C
# single-row PostgreSQL commits) with raw lapin and sqlx. Arguments go to the
# program (see --help); DATABASE_URL and AMQP_URL say where.
#
#   benches/raw-pipeline/run.sh                                   # 10 hops, 8 commits
#   benches/raw-pipeline/run.sh --hops 17 --commits 20 --orders 2000 --concurrency 128
set -euo pipefail
cd "$(dirname "$0")"
cargo build -q --release --manifest-path Cargo.toml
exec "${CARGO_TARGET_DIR:-target}/release/es-raw-pipeline-bench" "$@"
