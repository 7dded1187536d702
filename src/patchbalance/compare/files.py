"""The files of a comparison: the inputs its configs name, its outputs, and the checks between.

`patchbalance compare` writes `runs.csv`, `results.json`, `results.md` and `results.html` into
`output_dir`, and keeps its work in the folders `builds/` and `runs/` there (and embeddings in
`embeddings/`). Before anything is built, and in `--dry-run`, `check_compare_outputs` makes
sure that `output_dir` can hold them and that none of them is, or holds, a file the build or
train configs read: a records file named `runs.csv` next to the build config would otherwise
be replaced by the comparison's table of runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from patchbalance.atomic import check_writable_folder
from patchbalance.errors import OutputError
from patchbalance.paths import resolve_path, same_file

RESULT_FILES = ("runs.csv", "results.json", "results.md", "results.html")
WORK_FOLDERS = ("builds", "runs")
# Keys whose value is a path even when relative (other strings count only when absolute).
PATH_KEY_ENDINGS = ("path", "_dir", "encoder_weights", "checkpoint")
# Keys the comparison sets itself for every build or run: not inputs.
BUILD_OWN_KEYS = ("output", "embeddings.parquet_path")
TRAIN_OWN_KEYS = ("output_dir", "train_dataset.input_csv_path")


def _named_paths(value: Any, key: str, base: Path, skip: tuple[str, ...]) -> Iterator[tuple]:
    """Yield (dotted key, absolute path) for every path string in a config mapping."""
    if key in skip:
        return
    if isinstance(value, Mapping):
        for name, item in value.items():
            yield from _named_paths(item, f"{key}.{name}" if key else str(name), base, skip)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _named_paths(item, f"{key}[{i}]", base, skip)
    elif isinstance(value, str | os.PathLike) and str(value).strip():
        text = os.fspath(value)
        last = key.rsplit(".", 1)[-1].split("[", 1)[0]
        if os.path.isabs(os.path.expanduser(text)) or last.endswith(PATH_KEY_ENDINGS):
            yield key, resolve_path(text, base)


def build_input_paths(build: Mapping[str, Any], base: Path) -> dict[str, Path]:
    """Return the files a build mapping reads, by dotted key (its outputs and cache left out)."""
    return dict(_named_paths(build, "", base, BUILD_OWN_KEYS))


def train_input_paths(train: Mapping[str, Any], base: Path) -> dict[str, Path]:
    """Return the files a train mapping reads, by dotted key (the arm's own table left out)."""
    return dict(_named_paths(train, "", base, TRAIN_OWN_KEYS))


def compare_inputs(plan: Any) -> dict[str, Path]:
    """Return every file the comparison reads, keyed by the config key that names it."""
    inputs = {f"{what} config": Path(path) for what, path in plan.configs.items()}
    train_base = Path(plan.configs.get("train", Path.cwd())).parent
    for name, arm in plan.arms.items():
        for key, path in build_input_paths(arm.build, arm.build_base).items():
            inputs.setdefault(f"arms.{name}.build.{key}", path)
        for key, path in train_input_paths(arm.train, train_base).items():
            inputs.setdefault(f"arms.{name}.train.{key}", path)
        for key, path in build_input_paths(arm.coreset or {}, arm.build_base).items():
            inputs.setdefault(f"arms.{name}.coreset.{key}", path)
    return inputs


def _check_output_folder(out: Path, where: str) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"{where}: output_dir {out} is a file, not a folder; give a folder for the results"
        )
    for name in RESULT_FILES:
        if (out / name).is_dir():
            raise OutputError(
                f"{where}: output_dir {out} holds a folder named {name}, where the comparison "
                f"writes its {name}; move that folder or choose another output_dir"
            )
    for name in WORK_FOLDERS:
        if (out / name).exists() and not (out / name).is_dir():
            raise OutputError(
                f"{where}: output_dir {out} holds a file named {name}, where the comparison "
                f"keeps its {name}/ folder; move that file or choose another output_dir"
            )
    try:
        check_writable_folder(out, "output_dir")
    except OutputError as exc:
        raise OutputError(f"{where}: {exc}") from None


def check_compare_outputs(plan: Any) -> None:
    """Raise `OutputError` unless the comparison can write its outputs without losing an input.

    `output_dir` must be a writable folder (or creatable), hold no folder where a result file
    goes and no file where a work folder goes; and no output may be, or hold, a file that the
    build, train or CoreSet configs of an arm read (nor those configs themselves). The message
    names `output_dir`, the output and the input's key.
    """
    out = Path(plan.output_dir)
    _check_output_folder(out, plan.where)
    outputs = [out / name for name in (*RESULT_FILES, *WORK_FOLDERS)]
    for key, path in compare_inputs(plan).items():
        for output in outputs:
            if same_file(path, output) or output in path.parents:
                raise OutputError(
                    f"{plan.where}: output_dir {out}: the comparison writes {output}, which "
                    f"{'holds' if output in path.parents else 'is'} {key} ({path}); choose another "
                    "output_dir or move that file"
                )
