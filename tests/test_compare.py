"""`patchbalance compare`: paired runs on the demo data, their gains, resuming, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from compare_fixtures import EXAMPLES, tiny_configs
from patchbalance.cli import app
from patchbalance.demo import write_demo_dataset

runner = CliRunner()
TINY = ["--set", "seeds=2", "--set", "steps=2", "--set", "eval_every=1", "-q"]
# An arm that differs from the provided uniform baseline only in its name.
SAME_AS_UNIFORM = [
    "--set", "arms.uniform_again.build.sampling_method=composition_only",
    "--set", "arms.uniform_again.build.weights.power=0.0",
]  # fmt: skip


def metrics_at(run_dir: Path, step: int) -> pd.Series:
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return metrics.set_index("step").loc[step]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Run conf/examples/compare.yaml on fresh demo data laid out as in the repository."""
    root = tmp_path_factory.mktemp("repo")
    write_demo_dataset(root / "patchbalance-demo")
    examples = root / "conf" / "examples"
    examples.mkdir(parents=True)
    for name in ("compare.yaml", "compare_train.yaml"):
        shutil.copy(EXAMPLES / name, examples)
    result = runner.invoke(
        app, ["compare", str(examples / "compare.yaml"), *TINY, *SAME_AS_UNIFORM]
    )
    assert result.exit_code == 0, result.output
    out = root / "patchbalance-demo" / "compare"
    return out, json.loads((out / "results.json").read_text()), result.stdout


def test_the_example_compare_writes_per_seed_iou_and_gains_equal_to_the_runs_metrics(example):
    out, results, printed = example
    assert results["arms"] == ["uniform", "class_target", "rank_max", "uniform_again"]
    assert results["seeds"] == [42, 43]
    # The two rarest classes of the demo pool: building (about 2 %) and water.
    assert results["classes_of_interest"] == [3, 2]
    long = results["summary"]["long_tau0"]
    assert long["step"] == 2 and results["summary"]["short_tau0"]["step"] == 1
    for arm in results["arms"]:
        for c in ["0", "1", "2", "3", "miou"]:
            entry = long["arms"][arm][c]
            column = "miou" if c == "miou" else f"iou_{c}"
            own = {s: metrics_at(out / "runs" / arm / f"seed{s}", 2)[column] for s in (42, 43)}
            assert entry["per_seed_iou"] == pytest.approx({str(s): v for s, v in own.items()})
            if arm == "uniform":
                assert "gain_iou" not in entry
                continue
            base = {
                s: metrics_at(out / "runs" / "uniform" / f"seed{s}", 2)[column] for s in (42, 43)
            }
            gain = entry["gain_iou"]
            differences = [own[s] - base[s] for s in (42, 43)]
            assert gain["per_seed"] == pytest.approx(
                {"42": differences[0], "43": differences[1]}, nan_ok=True
            )
            assert gain["mean"] == pytest.approx(np.mean(differences))
            # Two seeds: mean ± t(0.975, 1) · |d1 - d2| / 2, t(0.975, 1) = 12.706.
            half = 12.706 * abs(differences[0] - differences[1]) / 2
            assert gain["low"] == pytest.approx(np.mean(differences) - half, rel=1e-4, abs=1e-12)
            assert gain["high"] == pytest.approx(np.mean(differences) + half, rel=1e-4, abs=1e-12)
    # Two seeds: everything is computed and written, but no arm is judged.
    assert not results["verdict"]["judged"]
    assert results["verdict"]["helps"] == results["verdict"]["does_not_help"] == []
    assert "too few seeds to judge (2; at least 5)" in printed.splitlines()
    # Where every run trained, as the training loop recorded it (the train config says cpu).
    assert {run["device"] for run in results["trained_on"].values()} == {"cpu"}
    assert len(results["trained_on"]) == 8
    for name in ("results.json", "results.md", "results.html", "runs.csv"):
        assert (out / name).is_file()


def test_the_sampling_figures_come_from_each_arms_table_before_training(example):
    _, results, _ = example
    sampling = results["sampling"]
    assert sampling["uniform"]["effective_sample_size_share"] == pytest.approx(1.0)
    share = {arm: sampling[arm]["class_pixel_share"]["3"]["weighted"] for arm in sampling}
    assert share["class_target"] > 1.5 * share["uniform"]
    assert sampling["uniform"]["n_drawable"] == sampling["class_target"]["n_drawable"] == 176


