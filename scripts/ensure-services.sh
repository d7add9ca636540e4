#!/usr/bin/env bash
# Start PostgreSQL and Redis on their usual local ports when they are not answering.
# Tests that need them read TRAINYARD_TEST_POSTGRES_URL / TRAINYARD_TEST_REDIS_URL
# (defaults: postgresql+psycopg://postgres@127.0.0.1:5432/test, redis://127.0.0.1:6379/0).
set -u
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
# The dashboard's browser tests drive Debian's chromium (Playwright's own browser download cannot
# work offline); under CI=true they fail rather than skip without it.
if [ ! -x /usr/bin/chromium ]; then
  echo "ensure-services: installing chromium (browser tests)"
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/ensure-chromium.log 2>&1 \
      || { echo "ensure-services: chromium install failed:"; tail -n 20 /tmp/ensure-chromium.log; }
  fi
fi
[ -x /usr/bin/chromium ] && echo "ensure-services: chromium $(/usr/bin/chromium --version 2>/dev/null | head -n1)" \
  || echo "ensure-services: chromium NOT installed (the browser tests will fail under CI)"
pg_up && echo "ensure-services: PostgreSQL up" || echo "ensure-services: PostgreSQL NOT reachable (its tests will fail)"
redis_up && echo "ensure-services: Redis up" || echo "ensure-services: Redis NOT reachable (its tests will fail)"
exit 0
