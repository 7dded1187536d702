#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries (initdb, pg_ctl) exist: the PostgreSQL tests start a
# throwaway cluster with them. Installs the distribution's `postgresql` package when missing.
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; then
  exit 0
fi
if command -v initdb > /dev/null && command -v pg_ctl > /dev/null; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends postgresql
# The Debian package starts a cluster of its own; the tests do not need it.
$SUDO service postgresql stop > /dev/null 2>&1 || true

compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || {
  echo "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found" >&2
  exit 1
}
