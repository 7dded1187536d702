"""The one rule for paths in configurations and tables: `~` expanded, relative to a folder."""

from __future__ import annotations

import os
from pathlib import Path

from patchbalance.errors import ConfigError


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


def default_summary_path(table_path: str | os.PathLike[str]) -> Path:
    """Return where a table's summary goes when no `summary_path` is given: `<stem>.summary.json`."""
    table_path = Path(table_path)
    return table_path.with_name(f"{table_path.stem}.summary.json")


def same_file(first: Path, second: Path) -> bool:
    """Return whether two paths name one file: the same after following links, or hard links."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)  # hard links
    except OSError:
        return False  # one of them does not exist yet


def check_distinct_files(
    outputs: dict[str, str | os.PathLike[str] | None],
    inputs: dict[str, str | os.PathLike[str] | None],
) -> None:
    """Raise `ConfigError` when two outputs, or an output and an input, name the same file.

    Args:
        outputs: the files a command writes, by the configuration key that names each.
        inputs: the files it reads, by key.

    Paths are compared after following links, so a link to a file is that file.
    """
    written = [(key, Path(path)) for key, path in outputs.items() if path]
    read = [(key, Path(path)) for key, path in inputs.items() if path]
    for position, (key, path) in enumerate(written):
        for other_key, other in written[:position]:
            if same_file(path, other):
                raise ConfigError(
                    f"{other_key} and {key} both name {path}; one would overwrite the other: "
                    "give each output its own file"
                )
        for input_key, source in read:
            if same_file(path, source):
                raise ConfigError(
                    f"{key} names the input file {input_key} ({source}); writing it would "
                    f"replace the input: choose another {key.rsplit('.', 1)[-1]}"
                )


# The footprint formats by file extension: what `output.footprints_path` may end in.
FOOTPRINT_FORMATS = {".gpkg": "geopackage", ".parquet": "geoparquet", ".geojson": "geojson"}


def footprint_format(path: str | os.PathLike[str]) -> str:
    """Return `geopackage`, `geoparquet` or `geojson` for a footprints path, by its extension.

    Raises `ValueError` (a configuration error) for any other extension.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FOOTPRINT_FORMATS:
        raise ValueError(
            f"footprints_path {os.fspath(path)!r} must end in "
            f"{', '.join(FOOTPRINT_FORMATS)} (GeoPackage, GeoParquet or GeoJSON)"
        )
    return FOOTPRINT_FORMATS[suffix]
