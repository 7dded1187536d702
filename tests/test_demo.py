"""`patchbalance demo` and the masks_only example configuration."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import rasterio
from typer.testing import CliRunner

from patchbalance.cli import app
from patchbalance.demo import write_demo_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "conf" / "examples"


def test_demo_writes_georeferenced_data_and_builds_in_under_a_minute(tmp_path):
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "-q"])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert elapsed < 60
    demo = tmp_path / "demo"
    table = pd.read_csv(demo / "balanced_train.csv")
    assert len(table) == 192
    with rasterio.open(demo / "masks" / "scene_2.tif") as dataset:
        assert dataset.crs.to_epsg() == 32640
        assert dataset.nodata == 255
        assert dataset.profile["tiled"]
    reasons = json.loads((demo / "balanced_train.summary.json").read_text())["excluded_by_reason"]
    assert reasons["mask_border_nodata"] > 0 and reasons["image_black_border"] > 0
    # The rare class is about 2 % of the labelled pixels and the weights show it more often.
    sampling = json.loads((demo / "balanced_train.summary.json").read_text())["sampling"]
    share = sampling["class_pixel_share"]["3"]
    assert 0.01 < share["uniform"] < 0.04
    assert share["weighted"] > share["uniform"]
    assert (demo / "balanced_train.geojson").exists()
    assert "effective sample size" in result.stdout


def build_example(tmp_path, name: str):
    """Return the CLI result of building conf/examples/<name> on fresh demo data, laid out as in
    the repository (the example's paths are relative to conf/examples/)."""
    write_demo_dataset(tmp_path / "patchbalance-demo")
    examples = tmp_path / "conf" / "examples"
    examples.mkdir(parents=True)
    shutil.copy(EXAMPLES / name, examples)
    return CliRunner().invoke(app, ["build-balanced-dataset", str(examples / name), "-q"])


def test_the_masks_only_example_config_runs_on_the_demo_data(tmp_path):
    result = build_example(tmp_path, "balanced_train.yaml")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "patchbalance-demo" / "balanced_train_records.csv")
    assert len(table) == 32
    assert table.loc[~table["excluded"], "sampler_weight"].mean() == pytest.approx(1.0)


def test_class_target_example_raises_the_rare_class_with_class_centred_windows(tmp_path):
    result = build_example(tmp_path, "class_target.yaml")

    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "patchbalance-demo" / "balanced_class_target.csv")
    assert set(table["placement"]) == {"grid", "class:3"}
    summary = json.loads(
        (tmp_path / "patchbalance-demo" / "balanced_class_target.summary.json").read_text()
    )
    target = summary["weights"]["class_target"]
    assert target["target_share"] == "sqrt"
    share = summary["sampling"]["class_pixel_share"]["3"]
    assert share["weighted"] > 1.5 * share["uniform"]
    assert summary["sampling"]["effective_sample_size_share"] >= 0.25
    assert summary["source"]["placement"]["rare_classes"] == [3]


EXPECTED = Path(__file__).resolve().parent / "demo_expected"
PINNED_FILES = ("balanced_train.csv", "balanced_train.geojson", "balanced_train.summary.json")
# Fields of the summary that change from run to run or machine to machine; `output_sha256`
# depends on the output folder (the table holds absolute paths) and is checked on its own.
UNPINNED_SUMMARY_KEYS = ("timings_s", "versions", "compute", "output_sha256")


def pinned_demo_outputs(out_dir: Path) -> dict[str, str]:
    """Return the demo's table, GeoJSON and summary as text, with `out_dir` written as <OUT>.

    The summary drops its timings and versions; everything else is kept as written. The
    hashes the summary records are those of the files written beside it.
    """
    result = CliRunner().invoke(app, ["demo", "--out", str(out_dir), "-q"])
    assert result.exit_code == 0, result.output
    hashes = json.loads((out_dir / "balanced_train.summary.json").read_text())["output_sha256"]
    assert hashes == {
        "table": hashlib.sha256((out_dir / "balanced_train.csv").read_bytes()).hexdigest(),
        "geojson": hashlib.sha256((out_dir / "balanced_train.geojson").read_bytes()).hexdigest(),
    }
    texts = {}
    for name in PINNED_FILES:
        text = (out_dir / name).read_text(encoding="utf-8")
        if name.endswith(".summary.json"):
            summary = json.loads(text)
            for key in UNPINNED_SUMMARY_KEYS:
                summary.pop(key)
            text = json.dumps(summary, indent=2) + "\n"
        texts[name] = text.replace(str(out_dir.resolve()), "<OUT>")
    return texts


