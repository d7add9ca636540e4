#!/usr/bin/env bash
# Start PostgreSQL and Redis on their usual local ports when they are not answering.
# Tests that need them read TRAINYARD_TEST_POSTGRES_URL / TRAINYARD_TEST_REDIS_URL
# (defaults: postgresql+psycopg://postgres@127.0.0.1:5432/test, redis://127.0.0.1:6379/0).
# Under CI=true it first installs what the tests need and the machine lacks (Debian/Ubuntu,
# apt-get, as root or with passwordless sudo): redis-server, and PostgreSQL's server binaries that
# the fault tests run private servers with (tests/service/servers.py says what is missing). A
# PostgreSQL installed here is given what the tests expect: trust auth for postgres on loopback
# and a database `test`.
set -u
is_ci() { case "${CI:-}" in true | TRUE | True | 1 | yes) return 0 ;; esac; return 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
fresh_pg=0
if is_ci; then
  py=.venv/bin/python; [ -x "$py" ] || py=python3
  missing=$("$py" tests/service/servers.py --apt)
  if [ -n "$missing" ]; then
    if command -v apt-get >/dev/null 2>&1; then
      echo "ensure-services: CI=true, missing: $missing; installing with apt-get"
      as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing ||
        echo "ensure-services: apt-get install $missing FAILED"
      case " $missing " in *" postgresql "*) fresh_pg=1 ;; esac
    else
      echo "ensure-services: CI=true, missing: $missing, and no apt-get here: install them (their tests will fail)"
    fi
    "$py" tests/service/servers.py || echo "ensure-services: still missing after the install (the fault tests will fail under CI=true)"
  fi
fi

pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
redis_up() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }

if ! pg_up; then
  echo "ensure-services: starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if ! redis_up; then
  echo "ensure-services: starting Redis"
  if command -v redis-server >/dev/null 2>&1; then
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  fi
  for _ in $(seq 1 30); do redis_up && break; sleep 1; done
fi
if [ "$fresh_pg" = 1 ] && pg_up; then
  echo "ensure-services: configuring the new PostgreSQL (trust for postgres on loopback, database test)"
  cluster=$(ls /etc/postgresql | sort -V | tail -n1)
  hba=/etc/postgresql/$cluster/main/pg_hba.conf
  { printf 'host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust\n'; as_root cat "$hba"; } >/tmp/ty-pg_hba.conf &&
    as_root cp /tmp/ty-pg_hba.conf "$hba" && as_root pg_ctlcluster --skip-systemctl-redirect "$cluster" main reload
  as_root runuser -u postgres -- psql -q -c "CREATE DATABASE test" || true
fi
pg_up && echo "ensure-services: PostgreSQL up" || echo "ensure-services: PostgreSQL NOT reachable (its tests will fail)"
redis_up && echo "ensure-services: Redis up" || echo "ensure-services: Redis NOT reachable (its tests will fail)"
exit 0
