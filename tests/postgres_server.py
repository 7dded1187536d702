"""A throwaway PostgreSQL cluster for the tests: `initdb` into a temp folder, `pg_ctl start`.

The `postgres_server` fixture is session-scoped: one cluster per test run, listening on a free
loopback port, stopped and removed at the end. It has two roles: the superuser `postgres` (trust,
used by the tests to set up tables) and `tiles_reader` with a password (scram-sha-256 over TCP),
which is what the source under test connects as.

Without PostgreSQL server binaries the tests skip with the reason; with the environment variable
`CI` set they fail instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

READER = "tiles_reader"
READER_PASSWORD = "Rd-s3cr3t-9f27"
DATABASE = "tiles"
SUPERUSER = "postgres"


def find_postgres_bin() -> Path | None:
    """Return the folder holding `initdb` and `pg_ctl` (newest installed version), or None."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
    )
    for initdb in reversed(candidates):
        folder = Path(initdb).parent
        if (folder / "pg_ctl").exists():
            return folder
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    """A running cluster: where it listens and how to reach it."""

    bin_dir: Path
    data_dir: Path
    host: str
    port: int

    def conninfo(
        self, dbname: str = DATABASE, user: str = SUPERUSER, password: str | None = None
    ) -> str:
        """Return a libpq connection string for `user` on `dbname` over TCP."""
        parts = [f"host={self.host}", f"port={self.port}", f"dbname={dbname}", f"user={user}"]
        if password is not None:
            parts.append(f"password={password}")
        return " ".join(parts)

    def connect(self, dbname: str = DATABASE, autocommit: bool = True):  # -> psycopg.Connection
        """Return a superuser connection (for setting up tables)."""
        import psycopg

        return psycopg.connect(self.conninfo(dbname), autocommit=autocommit)

    def input_block(self, table: str, **extra: object) -> dict[str, object]:
        """Return an `input:` mapping that reads `table` as the password-protected reader."""
        return {
            "host": self.host,
            "port": self.port,
            "database": DATABASE,
            "user": READER,
            "password": READER_PASSWORD,
            "table": table,
            **extra,
        }


def _as_cluster_owner(command: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; run them as the `postgres` system user then.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def _run(command: list[str]) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({completed.returncode}): "
            f"{completed.stderr.strip() or completed.stdout.strip()}"
        )


def start_cluster(bin_dir: Path) -> PostgresServer:
    """Return a started cluster in a new temp folder (stop it with `stop_cluster`)."""
    root = Path(tempfile.mkdtemp(prefix="pbpg-"))
    data_dir = root / "data"
    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    _run(
        _as_cluster_owner(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
    )
    # The superuser is trusted; every other role must give its password over TCP.
    (data_dir / "pg_hba.conf").write_text(
        "local all all trust\n"
        f"host all {SUPERUSER} 127.0.0.1/32 trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    port = free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
        "-c fsync=off -c full_page_writes=off -c shared_buffers=32MB"
    )
    _run(
        _as_cluster_owner(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data_dir),
                "-o",
                options,
                "-l",
                str(root / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
    )
    server = PostgresServer(bin_dir=bin_dir, data_dir=data_dir, host="127.0.0.1", port=port)
    try:
        with server.connect("postgres") as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
            conn.execute(f"CREATE ROLE {READER} LOGIN PASSWORD '{READER_PASSWORD}'")
        with server.connect() as conn:
            # Full rights on the tables, so that only the READ ONLY transaction stops a write.
            conn.execute(
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO {READER}"
            )
    except Exception:
        stop_cluster(server)
        raise
    return server


def stop_cluster(server: PostgresServer) -> None:
    """Stop the cluster and remove its folder."""
    try:
        _run(
            _as_cluster_owner(
                [str(server.bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-m", "fast", "stop"]
            )
        )
    finally:
        shutil.rmtree(server.data_dir.parent, ignore_errors=True)


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture() -> Iterator[PostgresServer]:
    """Yield a running throwaway cluster; skip (fail under CI) without server binaries."""
    bin_dir = find_postgres_bin()
    reason = ""
    if bin_dir is None:
        reason = (
            "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin "
            "or on PATH; install them with .ci/postgres.sh (apt-get install postgresql)"
        )
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            reason = 'psycopg is not installed; pip install "patchbalance[postgres]"'
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so PostgreSQL tests must not skip: {reason}")
        pytest.skip(reason)
    server = start_cluster(bin_dir)
    try:
        yield server
    finally:
        stop_cluster(server)
