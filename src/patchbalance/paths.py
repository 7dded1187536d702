"""The one rule for paths in configurations and tables: `~` expanded, relative to a folder."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_path(path: str | os.PathLike[str], base_dir: str | os.PathLike[str]) -> Path:
    """Return `path` with `~` expanded, joined to `base_dir` when relative, and normalised.

    Args:
        path: a path as a user wrote it (in a YAML file, a `--set` override or a table).
        base_dir: the folder a relative `path` is relative to (a configuration file's folder,
            or a table's).

    Returns:
        The absolute, normalised path (`..` and `.` collapsed, links not followed).
    """
    expanded = Path(os.path.expanduser(os.fspath(path)))
    return Path(os.path.normpath(expanded if expanded.is_absolute() else Path(base_dir) / expanded))
