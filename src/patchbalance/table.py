"""The patch table as every command reads it: the patch key, class columns, booleans, files.

One rule each, shared by the sources, the embeddings cache, `report`, `select-coreset`, the
training dataset and its loader, so that they never disagree about which rows a table excludes,
which class columns it has, how a key is spelled or which row a message names:

- the patch key (`KEY_COLUMNS`): one dtype per column, a readable label, a sort order;
- the balanced table's column names (`SAMPLER_WEIGHT`, `EXCLUDED`, the footprint columns, the
  class columns spelt by `class_column`): every other module asks here, never spells them;
- the class columns (`px_<value>` pixel counts) and the pixel-count rule (`class_counts`);
- boolean columns and the `excluded` rows, of a table or of a dataset;
- reading a CSV or Parquet table, writing one atomically.

What is measured from the counts and weights (class shares, the effective sample size) is in
`patchbalance.measures`.

Row numbers in messages are the table's own data rows as a spreadsheet shows them: the first
row under the header is row 1. `row_numbers` and `rows_text` turn array positions into them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.atomic import atomic_write_with, atomic_writer
from patchbalance.errors import InputError

log = logging.getLogger(__name__)

KEY_COLUMNS = ("image_path", "row_off", "col_off", "patch_size")
SAMPLER_WEIGHT = "sampler_weight"
EXCLUDED = "excluded"
FOOTPRINT_BOUNDS = ("tile_minx", "tile_miny", "tile_maxx", "tile_maxy")
CRS_COLUMN = "crs"
CLASS_COLUMN_PREFIX = "px_"
CLASS_COLUMN = re.compile(r"^px_(-?\d+)$")
PARQUET_SUFFIXES = (".parquet", ".pq")

TRUE_WORDS = ("true", "t", "yes", "1", "1.0")
FALSE_WORDS = ("false", "f", "no", "0", "0.0")
BOOLEAN_RULE = "true/false, 1/0, yes/no or t/f"


def row_numbers(positions: np.ndarray) -> np.ndarray:
    """Return the 1-based data row numbers of 0-based table positions."""
    return np.asarray(positions, dtype=np.int64) + 1


def rows_text(positions: np.ndarray, shown: int = 5, numbered: bool = False) -> str:
    """Return "row 3" or "rows 3, 8 and 4 more" for 0-based positions (or 1-based `numbered`)."""
    numbers = np.asarray(positions, dtype=np.int64)
    numbers = numbers if numbered else row_numbers(numbers)
    listed = ", ".join(str(int(number)) for number in numbers[:shown])
    more = f" and {numbers.size - shown} more" if numbers.size > shown else ""
    return f"row{'s' if numbers.size > 1 else ''} {listed}{more}"


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def boolean_column(table: pd.DataFrame, name: str, where: str | None = None) -> np.ndarray:
    """Return column `name` of `table` as a bool array.

    Accepts real booleans, the numbers 1 and 0, and (any case, spaces around ignored) the
    words of `TRUE_WORDS` and `FALSE_WORDS`. Anything else, an empty cell included, raises
    `InputError` naming `where` (the table's file), the column and the first such row.
    """
    column = table[name]
    if pd.api.types.is_bool_dtype(column.dtype) and not column.isna().any():
        return column.to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        true, valid = values == 1, (values == 1) | (values == 0)
    else:
        text = column.astype("string").str.strip().str.lower()
        true = text.isin(TRUE_WORDS).to_numpy(dtype=bool)
        valid = true | text.isin(FALSE_WORDS).to_numpy(dtype=bool)
    if not valid.all():
        _raise_not_boolean(column, name, np.flatnonzero(~valid), where)
    return np.asarray(true, dtype=bool)


def _raise_not_boolean(column: pd.Series, name: str, bad: np.ndarray, where: str | None) -> None:
    first = _plain(column.iloc[int(bad[0])])
    problem = "is empty" if pd.isna(first) or not str(first).strip() else f"holds {first!r}"
    count = f" ({bad.size} rows in all)" if bad.size > 1 else ""
    raise InputError(
        f"{_prefix(where)}column '{name}' {problem} in {rows_text(bad[:1])}{count}; "
        f"a true/false column takes {BOOLEAN_RULE}"
    )


def _plain(value: Any) -> Any:
    """Return a numpy scalar as the Python number it holds (a message shows 2.0, not np.float64)."""
    return value.item() if isinstance(value, np.generic) else value


def excluded_column(table: pd.DataFrame, where: str | None = None) -> np.ndarray | None:
    """Return the table's `excluded` column as bools, or None when the table has none."""
    return boolean_column(table, EXCLUDED, where) if EXCLUDED in table.columns else None


def dataset_excluded(dataset: Any) -> np.ndarray | None:
    """Return which rows of a training dataset are excluded, or None when it says nothing.

    Our datasets carry their table's `excluded` column (read by `excluded_column`) as an
    attribute of the same name. A dataset that is not ours has no such attribute and reads as
    None: none of its rows is excluded.
    """
    return getattr(dataset, EXCLUDED, None)


def excluded_but_weighted(excluded: np.ndarray | None, weights: np.ndarray) -> np.ndarray:
    """Return which rows are marked excluded yet carry a sampler_weight above 0."""
    if excluded is None:
        return np.zeros(len(weights), dtype=bool)
    return np.asarray(excluded, dtype=bool) & (np.asarray(weights, dtype=np.float64) > 0)


def warn_excluded_but_weighted(rows: np.ndarray, where: str | None, consequence: str) -> None:
    """Log one warning counting the excluded rows with a weight > 0 (nothing when none)."""
    positions = np.flatnonzero(rows)
    if positions.size == 0:
        return
    log.warning(
        "%s%d row(s) are marked excluded but have sampler_weight > 0 (first: %s, e.g. a table "
        "edited by hand or merged from two runs); %s",
        _prefix(where),
        positions.size,
        rows_text(positions[:1]),
        consequence,
    )


def drawn_weights(
    weights: np.ndarray,
    excluded: np.ndarray | None,
    where: str | None = None,
    warn: bool = True,
) -> np.ndarray:
    """Return `weights` with excluded rows set to 0: an excluded row is never drawn.

    With `warn`, logs once how many excluded rows had a weight above 0.
    """
    weights = np.array(weights, dtype=np.float64)
    stray = excluded_but_weighted(excluded, weights)
    if warn:
        warn_excluded_but_weighted(stray, where, "they are treated as weight 0 and never drawn")
    weights[stray] = 0.0
    return weights


# --------------------------------------------------------------------------------------------
# The patch key


def normalised_keys(table: pd.DataFrame) -> pd.DataFrame:
    """Return the patch-key columns with one dtype each (text paths, int64 offsets)."""
    try:
        return pd.DataFrame(
            {
                "image_path": table["image_path"].astype(str).to_numpy(dtype=object),
                "row_off": table["row_off"].to_numpy(dtype=np.int64),
                "col_off": table["col_off"].to_numpy(dtype=np.int64),
                "patch_size": table["patch_size"].to_numpy(dtype=np.int64),
            }
        )
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"the patch key columns row_off, col_off and patch_size must be whole numbers: {exc}"
        ) from exc


