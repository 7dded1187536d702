"""`patchbalance compare` on bad input: outputs that would overwrite inputs, a bad output folder,
and a resume over corrupted or outdated work (docs/bad-input.md, round four, B1-B3)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from compare_fixtures import error_line, tiny_configs
from patchbalance.cli import app
from patchbalance.compare import load_compare_config
from patchbalance.compare.engine import _jobs, build_all
from patchbalance.compare.reuse import FILES, INPUTS, TABLE
from patchbalance.demo import write_demo_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


# --------------------------------------------------------------------------------------------
# B1, B2: outputs checked against the inputs and the output folder, before any work


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_output_that_is_a_build_input_is_refused_before_any_work(tmp_path, demo, dry_run):
    # The records of the build are named runs.csv, and output_dir is the build's folder.
    folder = tmp_path / "data"
    shutil.copytree(demo["config"].parent, folder)
    (folder / "records.csv").rename(folder / "runs.csv")
    config = yaml.safe_load((folder / "balanced_train.yaml").read_text())
    config["balanced_dataset"]["input"]["records_path"] = "runs.csv"
    (folder / "balanced_train.yaml").write_text(yaml.safe_dump(config))
    compare = tiny_configs(
        tmp_path, {**demo, "config": folder / "balanced_train.yaml"}, output_dir=str(folder)
    )
    before = (folder / "runs.csv").read_bytes()

    result = runner.invoke(app, ["compare", str(compare), *(["--dry-run"] if dry_run else [])])

    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert f"writes {folder / 'runs.csv'}" in line and "build.input.records_path" in line, line
    assert "output_dir" in line
    assert (folder / "runs.csv").read_bytes() == before
    assert not (folder / "builds").exists() and not (folder / "runs").exists()


def test_a_validation_table_inside_the_runs_folder_is_refused(tmp_path, demo):
    compare = tiny_configs(tmp_path, demo)
    (tmp_path / "out" / "runs").mkdir(parents=True)
    shutil.copy(demo["val"], tmp_path / "out" / "runs" / "val.csv")
    train = yaml.safe_load((tmp_path / "train.yaml").read_text())
    train["val_dataset"]["input_csv_path"] = "out/runs/val.csv"
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))

    result = runner.invoke(app, ["compare", str(compare)])

    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "holds arms.uniform.train.val_dataset.input_csv_path" in line, line
    assert (tmp_path / "out" / "runs" / "val.csv").is_file()
    assert not (tmp_path / "out" / "builds").exists()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("file", "output_dir {out} is a file, not a folder"),
        ("runs.csv", "output_dir {out} holds a folder named runs.csv"),
        ("results.md", "output_dir {out} holds a folder named results.md"),
        ("builds", "output_dir {out} holds a file named builds"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_an_output_dir_that_cannot_hold_the_results_is_refused_before_any_build(
    tmp_path, demo, layout, message, dry_run
):
    compare = tiny_configs(tmp_path, demo)
    out = tmp_path / "out"
    if layout == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / layout).mkdir() if layout != "builds" else (out / layout).write_text("mine")

    result = runner.invoke(app, ["compare", str(compare), *(["--dry-run"] if dry_run else [])])

    assert result.exit_code == 2, result.output
    assert message.format(out=out) in error_line(result)
    if layout == "file":
        assert out.read_text() == "mine"
    else:
        assert sorted(p.name for p in out.iterdir()) == [layout]


def test_an_unwritable_output_dir_is_named_as_output_dir_in_the_dry_run(tmp_path, demo):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    compare = tiny_configs(tmp_path, demo, output_dir="/proc/compare_out")
    result = runner.invoke(app, ["compare", str(compare), "--dry-run"])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "/proc/compare_out: cannot write output_dir" in line, line


# --------------------------------------------------------------------------------------------
# B3: a resume reuses only what still matches its marker


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo):
    """A finished tiny comparison (uniform and rank_max, seeds 42 and 43) and its results."""
    root = tmp_path_factory.mktemp("finished")
    compare = tiny_configs(root, demo)
    result = runner.invoke(app, ["compare", str(compare), "-q"])
    assert result.exit_code == 0, result.output
    return compare, root / "out", json.loads((root / "out" / "results.json").read_text())


@contextmanager
def edited(path: Path, text: str):
    """Replace a file's text for the block, then put its bytes and times back."""
    before, stat = path.read_bytes(), path.stat()
    path.write_text(text)
    try:
        yield
    finally:
        path.write_bytes(before)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def reusable(compare: Path) -> tuple[dict[str, bool], dict[str, bool]]:
    """Return which builds and which runs a resume of `compare` reuses (nothing trained)."""
    plan = load_compare_config(compare)
    tables, _ = build_all(plan)
    builds = {name: table.reused for name, table in tables.items()}
    return builds, {job.name: job.finished() for job in _jobs(plan, tables)}


