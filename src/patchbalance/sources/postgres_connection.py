"""Connecting to PostgreSQL: settings from `input` (or a DSN) and the environment, one-line errors.

The password never appears in a message: messages are built from host, port, user and
database, and PostgreSQL's own texts are scrubbed (`config.secrets.scrub`).
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from patchbalance.config import InputConfig
from patchbalance.config.secrets import scrub
from patchbalance.errors import ConfigError, InputError, MissingDependencyError


@dataclass(frozen=True)
class Target:
    """Where the source connects, for messages: never holds the password."""

    host: str
    port: str
    user: str
    database: str

    @property
    def address(self) -> str:
        """Return `host:port` (the socket folder stands for the host on local connections)."""
        return f"{self.host}:{self.port}"


def _psycopg():  # -> module
    try:
        import psycopg
    except ImportError as exc:
        raise MissingDependencyError(
            "psycopg 3 (the PostgreSQL driver)", "postgres", '"psycopg[binary]"'
        ) from exc
    return psycopg


def _secrets(source: InputConfig, conninfo_password: str | None) -> list[str]:
    values = [source.password, conninfo_password, os.environ.get("PGPASSWORD")]
    return sorted({v for v in values if v}, key=len, reverse=True)


def connection_settings(source: InputConfig) -> tuple[str, Target, list[str]]:
    """Return (libpq connection string, target for messages, secret values to scrub).

    Either `dsn` or the keys host, port, database and user say where to connect; giving both
    is an error naming the keys, never a silent override. `password` may come with a dsn that
    holds none. Empty values count as not given, so `${oc.env:PGPASSWORD,""}` falls back to
    libpq's own environment and `~/.pgpass`.
    """
    psycopg = _psycopg()
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    keys = {
        "host": source.host,
        "port": source.port,
        "dbname": source.database,
        "user": source.user,
        "password": source.password,
    }
    given = {key: str(value) for key, value in keys.items() if value not in (None, "")}
    try:
        base = conninfo_to_dict(source.dsn or "")
    except psycopg.ProgrammingError:
        # psycopg's text can quote pieces of the string, password included: never echo it.
        raise InputError(
            "input.dsn is not a valid PostgreSQL connection string; write key=value pairs "
            "(host=... port=... dbname=... user=...) or a postgresql://user@host:port/database URI"
        ) from None
    _check_dsn_conflicts(source, given, base)
    settings = {**base, **given}
    settings.setdefault("connect_timeout", "10")
    settings.setdefault("application_name", "patchbalance")
    conninfo = make_conninfo("", **settings)

    def pick(key: str, env: str, default: str) -> str:
        value = settings.get(key) or os.environ.get(env)
        return str(value) if value else default

    user = pick("user", "PGUSER", _os_user())
    target = Target(
        host=pick("host", "PGHOST", "localhost"),
        port=pick("port", "PGPORT", "5432"),
        user=user,
        database=pick("dbname", "PGDATABASE", user),
    )
    return conninfo, target, _secrets(source, settings.get("password"))


DSN_KEYS = {"host": "host", "port": "port", "dbname": "database", "user": "user"}


def _check_dsn_conflicts(source: InputConfig, given: dict[str, str], base: dict[str, Any]) -> None:
    if source.dsn in (None, ""):
        return
    conflicting = [f"input.{name}" for key, name in DSN_KEYS.items() if key in given]
    if "password" in given and base.get("password"):
        conflicting.append("input.password")
    if conflicting:
        raise ConfigError(
            f"input.dsn and {', '.join(conflicting)} both say where to connect; give either "
            "the dsn or the separate keys (host, port, database, user, password), not both"
        )


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "the current user"


@contextmanager
def read_only_session(conn: Any) -> Iterator[Any]:
    """Yield `conn` for reading only; at the end roll back and close it, never commit.

    READ ONLY stops plain writes, but PostgreSQL still allows large-object functions
    (`lo_create`, `lo_unlink`) in such a transaction, and a `where_clause` is SQL by design:
    only a rollback guarantees that nothing a query did is kept.
    """
    conn.read_only = True
    try:
        yield conn
    finally:
        # A lost connection cannot roll back; closing it discards the transaction all the same.
        with suppress(_psycopg().Error):
            conn.rollback()
        conn.close()


@contextmanager
def connect(conninfo: str, target: Target, secrets: list[str]) -> Iterator[Any]:
    """Yield a connection for reading (READ ONLY, rolled back at the end), or raise `InputError`."""
    psycopg = _psycopg()
    try:
        conn = psycopg.connect(conninfo)
    except psycopg.OperationalError as exc:
        raise InputError(_connect_message(str(exc), target, secrets)) from None
    except psycopg.Error as exc:
        raise InputError(
            f"cannot connect to PostgreSQL at {target.address}: {scrub(str(exc), secrets)}"
        ) from None
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    with read_only_session(conn) as session:
        yield session


# libpq's texts for a setting it cannot use (an unknown option, a value outside its choices).
INVALID_OPTION = re.compile(r"invalid [\w ]*value|invalid connection option")


def _connect_message(text: str, target: Target, secrets: list[str]) -> str:
    lowered = text.lower()
    who = f"user '{target.user}' on database '{target.database}' at {target.address}"
    if "no password supplied" in lowered:
        return (
            f"PostgreSQL asks {who} for a password and none was given; set input.password "
            "(e.g. ${oc.env:PGPASSWORD}), or PGPASSWORD or ~/.pgpass"
        )
    if "authentication failed" in lowered or re.search(r'role ".*" does not exist', lowered):
        return (
            f"PostgreSQL authentication failed for {who}; check input.user and the password "
            "(input.password, PGPASSWORD or ~/.pgpass)"
        )
    if "pg_hba.conf" in lowered:
        return (
            f"PostgreSQL at {target.address} does not accept connections for user "
            f"'{target.user}' to database '{target.database}' from this host (pg_hba.conf)"
        )
    if lowered.startswith("connection is bad:") or INVALID_OPTION.search(lowered):
        # libpq refused the settings before any network traffic: its reason is the fix.
        reason = text.strip().splitlines()[0].split(":", 1)[-1].strip()
        return (
            f"PostgreSQL (libpq) rejects the connection settings: {scrub(reason, secrets)}; "
            "fix that option in input.dsn"
        )
    if re.search(r'database ".*" does not exist', lowered):
        return (
            f"PostgreSQL database '{target.database}' does not exist on {target.address}; "
            "check input.database"
        )
    first_line = text.strip().splitlines()[0] if text.strip() else "no answer"
    reason = first_line.rsplit(" failed: ", 1)[-1]
    return (
        f"cannot reach the PostgreSQL server at {target.address}: {scrub(reason, secrets)}; "
        "check input.host and input.port, and that the server is running"
    )
