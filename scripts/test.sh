#!/usr/bin/env bash
# Brings up what the tests need (PostgreSQL, RabbitMQ, Redis on loopback) and runs
# the whole suite: rustfmt check, clippy (every feature combination of the umbrella
# crate too) and rustdoc with warnings denied, an MSRV check, every test in one build.
#
#   scripts/test.sh            # everything
#   SKIP_LINT=1 scripts/test.sh  # tests only
#
# Services: a running one is used; an installed one is started; a missing one is
# installed from Debian's packages when run as root; otherwise the script stops and
# says exactly what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

need_cmd cargo "the Rust toolchain (https://rustup.rs)"

ensure_postgres
ensure_redis
ensure_rabbitmq
ensure_smtp_tools

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

drop_stale_test_schemas
drop_stale_test_keys

if [ -z "${SKIP_LINT:-}" ]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy (warnings are errors)"
  cargo clippy --workspace --all-targets -- -D warnings
  # No workspace member enables the umbrella's features, so the run above builds
  # `es` without its re-exports of the backends: lint those too.
  step "cargo clippy -p es --all-features (warnings are errors)"
  cargo clippy -p es --all-features -- -D warnings
  # Every other feature combination of the umbrella crate: none, then each feature
  # alone (each must build without the others' re-exports), then postgres and
  # rabbit together (`es::production`, the single-active relay), then
  # OpenTelemetry alone (es-core's spans exported, no backend).
  for features in "" testing derive postgres rabbit projections projections-postgres \
    redis "postgres rabbit" otel; do
    step "cargo clippy -p es --no-default-features --features '$features' (warnings are errors)"
    cargo clippy -p es --no-default-features --features "$features" -- -D warnings
  done
  # The MSRV. Only one toolchain is installed where CI runs, so nothing builds with
  # the `rust-version` compiler itself. Instead, clippy's `incompatible_msrv` lint
  # (in the runs above, denied with the other warnings) flags any standard-library
  # API newer than `rust-version`, and this step fails when a locked dependency
  # declares a `rust-version` newer than the workspace's (see scripts/msrv-deps.py).
  step "MSRV: no locked dependency needs a newer Rust than rust-version"
  cargo metadata --format-version 1 --locked --all-features | python3 scripts/msrv-deps.py
  # es-projections has no default features and the workspace asks only for
  # postgres and redis: lint its cli feature and the example that needs it.
  step "cargo clippy -p es-projections --all-features --all-targets (warnings are errors)"
  cargo clippy -p es-projections --all-features --all-targets -- -D warnings
  step "cargo doc (warnings are errors)"
  RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
fi

step "cargo test --workspace"
cargo test --workspace --no-fail-fast -- --test-threads "${TEST_THREADS:-4}"
