"""The outputs of a run are one set (SPEC §4): collisions, kills, a full disk, reruns."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rasterio
import yaml
from typer.testing import CliRunner

from cli_checks import one_line_error as _one_line_error
from patchbalance.atomic import DEBUG_KILL_AT, remove_stale_temporaries
from patchbalance.balancing.pipeline import run_build
from patchbalance.cli import app
from patchbalance.config import load_config
from patchbalance.errors import ConfigError
from rasters import write_two_pairs_and_records

TEMPORARY = re.compile(r"^\..+\.(?:(\d+)-)?[a-z0-9_]{8}\.tmp$")


@pytest.fixture()
def project(tmp_path):
    """Two real raster pairs, a records CSV and a config writing a table, GeoPackage, summary."""
    write_two_pairs_and_records(tmp_path, seed=3, n_classes=4, size=16)
    config = {
        "balanced_dataset": {
            "input": {"records_path": "records.csv"},
            "clustering": {"k_min": 2, "k_max": 3},
            "num_workers": 1,
            "output": {"csv_path": "out/table.csv", "footprints_path": "out/footprints.gpkg"},
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _edit(path: Path, **output) -> Path:
    data = yaml.safe_load(path.read_text())
    data["balanced_dataset"]["output"].update(output)
    path.write_text(yaml.safe_dump(data))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def _temporaries(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if TEMPORARY.match(name))


def _set_agrees(summary_path: Path) -> dict[str, bool]:
    """Return, for each file the summary records, whether its SHA-256 is the recorded one."""
    summary = json.loads(summary_path.read_text())
    return {
        kind: hashlib.sha256(Path(summary["outputs"][kind]).read_bytes()).hexdigest() == digest
        for kind, digest in summary["output_sha256"].items()
    }


# --------------------------------------------------------------------------------------------
# Outputs that name one file, or an input


@pytest.mark.parametrize(
    ("output", "keys"),
    [
        ({"summary_path": "out/table.csv"}, ("output.csv_path", "output.summary_path")),
        (
            {"csv_path": "out/t.parquet", "footprints_path": "out/t.parquet"},
            ("output.csv_path", "output.footprints_path"),
        ),
        ({"csv_path": "records.csv"}, ("output.csv_path", "input.records_path")),
        ({"summary_path": "records.csv"}, ("output.summary_path", "input.records_path")),
    ],
)
def test_outputs_naming_one_file_are_an_error_naming_both_keys(project, output, keys):
    before = _files(project.parent)
    result = CliRunner().invoke(app, ["build-balanced-dataset", str(_edit(project, **output))])
    _one_line_error(result, *keys)
    after = _files(project.parent)
    after.pop("config.yaml"), before.pop("config.yaml")
    assert after == before  # nothing written, the records untouched
    assert not (project.parent / "out").exists()  # no stage ran, no output folder made


def test_a_link_to_the_default_summary_path_is_the_same_file(project):
    # footprints.geojson is a link to out/table.summary.json, the default summary_path.
    (project.parent / "out").mkdir()
    (project.parent / "out" / "footprints.geojson").symlink_to("table.summary.json")
    _edit(project, footprints_path="out/footprints.geojson")
    with pytest.raises(ConfigError, match=r"output\.summary_path and output\.footprints_path"):
        load_config(project)
    result = CliRunner().invoke(app, ["build-balanced-dataset", str(project), "--dry-run"])
    _one_line_error(result, "both name", "give each output its own file")


def test_select_coreset_refuses_to_write_over_its_input_table(tmp_path):
    table = tmp_path / "balanced.csv"
    table.write_text("image_path,sampler_weight\na.tif,1.5\n")
    before = table.read_bytes()
    config = tmp_path / "coreset.yaml"
    for output in ({"output_csv_path": "balanced.csv"}, {"summary_path": "./balanced.csv"}):
        block = {"input_csv_path": "balanced.csv", "output_csv_path": "coreset.csv", **output}
        config.write_text(yaml.safe_dump({"coreset": block}))
        result = CliRunner().invoke(app, ["select-coreset", str(config)])
        key = next(iter(output))
        _one_line_error(result, f"{key} names the input file input_csv_path", f"another {key}")
        assert table.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["balanced.csv", "coreset.yaml"]


# --------------------------------------------------------------------------------------------
# A kill while the outputs are written


def _build_in_subprocess(config: Path, kill_at: str, *overrides: str) -> int:
    """Run the real command line in a new process that SIGKILLs itself at `kill_at`; return its pid."""
    environment = {**os.environ, DEBUG_KILL_AT: kill_at, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "patchbalance.cli", "build-balanced-dataset", str(config)]
    process = subprocess.Popen([*command, "-q", *overrides], env=environment)
    assert process.wait(timeout=120) == -9  # killed by SIGKILL, as asked
    return process.pid


@pytest.mark.parametrize(
    ("kill_at", "changed"),
    [
        ("staged:footprints.gpkg", set()),  # the table complete, nothing moved yet
        ("staged:table.summary.json", set()),  # every file complete, nothing moved yet
        ("published:table.csv", {"table"}),  # killed between the moves
        ("published:table.summary.json", {"table", "geopackage", "summary"}),
    ],
)
def test_a_kill_while_writing_leaves_a_set_whose_summary_tells_which(project, kill_at, changed):
    out = project.parent / "out"
    run_build(load_config(project))
    old = _files(out)
    # A temporary left by an earlier version (no process id in its name) and a killed run.
    (out / ".table.csv.abcd1234.tmp").write_bytes(b"x" * 4096)
    pid = _build_in_subprocess(project, kill_at, "--set", "sampling_method=repeat_factor")

    now = _files(out)
    names = {"table": "table.csv", "geopackage": "footprints.gpkg", "summary": "table.summary.json"}
    for kind, name in names.items():
        assert (now[name] != old[name]) == (kind in changed), name
    agrees = _set_agrees(out / "table.summary.json")
    if changed in (set(), set(names)):
        assert all(agrees.values())  # the old set, or the new one: the summary matches each file
    else:
        # A mix: the summary says which files are not the ones it describes.
        assert {kind for kind, same in agrees.items() if not same} == changed
        text = CliRunner().invoke(app, ["report", str(out / "table.csv")]).stdout
        assert "warning: table.csv is not the table its summary table.summary.json" in text
    # What the kill left is the killed run's (the earlier version's temporary is gone).
    left = _temporaries(out)
    assert all(TEMPORARY.match(name).group(1) == str(pid) for name in left), left
    assert bool(left) == (kill_at != "published:table.summary.json")

    result = run_build(load_config(project, ["sampling_method=repeat_factor"]))
    assert _temporaries(out) == []
    assert all(_set_agrees(out / "table.summary.json").values())
    assert result.summary["sampling_method"] == "repeat_factor"


def test_the_report_says_nothing_about_a_table_that_matches_its_summary(project):
    out = project.parent / "out"
    run_build(load_config(project))
    assert all(_set_agrees(out / "table.summary.json").values())  # a matching set, as built

    result = CliRunner().invoke(app, ["report", str(out / "table.csv")])

    assert result.exit_code == 0, result.output
    assert "effective sample size" in result.stdout  # the report ran and printed its figures
    # The mismatch warning (asserted present for a mixed set in the kill test above) is absent,
    # from stdout and stderr alike.
    assert "is not the table its summary" not in result.output


def test_only_temporaries_of_processes_that_ended_are_removed(tmp_path):
    target = tmp_path / "table.csv"
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        names = {
            "legacy": ".table.csv.k2j4abcd.tmp",
            "ended": f".table.csv.{ended.pid}-k2j4abcd.tmp",
            "running": f".table.csv.{running.pid}-k2j4abcd.tmp",
            "this process, not made by it": f".table.csv.{os.getpid()}-k2j4abcd.tmp",
            "another file's": f".other.csv.{ended.pid}-k2j4abcd.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_text("half")
        (tmp_path / names["ended"]).unlink()
        (tmp_path / names["ended"]).mkdir()  # a private folder around a GeoPackage
        (tmp_path / names["ended"] / "table.csv").write_text("half")
        removed = {path.name for path in remove_stale_temporaries(target)}
    finally:
        running.kill()
        running.wait()
    kept = {"running", "another file's"}
    assert removed == {name for kind, name in names.items() if kind not in kept}
    assert sorted(os.listdir(tmp_path)) == sorted(names[kind] for kind in kept)


# --------------------------------------------------------------------------------------------
# Reruns


def test_geopackage_reruns_are_byte_identical(project):
    out = project.parent / "out"
    run_build(load_config(project))
    first = (out / "footprints.gpkg").read_bytes()
    time.sleep(0.01)  # gpkg_contents.last_change has millisecond resolution
    run_build(load_config(project))
    assert (out / "footprints.gpkg").read_bytes() == first


# --------------------------------------------------------------------------------------------
# A full disk, a read-only folder


@pytest.fixture()
def mount_tmpfs(tmp_path):
    """Return a function that mounts a fresh tmpfs (`size`, read-only or not) on a new folder.

    Mounting needs root (as in CI); elsewhere the test is skipped, saying why.
    """
    mounted: list[Path] = []

    def mount(name: str, size: str = "1m", read_only: bool = False) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root and mount(8) (CI runs as root)")
        folder = tmp_path / name
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> None:
    """Fill the file system of `folder` until it has no room left."""
    with open(folder / "filler", "wb", buffering=0) as stream:
        try:
            while True:
                stream.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("csv_path", "table.csv"),
        ("csv_path", "table.parquet"),
        ("footprints_path", "footprints.gpkg"),  # GDAL's error keeps no errno
        ("footprints_path", "footprints.geojson"),
        ("summary_path", "summary.json"),
    ],
)
def test_a_full_disk_is_one_line_naming_the_file_and_the_previous_set_stays(
    project, mount_tmpfs, key, name
):
    small = mount_tmpfs("small")
    out = project.parent / "out"
    _edit(project, **{key: str(small / name)})
    run_build(load_config(project))
    before = {**_files(out), **_files(small)}
    _fill(small)

    result = CliRunner().invoke(
        app, ["build-balanced-dataset", str(project), "--set", "sampling_method=repeat_factor"]
    )
    _one_line_error(result, f"{small / name}: the disk is full (no space left on device)")
    after = {**_files(out), **_files(small)}
    after.pop("filler")
    assert after == before  # every file of the previous set, on either disk
    assert _temporaries(out) == [] and _temporaries(small) == []


def test_demo_on_a_full_disk_leaves_no_truncated_geotiff(mount_tmpfs):
    # Room for scene 1's image and mask, not for scene 2's image (about 0.7 MB each).
    small = mount_tmpfs("small", size="1200k")
    result = CliRunner().invoke(app, ["demo", "--out", str(small / "demo"), "-q"])
    _one_line_error(result, "scene_2.tif: the disk is full")
    written = sorted(small.rglob("*.tif"))
    assert [str(path.relative_to(small / "demo")) for path in written] == [
        "images/scene_1.tif",
        "masks/scene_1.tif",
    ]
    for path in written:
        with rasterio.open(path) as dataset:
            assert dataset.read().shape[1:] == (512, 512)  # complete, every tile readable
    assert [path.name for path in small.rglob(".*")] == []


def test_demo_out_naming_a_file_or_a_read_only_folder_is_one_line(tmp_path, mount_tmpfs):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--out", str(existing)])
    _one_line_error(result, str(existing), "is a file, not a folder")
    assert existing.read_text() == "mine"

    read_only = mount_tmpfs("read-only", read_only=True)
    result = CliRunner().invoke(app, ["demo", "--out", str(read_only / "demo")])
    _one_line_error(result, "demo folder (--out)", "Read-only file system")
