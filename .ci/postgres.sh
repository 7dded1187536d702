#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries (initdb, pg_ctl) and PostGIS exist: the PostgreSQL
# tests start a throwaway cluster with them, and the output.postgres_table tests need PostGIS
# (they fail under CI without it). Installs Debian's `postgresql` and
# `postgresql-<major>-postgis-3` packages when missing. Debian 12 has no pgvector server package,
# so the pgvector test skips.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
updated=""
install() {
  if [ -z "$updated" ]; then
    $SUDO apt-get update -q
    updated=1
  fi
  $SUDO apt-get install -y -q --no-install-recommends "$@"
}

if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; then
  install postgresql
  # The Debian package starts a cluster of its own; the tests do not need it.
  $SUDO service postgresql stop > /dev/null 2>&1 || true
fi
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || {
  echo "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found" >&2
  exit 1
}

# PostGIS for the newest server version, which is the one the tests start.
major="$(ls /usr/lib/postgresql | sort -n | tail -1)"
if [ ! -f "/usr/share/postgresql/${major}/extension/postgis.control" ]; then
  install "postgresql-${major}-postgis-3"
fi
test -f "/usr/share/postgresql/${major}/extension/postgis.control" || {
  echo "postgresql-${major}-postgis-3 installed but postgis.control is missing" >&2
  exit 1
}
