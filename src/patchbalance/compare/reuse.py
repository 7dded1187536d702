"""When a resumed comparison may reuse a finished build or run, and when it must redo it.

A finished build or run leaves a completion marker (`done.json`) holding a digest of the
settings that made it. The marker also records the SHA-256 of the files it finished with and
the size and modification time of the input files it read; work is reused only when the
settings are the same, its files still have those hashes, its inputs those sizes and times,
and a run's metrics parse with every IoU, precision and recall in [0, 1]. Anything else is
done again, with one log line naming the file and the reason.

Markers written before the hashes were recorded hold only the digest: such work is reused
when its files parse and its values are in range (a run only when its arm's table was reused
too, since nothing records which table it trained on).
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.atomic import file_sha256

FILES = "files"  # marker key: {file name: sha256} of the finished files
INPUTS = "inputs"  # marker key: {input path: [size, mtime_ns] or None when missing}
TABLE = "table_sha256"  # run marker key: the hash of the table the run trained on
RATE_COLUMN = re.compile(r"^(miou|iou_\d+|precision_\d+|recall_\d+)(_tau.*)?$")


def read_marker(path: Path) -> dict[str, Any] | None:
    """Return the completion marker at `path`, or None when it is missing or unreadable."""
    try:
        marker = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def input_fingerprint(paths: Mapping[str, Path]) -> dict[str, list[int] | None]:
    """Return the size and modification time (ns) of each input file (None when missing)."""
    found: dict[str, list[int] | None] = {}
    for path in sorted({str(p) for p in paths.values()}):
        try:
            info = Path(path).stat()
        except OSError:
            found[path] = None
            continue
        regular = stat.S_ISREG(info.st_mode)
        found[path] = [int(info.st_size), int(info.st_mtime_ns)] if regular else None
    return found


def file_hashes(folder: Path, names: list[str]) -> dict[str, str]:
    """Return the SHA-256 of each named file in `folder` (what a marker records)."""
    return {name: file_sha256(Path(folder) / name) for name in names}


def _changed_file(folder: Path, recorded: Mapping[str, str]) -> str | None:
    for name, sha in recorded.items():
        path = Path(folder) / name
        if not path.is_file() or file_sha256(path) != sha:
            return f"{path} is not the file its completion marker recorded"
    return None


def _changed_input(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    for path, was in recorded.items():
        if current.get(path, "absent") != was:
            return f"its input {path} changed since it was made"
    return None


def _cut_short(path: Path) -> bool:
    """Return True when a text file does not end with a line break (a write cut short)."""
    with open(path, "rb") as stream:
        stream.seek(0, 2)
        if stream.tell() == 0:
            return True
        stream.seek(-1, 2)
        return stream.read(1) != b"\n"


def metrics_problem(path: Path, rows: int) -> str | None:
    """Return why a run's metrics.csv cannot be reused (None when it can).

    It must end with a line break, hold `rows` rows of numbers only, and every IoU, precision
    and recall must be NaN (an absent class) or lie in [0, 1].
    """
    if not path.is_file():
        return f"{path} is missing"
    try:
        if _cut_short(path):
            return f"{path} ends in the middle of a line"
        metrics = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError):
        return f"{path} cannot be read as a table"
    if len(metrics) != rows:
        return f"{path} has {len(metrics)} of its {rows} validations"
    text = [c for c in metrics.columns if not pd.api.types.is_numeric_dtype(metrics[c])]
    if text:
        return f"{path}: column '{text[0]}' holds text"
    for column in filter(RATE_COLUMN.match, metrics.columns):
        values = metrics[column].to_numpy(dtype=np.float64)
        if ((values < 0) | (values > 1)).any():
            return f"{path}: column '{column}' holds a value outside [0, 1]"
    return None


def recorded_problem(
    folder: Path, marker: Mapping[str, Any], inputs: Mapping[str, Any]
) -> str | None:
    """Return why finished work no longer matches its marker's hashes and inputs (None: it does).

    A marker without hashes or inputs (written before they were recorded) is not checked on
    them.
    """
    if FILES in marker:
        problem = _changed_file(folder, marker[FILES])
        if problem:
            return problem
    if INPUTS in marker:
        return _changed_input(marker[INPUTS], inputs)
    return None


def table_problem(path: Path) -> str | None:
    """Return why a finished build's table cannot be reused (None when it can)."""
    try:
        if path.suffix.lower() == ".csv" and _cut_short(path):
            return f"{path} ends in the middle of a line"
    except OSError:
        return f"{path} cannot be read"
    return None