def empty_keys() -> pd.DataFrame:
    """Return a patch-key frame with no rows and the dtypes of `normalised_keys`."""
    return normalised_keys(pd.DataFrame({name: [] for name in KEY_COLUMNS}))


def key_sorted(keys: pd.DataFrame) -> np.ndarray:
    """Return the positions of `keys` sorted by (image_path, row_off, col_off, patch_size)."""
    codes, _ = pd.factorize(keys["image_path"], sort=True)
    return np.lexsort(
        (
            keys["patch_size"].to_numpy(),
            keys["col_off"].to_numpy(),
            keys["row_off"].to_numpy(),
            codes,
        )
    )


def shared_keys_text(keys: pd.DataFrame, rows: np.ndarray | None = None) -> str | None:
    """Return "N rows share a patch key with another row (first: rows 3 and 9, KEY)", or None.

    `rows` holds the table's 1-based row number of each key (default: position + 1).
    """
    duplicated = keys.duplicated(keep=False).to_numpy()
    if not duplicated.any():
        return None
    numbers = np.arange(1, len(keys) + 1) if rows is None else np.asarray(rows)
    first = int(np.flatnonzero(duplicated)[0])
    same = np.flatnonzero((keys == keys.iloc[first]).all(axis=1).to_numpy())
    return (
        f"{int(duplicated.sum())} rows share a patch key with another row (first: rows "
        f"{numbers[same[0]]} and {numbers[same[1]]}, {key_label(keys, first)})"
    )


