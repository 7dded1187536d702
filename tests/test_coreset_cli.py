"""`patchbalance select-coreset` and the example configuration, on the demo data."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from patchbalance.balancing.pipeline import run_build
from patchbalance.cli import app
from patchbalance.config import load_config
from patchbalance.demo import write_demo_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "conf" / "examples"
runner = CliRunner()


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory) -> Path:
    """A copy of the repository layout: conf/examples/coreset_local.yaml and the built demo table."""
    root = tmp_path_factory.mktemp("project")
    paths = write_demo_dataset(root / "patchbalance-demo")
    run_build(load_config(paths["config"]), progress=False)
    examples = root / "conf" / "examples"
    examples.mkdir(parents=True)
    shutil.copy(EXAMPLES / "coreset_local.yaml", examples)
    return root


def _invoke(*args: str):
    return runner.invoke(app, ["select-coreset", *[str(a) for a in args]])


def _one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]
    return lines[0]


def test_the_coreset_example_config_runs_unchanged_on_the_demo_data(demo_project):
    config = demo_project / "conf" / "examples" / "coreset_local.yaml"
    result = _invoke(config, "-q")
    assert result.exit_code == 0, result.output
    demo = demo_project / "patchbalance-demo"
    table = pd.read_csv(demo / "balanced_train.csv")
    out = pd.read_csv(demo / "coreset_train.csv")
    assert len(out) == len(table)
    pool = ~table["excluded"].to_numpy() & ~table["has_low_entropy"].to_numpy()
    assert out["coreset_selected"].sum() == int(np.floor(0.3 * pool.sum() + 0.5))
    assert not out.loc[~pool, "coreset_selected"].any()
    weights = out["sampler_weight"].to_numpy()
    chosen = out["coreset_selected"].to_numpy()
    assert np.all(weights[~chosen] == 0)
    assert weights[chosen].mean() == pytest.approx(1.0)
    summary = json.loads((demo / "coreset_train.summary.json").read_text())
    assert summary["method"] == "cb"
    assert summary["n_selected"] == int(chosen.sum())
    # The table and its summary are one set: the summary holds the table's SHA-256.
    table_bytes = (demo / "coreset_train.csv").read_bytes()
    assert summary["output_sha256"] == {"table": hashlib.sha256(table_bytes).hexdigest()}
    # cb evens the class mix: the rare class 3 has a larger pixel share in the CoreSet.
    rare = summary["class_pixel_share"]["3"]
    assert rare["coreset"] > rare["pool"]
    assert sum(c["selected"] for c in summary["selected_per_cluster"].values()) == chosen.sum()
    assert "class pixel share" in result.stdout
    assert "selected per freq_cluster_id" in result.stdout


@pytest.mark.parametrize("method", ["lc", "cb"])
def test_select_coreset_writes_parquet_when_the_output_name_says_so(demo_project, tmp_path, method):
    config = demo_project / "conf" / "examples" / "coreset_local.yaml"
    target = tmp_path / "subset.parquet"
    result = _invoke(
        config, "--set", f"method={method}", "--set", f"output_csv_path={target}", "-q"
    )
    assert result.exit_code == 0, result.output
    out = pd.read_parquet(target)
    assert out["coreset_selected"].dtype == bool
    assert (tmp_path / "subset.summary.json").exists()


def test_a_budget_larger_than_the_pool_exits_2_with_one_line(demo_project, tmp_path):
    config = demo_project / "conf" / "examples" / "coreset_local.yaml"
    result = _invoke(
        config,
        "--set",
        "budget=100000",
        "--set",
        "budget_mode=count",
        "--set",
        f"output_csv_path={tmp_path / 'never.csv'}",
    )
    _one_line_error(result, "budget 100000 is larger than the pool of")
    assert not (tmp_path / "never.csv").exists()


def test_an_embedding_method_without_embeddings_exits_2(demo_project, tmp_path):
    config = demo_project / "conf" / "examples" / "coreset_local.yaml"
    result = _invoke(
        config, "--set", "method=fd", "--set", f"output_csv_path={tmp_path / 'never.csv'}"
    )
    _one_line_error(result, "method fd needs embeddings")


def test_dry_run_prints_the_plan_and_writes_nothing(demo_project, tmp_path):
    config = demo_project / "conf" / "examples" / "coreset_local.yaml"
    target = tmp_path / "never.csv"
    result = _invoke(config, "--dry-run", "--set", f"output_csv_path={target}")
    assert result.exit_code == 0, result.output
    assert "plan: CoreSet method cb" in result.stdout
    assert "would write" in result.stdout
    assert not target.exists()


def test_a_missing_input_table_exits_2(tmp_path):
    config = tmp_path / "coreset.yaml"
    config.write_text("coreset:\n  input_csv_path: nowhere.csv\n  output_csv_path: out.csv\n")
    _one_line_error(_invoke(config), "nowhere.csv: table not found")


def test_summary_path_is_honoured_and_no_temporary_files_are_left(demo_project, tmp_path):
    config = demo_project / "conf" / "examples" / "coreset_local.yaml"
    target = tmp_path / "out" / "subset.csv"
    summary = tmp_path / "figures.json"
    result = _invoke(
        config,
        "--set",
        f"output_csv_path={target}",
        "--set",
        f"summary_path={summary}",
        "--set",
        "sampler_weights=uniform",
        "-q",
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(summary.read_text())
    assert figures["output"] == str(target)
    assert figures["sampler_weights"] == "uniform"
    assert sorted(p.name for p in target.parent.iterdir()) == ["subset.csv"]
    out = pd.read_csv(target)
    np.testing.assert_array_equal(out.loc[out["coreset_selected"], "sampler_weight"], 1.0)


def test_select_coreset_resolves_and_checks_its_configuration_once(demo_project, monkeypatch):
    import patchbalance.coreset.config as coreset_config

    calls = []
    real = coreset_config.check_coreset_files
    monkeypatch.setattr(
        coreset_config, "check_coreset_files", lambda config: calls.append(1) or real(config)
    )
    result = _invoke(demo_project / "conf" / "examples" / "coreset_local.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