def test_two_arms_that_differ_only_in_name_give_identical_per_seed_results(example):
    out, results, _ = example
    for key in ("long_tau0", "short_tau0", "long_tau1"):
        arms = results["summary"][key]["arms"]
        for c in ["0", "1", "2", "3", "miou"]:
            assert arms["uniform_again"][c]["per_seed_iou"] == arms["uniform"][c]["per_seed_iou"]
            assert arms["uniform_again"][c]["gain_iou"]["mean"] == 0.0
    for seed in (42, 43):
        same = pd.read_csv(out / "runs" / "uniform_again" / f"seed{seed}" / "metrics.csv")
        base = pd.read_csv(out / "runs" / "uniform" / f"seed{seed}" / "metrics.csv")
        columns = [c for c in base.columns if c != "train_seconds"]
        pd.testing.assert_frame_equal(same[columns], base[columns])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


def test_an_interrupted_compare_retrains_only_the_unfinished_run(tmp_path, demo):
    config = tiny_configs(tmp_path, demo)
    first = runner.invoke(app, ["compare", str(config), "-q"])
    assert first.exit_code == 0, first.output
    runs = tmp_path / "out" / "runs"
    finished = sorted(runs.glob("*/seed*/metrics.csv"))
    assert len(finished) == 4
    before = {path: path.stat().st_mtime_ns for path in finished}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # A run killed mid-training: one validation written, no completion marker.
    killed = runs / "rank_max" / "seed43"
    (killed / "done.json").unlink()
    pd.read_csv(killed / "metrics.csv").iloc[:1].to_csv(killed / "metrics.csv", index=False)

    second = runner.invoke(app, ["compare", str(config), "-q"])

    assert second.exit_code == 0, second.output
    assert "1 runs trained, 3 reused" in second.stdout
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["trained"] == ["rank_max/seed43"]
    for path, mtime in before.items():
        changed = path.stat().st_mtime_ns != mtime
        assert changed == (path.parent == killed), path
    assert len(pd.read_csv(killed / "metrics.csv")) == 2
    # The retrained run gives the numbers the first try gave: the seeds fix every draw.
    assert again["summary"] == results["summary"]
    # The builds were reused, not redone.
    assert "building its table" not in second.stderr


