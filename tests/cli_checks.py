"""Shared by the command-line tests: run a command, the one-line error, files untouched, YAML."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from typer.testing import CliRunner

from patchbalance.cli import app

runner = CliRunner()


def run_cli(*args: object):
    """Return the result of `patchbalance ARGS` run in-process."""
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> str:
    """Return the error line of a run that exited 2 with exactly one error line holding `fragments`."""
    assert result.exit_code == 2, result.output
    # Progress and INFO lines may come first; the error itself is exactly one line.
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Return every file under `folder` with its content hash (to show nothing was written)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def write_yaml(path: Path, data: dict) -> Path:
    """Write `data` as YAML at `path` and return the path."""
    path.write_text(yaml.safe_dump(data))
    return path