def key_label(keys: pd.DataFrame, i: int) -> str:
    """Return a readable name for the patch at position `i` of `keys`: its image and window."""
    row = keys.iloc[i]
    return (
        f"{row['image_path']} (row_off {row['row_off']}, col_off {row['col_off']}, "
        f"patch_size {row['patch_size']})"
    )


# --------------------------------------------------------------------------------------------
# Class columns


def lookup_by_path(paths: pd.Series, mapping: dict[str, Any], default: Any = np.nan) -> np.ndarray:
    """Return `mapping[path]` for every row of `paths` (`default` for a path it lacks).

    The paths are factorised first, so the mapping is looked up once per distinct file, not
    once per patch (a categorical column is used as it is).
    """
    categorical = pd.Categorical(paths)
    per_file = np.asarray(
        [mapping.get(path, default) for path in categorical.categories.tolist()] + [default]
    )
    return per_file[categorical.codes]


def class_column(value: int) -> str:
    """Return the name of the pixel-count column of class `value`: `px_<value>`."""
    return f"{CLASS_COLUMN_PREFIX}{int(value)}"


def class_columns(table: pd.DataFrame) -> tuple[list[str], list[int]]:
    """Return the `px_<value>` column names of `table` and their class values, sorted by value."""
    found = sorted(
        (int(match.group(1)), str(column))
        for column in table.columns
        if (match := CLASS_COLUMN.match(str(column)))
    )
    return [name for _, name in found], [value for value, _ in found]