def test_two_trainings_at_once_give_the_runs_that_one_at_a_time_gives(tmp_path, demo):
    results = {}
    for jobs in (1, 2):
        root = tmp_path / f"jobs{jobs}"
        root.mkdir()
        config = tiny_configs(root, demo, jobs=jobs)
        result = runner.invoke(app, ["compare", str(config), "-q"])
        assert result.exit_code == 0, result.output
        results[jobs] = json.loads((root / "out" / "results.json").read_text())
    assert results[2]["summary"] == results[1]["summary"]
    assert len(results[2]["trained"]) == 4


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        (
            {"arms": {"x": {"bild": {}}}},
            "unknown key 'arms.x.bild'; an arm takes build, train and coreset",
        ),
        (
            {"arms": {"x": {"build": {"weights": {"powr": 0.5}}}}},
            "arm 'x': arms.x.build: unknown key 'weights.powr'; did you mean 'power'?",
        ),
        (
            {"arms": {"x": {"train": {"hyperparameters": {"bach_size": 2}}}}},
            "arm 'x': arms.x.train: unknown key 'hyperparameters.bach_size'",
        ),
        ({"baseline": "nope"}, "baseline 'nope' is not an arm"),
        ({"seeds": 1}, "'seeds': Input should be greater than or equal to 2"),
        ({"steps": 3, "eval_every": 2}, "must be a multiple of eval_every"),
    ],
)
def test_bad_compare_input_is_one_line_and_exit_2_before_anything_runs(
    tmp_path, demo, compare, message
):
    config = tiny_configs(tmp_path, demo, **compare)
    result = runner.invoke(app, ["compare", str(config)])
    assert result.exit_code == 2, result.output
    errors = error_lines(result)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_train_config_without_val_dataset_is_one_line_and_exit_2(tmp_path, demo):
    config = tiny_configs(tmp_path, demo)
    train = yaml.safe_load((tmp_path / "train.yaml").read_text())
    del train["val_dataset"]
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    result = runner.invoke(app, ["compare", str(config)])
    assert result.exit_code == 2, result.output
    errors = error_lines(result)
    assert len(errors) == 1 and "add a val_dataset block" in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_builds_nothing(tmp_path, demo):
    config = tiny_configs(tmp_path, demo)
    result = runner.invoke(app, ["compare", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "2 arms x 2 seeds = 4 trainings of 2 steps" in result.stdout
    assert "seeds: 42, 43; baseline: uniform" in result.stdout
    assert "rank_max: build: {'sampling_method': 'rank_max'}" in result.stdout
    assert not (tmp_path / "out").exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None and not os.environ.get("CI"),
    reason="chromium is not installed (CI installs it with .ci/chromium.sh)",
)
def test_a_headless_browser_renders_the_comparison_page_with_its_plots(example, tmp_path):
    out, _, _ = example
    pytest.importorskip("matplotlib")
    screenshot = tmp_path / "screenshot.png"
    subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2600",
            f"--screenshot={screenshot}", (out / "results.html").as_uri(),
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    shot = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert shot.shape[:2] == (2600, 1200)
    # tab10 blue (the baseline's curve and bars) and orange (the first arm's interval bars)
    # come only from the embedded plots.
    blue = np.abs(shot - [0x1F, 0x77, 0xB4]).sum(axis=2) < 30
    orange = np.abs(shot - [0xFF, 0x7F, 0x0E]).sum(axis=2) < 30
    assert blue.sum() > 2000 and orange.sum() > 200


def test_the_verdict_reads_intervals_at_the_printed_precision():
    from patchbalance.compare.statistics import verdict

    def gain(low, high):
        mean = (low + high) / 2
        return {"mean": mean, "low": low, "high": high, "n": 5, "wins": 5, "seeds_to_resolve": 9}

    summary = {
        "long_tau0": {
            "arms": {
                # A rare class moved from 0 to 0.001 % IoU: an interval of [+0.0, +0.0] points.
                "tiny": {"3": {"gain_iou": gain(1e-5, 2e-5)}, "miou": {"gain_iou": gain(0, 0.01)}},
                "helps": {"3": {"gain_iou": gain(0.02, 0.05)}, "miou": {"gain_iou": gain(-0.01, 0.01)}},
                "lowers": {"3": {"gain_iou": gain(0.02, 0.05)}, "miou": {"gain_iou": gain(-0.03, -0.002)}},
                "at_zero": {"3": {"gain_iou": gain(0.02, 0.05)}, "miou": {"gain_iou": gain(-0.03, -0.0004)}},
            }
        }
    }  # fmt: skip
    judged = verdict(summary, ["base", "tiny", "helps", "lowers", "at_zero"], "base", [3])
    assert judged["helps"] == ["helps", "at_zero"]
    assert judged["does_not_help"] == ["tiny", "lowers"]
    assert judged["arms"]["lowers"]["lowers_miou"] and not judged["arms"]["at_zero"]["lowers_miou"]


def test_schedule_arms_train_in_compare_and_write_their_drawn_shares(tmp_path, demo):
    arms = {
        "anneal": {"train": {"sampler_schedule": {"name": "anneal", "start": 0.5}}},
        "adaptive": {"train": {"sampler_schedule": {"name": "adaptive", "every": 1}}},
    }
    config = tiny_configs(tmp_path, demo, arms=arms, seeds=2, steps=4, eval_every=2)
    result = runner.invoke(app, ["compare", str(config), "-q"])
    assert result.exit_code == 0, result.output
    for arm in ("uniform", "anneal", "adaptive"):
        metrics = pd.read_csv(tmp_path / "out" / "runs" / arm / "seed42" / "metrics.csv")
        shares = metrics.filter(like="drawn_share_").to_numpy()
        assert shares.shape == (2, 4) and np.allclose(shares.sum(axis=1), 1.0)
