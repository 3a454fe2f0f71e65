#!/usr/bin/env bash
# Makes sure Postgres (127.0.0.1:5432, trust auth for local tests) and Redis (127.0.0.1:6379)
# are up: starts them when installed but down, installs them (Debian packages) when missing.
set -euo pipefail

port_open() {
    python3 - "$1" <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

wait_port() {
    for _ in $(seq 1 60); do
        port_open "$1" && return 0
        sleep 0.5
    done
    echo "nothing answers on 127.0.0.1:$1" >&2
    return 1
}

apt_install() {
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! port_open 5432; then
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        echo "installing PostgreSQL" >&2
        apt_install postgresql
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        # Local test databases: trust connections from this machine only.
        sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' \
            "/etc/postgresql/$version/main/pg_hba.conf"
    fi
    echo "starting PostgreSQL" >&2
    for version in $(ls /etc/postgresql); do
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    wait_port 5432
fi

# The fault tests start Redis servers of their own, so the binary is needed even where a Redis
# is already running.
if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing Redis" >&2
    apt_install redis-server
fi
if ! port_open 6379; then
    echo "starting Redis" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    wait_port 6379
fi