def class_counts(
    table: pd.DataFrame,
    columns: Sequence[str],
    rows: np.ndarray,
    where: str | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Return the `px_` class columns as an (N, C) float array, checked in the `rows` given.

    In those rows (a bool mask: the active ones) every count must be a whole number >= 0;
    text, an empty cell, a negative or a fractional count raises `InputError` naming `where`,
    the column and the first such row (its 1-based number in `labels` when given, e.g. the
    file rows that a dataset kept). Other rows (excluded ones) may be empty: they read 0.
    """
    counts = np.zeros((len(table), len(columns)), dtype=np.float64)
    for c, name in enumerate(columns):
        values = pd.to_numeric(table[name], errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        bad = rows & ~(np.isfinite(values) & (values >= 0) & (values == np.round(values)))
        if bad.any():
            _raise_bad_count(table[name], name, np.flatnonzero(bad), where, labels)
        counts[:, c] = np.nan_to_num(values)
    return counts


def _raise_bad_count(
    column: pd.Series, name: str, bad: np.ndarray, where: str | None, labels: np.ndarray | None
) -> None:
    first = _plain(column.iloc[int(bad[0])])
    problem = "is empty" if pd.isna(first) or not str(first).strip() else f"holds {first!r}"
    count = f" ({bad.size} rows in all)" if bad.size > 1 else ""
    row = rows_text(bad[:1]) if labels is None else rows_text(labels[bad[:1]], numbered=True)
    raise InputError(
        f"{_prefix(where)}column '{name}' {problem} in {row}{count}; a class "
        "pixel count must be a whole number >= 0 in every row that is not excluded"
    )


# --------------------------------------------------------------------------------------------
# Files


def is_parquet(path: Path) -> bool:
    """Return whether `path` names a Parquet file (by its suffix); else it is CSV."""
    return Path(path).suffix.lower() in PARQUET_SUFFIXES


def table_suffix(path: str) -> str:
    """Return `path` when its suffix says CSV or Parquet; raise `ValueError` otherwise.

    For the validators of the keys that name a table to write: the format follows the suffix,
    so any other suffix would get a CSV file under a misleading name.
    """
    suffix = Path(path).suffix.lower()
    if path and suffix not in (".csv", *PARQUET_SUFFIXES):
        named = f"'{suffix}'" if suffix else "no suffix"
        raise ValueError(
            f"the table is written as CSV or Parquet by its suffix: end the name in .csv, "
            f".parquet or .pq (got {named})"
        )
    return path


def check_table_file(path: Path, what: str = "table") -> None:
    """Raise `InputError` unless `path` is an existing file (a folder is named as one)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not the {what}; give the file itself")
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")


def separator_hint(columns: Sequence[object]) -> str:
    """Return advice when a CSV header read as one column holds ';' or a tab, else ""."""
    if len(columns) != 1:
        return ""
    header = str(columns[0])
    for separator, name in ((";", "';'"), ("\t", "tabs")):
        if separator in header:
            return (
                f"; the header reads as one column {header[:60]!r}: the file looks separated by "
                f"{name}, but CSV tables must be comma-separated (save it with commas, or as "
                "Parquet)"
            )
    return ""


def _read_error(path: Path, what: str, exc: Exception) -> InputError:
    return InputError(f"{path}: cannot read the {what}: {exc}".splitlines()[0])


def table_columns(path: Path, what: str = "table") -> list[str]:
    """Return the column names of the CSV or Parquet table at `path`, reading no rows."""
    try:
        if is_parquet(path):
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        return list(pd.read_csv(path, nrows=0).columns)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise _read_error(path, what, exc) from exc


def read_table(
    path: Path,
    columns: Sequence[str] | None = None,
    text_columns: Sequence[str] = (),
    what: str = "table",
    categorical: bool = False,
) -> pd.DataFrame:
    """Return the CSV or Parquet table at `path` (Parquet by its suffix).

    Args:
        path: the file.
        columns: the columns to read; None for all.
        text_columns: columns a CSV file holds as text whatever they look like (paths).
        what: the table's name in error messages.
        categorical: read the `text_columns` as categorical columns (one string per distinct
            value, not one per row: millions of records name a few files); Parquet reads them
            dictionary-encoded, row group by row group.

    Returns:
        The table. Raises `InputError` when the file is missing or cannot be read.
    """
    path = Path(path)
    check_table_file(path, what)
    usecols = list(columns) if columns is not None else None
    try:
        if is_parquet(path):
            if categorical and text_columns:
                return _read_parquet_categorical(path, usecols, text_columns)
            return pd.read_parquet(path, columns=usecols)
        kind = "category" if categorical else str
        dtype = {name: kind for name in text_columns} or None
        return pd.read_csv(path, usecols=usecols, dtype=dtype)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise _read_error(path, what, exc) from exc


def _read_parquet_categorical(
    path: Path, columns: list[str] | None, text_columns: Sequence[str]
) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    present = [
        name
        for name in text_columns
        if name in source.schema_arrow.names and (columns is None or name in columns)
    ]
    for name in present:
        kind = source.schema_arrow.field(name).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputError(
                f"{path}: column '{name}' holds {kind} values, but it names files: write it as "
                "text (strings)"
            )
    source = pq.ParquetFile(path, read_dictionary=present)
    groups = [
        source.read_row_group(i, columns=columns).to_pandas() for i in range(source.num_row_groups)
    ]
    if not groups:
        return source.schema_arrow.empty_table().to_pandas()
    for name in present:
        # Row groups have their own dictionaries; give them one set of categories.
        union = pd.api.types.union_categoricals([group[name] for group in groups])
        for group in groups:
            group[name] = pd.Categorical(group[name], categories=union.categories)
    table = pd.concat(groups, ignore_index=True)
    del groups
    # Arrow keeps freed buffers in its own pool; give them back before the next stage.
    pa.default_memory_pool().release_unused()
    return table


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write `table` as Parquet when `path` ends in .parquet, else as CSV, atomically."""
    write_table_chunks([table], path)


def write_table_chunks(chunks: Iterable[pd.DataFrame], path: Path) -> None:
    """Write consecutive row chunks of one table to `path` (Parquet by suffix, else CSV).

    Each chunk becomes a Parquet row group (or a run of CSV lines), so a table never has to
    be whole in memory; the file is identical to writing the concatenated chunks. The file
    replaces `path` only when every chunk is written.
    """
    path = Path(path)
    if is_parquet(path):
        atomic_write_with(path, lambda temporary: _write_parquet_chunks(chunks, temporary))
        return
    with atomic_writer(path, "w") as stream:
        for position, chunk in enumerate(chunks):
            chunk.to_csv(stream, index=False, header=position == 0, lineterminator="\n")


def _write_parquet_chunks(chunks: Iterable[pd.DataFrame], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for chunk in chunks:
            if writer is None:
                batch = pa.Table.from_pandas(chunk, preserve_index=False)
                writer = pq.ParquetWriter(path, batch.schema)
            else:
                batch = pa.Table.from_pandas(chunk, schema=writer.schema, preserve_index=False)
            writer.write_table(batch, row_group_size=max(1, len(chunk)))
    finally:
        if writer is not None:
            writer.close()
