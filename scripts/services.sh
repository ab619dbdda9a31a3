# shellcheck shell=bash
# Helpers that find, start or install the services the tests use. Sourced by test.sh
# and the dev scripts.

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }
need_cmd() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing: install $2"; }
is_root() { [ "$(id -u)" = 0 ]; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq 1 "$((seconds * 2))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  die "$what did not come up within ${seconds}s"
}

APT_UPDATED=
apt_install() { # apt_install PACKAGE... (only as root)
  is_root || return 1
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ -z "$APT_UPDATED" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  if port_open 5432; then return 0; fi
  step "PostgreSQL is not answering on 127.0.0.1:5432: starting it"
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt_install postgresql postgresql-client ||
      die "PostgreSQL is not installed and this is not root: install the Debian package 'postgresql' (or point DATABASE_URL at a server)"
  fi
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$version" ] || die "PostgreSQL is installed but has no cluster in /etc/postgresql"
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  if [ -w "$hba" ] && ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    # The tests connect as postgres without a password on loopback.
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  wait_for 60 "PostgreSQL" port_open 5432
  for db in test root; do
    psql -h 127.0.0.1 -U postgres -Atc "select 1 from pg_database where datname='$db'" | grep -q 1 ||
      psql -h 127.0.0.1 -U postgres -qc "create database $db" || true
  done
}

ensure_redis() {
  if port_open 6379; then return 0; fi
  step "Redis is not answering on 127.0.0.1:6379: starting it"
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server ||
      die "Redis is not installed and this is not root: install the Debian package 'redis-server' (or point REDIS_URL at a server)"
  fi
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for 30 "Redis" port_open 6379
}

amqp_answers() {
  # The broker answers the AMQP 0-9-1 protocol header with a Connection.Start
  # method frame (type 1). An open port alone is not enough: a wedged broker
  # accepts connections and never answers them.
  timeout 10 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672 || exit 1
    printf "AMQP\x00\x00\x09\x01" >&3
    head -c 1 <&3 | od -An -tx1 | grep -q 01' >/dev/null 2>&1
}

start_rabbitmq() {
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for 120 "RabbitMQ" port_open 5672
  # The port opens before the broker accepts work; wait for the app.
  timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
  wait_for 60 "RabbitMQ (AMQP handshake)" amqp_answers
}

ensure_rabbitmq() {
  if port_open 5672; then
    if amqp_answers; then return 0; fi
    step "RabbitMQ accepts connections on 127.0.0.1:5672 but does not answer: restarting it"
    timeout 30 rabbitmqctl stop >/dev/null 2>&1 || pkill -KILL -f 'beam.smp.*-s rabbit boot' || true
    wait_for 30 "the wedged RabbitMQ to stop" bash -c '! (exec 3<>/dev/tcp/127.0.0.1/5672)'
    start_rabbitmq
    return 0
  fi
  step "RabbitMQ is not answering on 127.0.0.1:5672: starting it"
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    apt_install rabbitmq-server ||
      die "RabbitMQ is not installed and this is not root: install the Debian package 'rabbitmq-server' (or point AMQP_URL at a broker)"
  fi
  start_rabbitmq
}

ensure_smtp_tools() {
  # The distributed deployment's tests run a real SMTP server (Python's aiosmtpd).
  if python3 -c 'import aiosmtpd' >/dev/null 2>&1; then return 0; fi
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-pip ||
    die "python3 is missing: install the Debian package 'python3'"
  python3 -m pip install -q aiosmtpd >/dev/null 2>&1 ||
    python3 -m pip install -q --break-system-packages aiosmtpd >/dev/null 2>&1 ||
    apt_install python3-aiosmtpd ||
    die "aiosmtpd is missing: pip install aiosmtpd"
}

drop_stale_test_schemas() {
  # Tests create a PostgreSQL schema each (t_<uuid>, esp_run_<hex>, ...); most
  # drop theirs, some leave them for inspection. Drop what earlier runs left
  # so the catalog does not grow run after run.
  local url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  # One statement (and transaction) per schema: a single transaction would
  # run out of locks.
  psql "$url" -qAt >/dev/null 2>&1 <<'SQL' || true
SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', nspname) FROM pg_namespace
 WHERE nspname ~ '^(t|esp_m|esp_run|m|c|tpgcut|tkill)_[0-9a-f]{8,}$'
\gexec
SQL
}

drop_stale_test_keys() {
  # The distributed tests' query services cache orders in Redis under their
  # namespace (t<test>_<hex>:...); a run that died before its teardown leaves
  # them. Delete what earlier runs left.
  command -v redis-cli >/dev/null 2>&1 || return 0
  redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}" --scan --pattern 't*_????????:*' 2>/dev/null |
    grep -E '^t[a-z]+_[0-9a-f]{8}:' | xargs -r -n 500 redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}" del >/dev/null 2>&1 || true
}