FLOAT = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?")


def same_up_to_float_rounding(text: str, expected: str) -> bool:
    """Return whether two texts are equal, decimals within 1e-12 relative of each other.

    The class_target solver's last bits depend on the CPU's vector instructions (a weight of
    0.2491795296352004 on one machine is ...003 on another); everything else is exact.
    """
    if FLOAT.split(text) != FLOAT.split(expected):
        return False
    found, wanted = FLOAT.findall(text), FLOAT.findall(expected)
    return len(found) == len(wanted) and all(
        math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
        for a, b in zip(found, wanted, strict=True)
    )


def test_demo_outputs_are_the_pinned_files(tmp_path):
    # Regenerate after a deliberate change of output: write pinned_demo_outputs(...) to EXPECTED.
    for name, text in pinned_demo_outputs(tmp_path / "demo").items():
        assert same_up_to_float_rounding(text, (EXPECTED / name).read_text(encoding="utf-8")), (
            f"{name} changed"
        )


def test_the_pinned_comparison_tells_a_changed_digit_from_float_rounding():
    assert same_up_to_float_rounding("a,0.2491795296352004,7", "a,0.2491795296352003,7")
    assert not same_up_to_float_rounding("a,0.2491795296352004,7", "a,0.2491795297352004,7")
    assert not same_up_to_float_rounding("a,0.25,8", "a,0.25,7")
    assert not same_up_to_float_rounding("a,0.25,True", "a,0.25,False")


def test_demo_without_matplotlib_skips_the_html_page_with_a_note(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "-q"])
    assert result.exit_code == 0, result.output
    assert "note: skipped the HTML report" in result.stdout
    assert not (tmp_path / "demo" / "report.html").exists()
    assert (tmp_path / "demo" / "balanced_train.csv").exists()


def test_the_demo_runs_the_default_and_its_summary_says_so(tmp_path):
    texts = pinned_demo_outputs(tmp_path / "demo")
    summary = json.loads(texts["balanced_train.summary.json"])

    assert summary["sampling_method"] == "class_target"
    assert summary["sampling_method_is_default"] is True
    # A records table gives its windows itself: the default's class-centred windows need rasters.
    assert summary["placement_is_default"] is False
    assert summary["weights"]["min_ess"] == 0.1
    assert summary["weights"]["class_target"]["target_share"] == "sqrt"
    # The default meets the sqrt target here, and its floor does not bind.
    target = summary["weights"]["class_target"]
    assert target["step_toward_target"] == 1.0 and target["notes"] == []
    assert summary["sampling"]["effective_sample_size_share"] > 0.1
    # Only the weights changed with the default: the grid and the statistics are those of the
    # table pinned when rank_max was the default.
    table = pd.read_csv(EXPECTED / "balanced_train.csv")
    before = pd.read_csv(EXPECTED / "balanced_train_rank_max.csv")
    pd.testing.assert_frame_equal(
        table.drop(columns="sampler_weight"), before.drop(columns="sampler_weight")
    )


def test_a_config_that_names_rank_max_gives_the_table_it_gave_before_the_default_changed(tmp_path):
    paths = write_demo_dataset(tmp_path / "demo")
    result = CliRunner().invoke(
        app, ["build-balanced-dataset", str(paths["config"]), "--set", "sampling_method=rank_max"]
    )

    assert result.exit_code == 0, result.output
    text = paths["table"].read_text(encoding="utf-8").replace(str(paths["table"].parent), "<OUT>")
    assert text == (EXPECTED / "balanced_train_rank_max.csv").read_text(encoding="utf-8")
    summary = json.loads((tmp_path / "demo" / "balanced_train.summary.json").read_text())
    assert summary["sampling_method"] == "rank_max"
    assert summary["sampling_method_is_default"] is False
    assert "weights: rank_max (power 1.0)" in result.output
    # Six patches share the largest weight: the label counts them.
    table = pd.read_csv(paths["table"])
    weights = table.loc[~table["excluded"], "sampler_weight"]
    tied = int((weights >= weights.max() * (1 - 1e-9)).sum())
    assert tied == 6
    assert summary["sampling"]["max_expected_repeats_patches"] == 6
    assert "largest expected repeats/epoch   2.14 (6 patches tie)" in result.output