def cut_metrics(text: str, how: str) -> str:
    lines = text.splitlines(keepends=True)
    header, last = lines[0].split(","), lines[-1].split(",")
    if how == "text":
        last[header.index("iou_3")] = "lots"
    elif how == "iou 7.5":
        last[header.index("iou_3")] = "7.5"
    else:  # a write cut short in the last line
        return "".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2]
    return "".join(lines[:-1]) + ",".join(last)


@pytest.mark.parametrize("how", ["text", "iou 7.5", "truncated last line"])
@pytest.mark.parametrize("markers", ["hashed", "written before hashes"])
def test_a_run_whose_metrics_are_corrupted_is_trained_again_with_a_log_line(
    finished, caplog, how, markers
):
    compare, out, _ = finished
    metrics = out / "runs" / "rank_max" / "seed43" / "metrics.csv"
    corrupted = edited(metrics, cut_metrics(metrics.read_text(), how))
    with corrupted, old_markers(out, markers), caplog.at_level(logging.WARNING):
        builds, runs = reusable(compare)
    assert all(builds.values())
    assert runs == {
        "uniform/seed42": True, "uniform/seed43": True,
        "rank_max/seed42": True, "rank_max/seed43": False,
    }  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "training it again" in r.getMessage()]
    assert len(lines) == 1 and str(metrics) in lines[0], lines


@contextmanager
def old_markers(out: Path, markers: str):
    """For the block, make every marker look as one written before hashes were recorded."""
    saved = {path: path.read_bytes() for path in out.glob("*/*/done.json")}
    saved.update({path: path.read_bytes() for path in out.glob("runs/*/*/done.json")})
    if markers != "hashed":
        for path in saved:
            marker = json.loads(path.read_text())
            path.write_text(
                json.dumps({k: v for k, v in marker.items() if k not in (FILES, INPUTS, TABLE)})
            )
    try:
        yield
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


@pytest.mark.parametrize("markers", ["hashed", "written before hashes"])
def test_finished_work_that_parses_is_reused_whatever_its_markers_format(finished, markers):
    compare, out, _ = finished
    with old_markers(out, markers):
        builds, runs = reusable(compare)
    assert all(builds.values()) and all(runs.values()) and len(runs) == 4


def test_a_resume_retrains_a_run_with_an_iou_above_1_and_gives_the_first_results(finished):
    compare, out, results = finished
    metrics = out / "runs" / "rank_max" / "seed42" / "metrics.csv"
    metrics.write_text(cut_metrics(metrics.read_text(), "iou 7.5"))

    result = runner.invoke(app, ["compare", str(compare), "-q"])

    assert result.exit_code == 0, result.output
    assert "1 runs trained, 3 reused" in result.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["trained"] == ["rank_max/seed42"]
    assert again["summary"] == results["summary"]
    assert pd.read_csv(metrics)["iou_3"].max() <= 1


def test_a_build_table_cut_short_is_built_again(finished, caplog):
    compare, out, _ = finished
    table = out / "builds" / "rank_max" / "table.csv"
    lines = table.read_text().splitlines(keepends=True)
    # Cut at a line break: the table still parses, with fewer rows.
    with edited(table, "".join(lines[: len(lines) * 3 // 4])), caplog.at_level(logging.WARNING):
        builds, _ = reusable(compare)
    assert builds == {"uniform": True, "rank_max": False}
    assert any(
        str(table) in r.getMessage() and "building it again" in r.getMessage()
        for r in caplog.records
    )
    # Built again whole.
    assert table.read_text().splitlines(keepends=True) == lines


def test_records_changed_since_the_build_invalidate_the_builds(tmp_path, caplog):
    data = write_demo_dataset(tmp_path / "demo")
    compare = tiny_configs(tmp_path, data)
    plan = load_compare_config(compare)
    tables, _ = build_all(plan)
    records = pd.read_csv(data["records"])
    assert len(pd.read_csv(tables["uniform"].path)) == len(records) > 99
    records.iloc[:99].to_csv(data["records"], index=False)

    with caplog.at_level(logging.WARNING):
        tables, _ = build_all(load_compare_config(compare))

    assert not tables["uniform"].reused
    assert any(f"its input {data['records']} changed" in r.getMessage() for r in caplog.records)
    assert len(pd.read_csv(tables["uniform"].path)) == 99


def test_a_run_that_trained_on_another_table_is_trained_again(finished, caplog):
    compare, out, _ = finished
    marker = out / "runs" / "rank_max" / "seed42" / "done.json"
    recorded = json.loads(marker.read_text())
    other_table = edited(marker, json.dumps({**recorded, TABLE: "0" * 64}))
    with other_table, caplog.at_level(logging.WARNING):
        _, runs = reusable(compare)
    assert [name for name, done in runs.items() if not done] == ["rank_max/seed42"]
    assert any("table is not the one it trained on" in r.getMessage() for r in caplog.records)
