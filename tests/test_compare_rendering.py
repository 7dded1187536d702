"""The results of `patchbalance compare` as Markdown and HTML: names as text, one set of files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from patchbalance.cli import app
from patchbalance.compare.results import markdown, verdict_text
from patchbalance.compare.statistics import class_groups, summarise, verdict
from patchbalance.demo import write_demo_dataset
from test_compare import tiny_configs

NAMES = {"0": "soil", "1": "<b>grass</b>", "2": "wa|ter", "3": "$x^$ building"}
SEEDS = [42, 43, 44, 45, 46]


def synthetic_results(arms: list[str], seeds: list[int]) -> dict:
    """Return a results mapping like compare's, from made-up per-seed IoU of four classes."""
    rng = np.random.default_rng(7)
    rows = []
    for step in (1, 2, 3):
        for arm in arms:
            for seed in seeds:
                for tau in (0.0, 1.0):
                    iou = {str(c): 0.2 + 0.1 * c + 0.05 * (arm != arms[0]) + rng.normal(0, 0.01)
                           for c in range(4)}  # fmt: skip
                    iou["miou"] = float(np.mean(list(iou.values())))
                    rows += [
                        {"arm": arm, "seed": seed, "step": step, "tau": tau, "class": c,
                         "iou": v, "precision": v, "recall": v}
                        for c, v in iou.items()
                    ]  # fmt: skip
    runs = pd.DataFrame(rows)
    interest = [3, 2]
    summary = summarise(runs, arms, arms[0], {"short": 1, "long": 3}, interest)
    shares = {str(c): {"uniform": 0.25, "weighted": 0.25} for c in range(4)}
    sampling = {
        arm: {"class_pixel_share": shares, "effective_sample_size_share": 1.0,
              "effective_sample_size": 10.0, "expected_distinct_per_epoch": 6.0,
              "max_expected_repeats_per_epoch": 1.0, "n_drawable": 10, "starved_classes": [3]}
        for arm in arms
    }  # fmt: skip
    curve = [{"step": s, "mean": 0.4, "std": 0.01} for s in (1, 2, 3)]
    return {
        "baseline": arms[0], "arms": arms, "seeds": seeds, "budgets": {"short": 1, "long": 3},
        "classes": [0, 1, 2, 3], "class_names": NAMES, "classes_of_interest": interest,
        "groups": class_groups([0, 1, 2, 3], interest), "sampling": sampling,
        "summary": summary, "learning_curves": {arm: curve for arm in arms},
        "plateau": {arm: {"note": "plateaued"} for arm in arms},
        "verdict": verdict(summary, arms, arms[0], interest),
    }  # fmt: skip


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_markdown_escapes_html_and_pipes_in_class_and_arm_names():
    text = markdown(synthetic_results(["uniform", "a|b"], SEEDS))
    assert "&lt;b&gt;grass&lt;/b&gt;" in text and "<b>" not in text
    assert "wa\\|ter" in text and "a\\|b" in text and "\\$x^\\$ building" in text
    # Every row of a table has as many unescaped cell separators as its header.
    lines = text.splitlines()
    for j, line in enumerate(lines):
        if line.startswith("|") and not lines[j - 1].startswith("|"):
            count = line.replace("\\|", "").count("|")
            k = j
            while k < len(lines) and lines[k].startswith("|"):
                assert lines[k].replace("\\|", "").count("|") == count, lines[k]
                k += 1


def test_tables_carry_interest_and_rest_rows_with_intervals():
    results = synthetic_results(["uniform", "class_target"], SEEDS)
    text = markdown(results)
    header = next(
        row for row in table_rows(text) if row.startswith("| arm | soil") and "mIoU" in row
    )
    assert header.endswith("| mIoU | interest | rest |")
    rest = results["summary"]["long_tau0"]["arms"]["class_target"]["rest"]["gain_iou"]
    assert rest["n"] == 5 and rest["low"] < rest["mean"] < rest["high"]
    assert any(row.startswith("| rest |") for row in table_rows(text))


def test_the_verdict_on_two_seeds_says_too_few_seeds_and_what_would_resolve():
    results = synthetic_results(["uniform", "class_target"], SEEDS[:2])
    lines = verdict_text(results).splitlines()
    assert lines[-1] == "too few seeds to judge (2; at least 5)"
    assert "not judged" in lines[1]


def test_the_page_draws_a_dollar_in_a_class_name_as_plain_text():
    pytest.importorskip("matplotlib")
    from patchbalance.compare.html import render_compare_html

    page = render_compare_html(synthetic_results(["uniform", "a|b"], SEEDS))
    assert "$x^$ building" in page and "&lt;b&gt;grass&lt;/b&gt;" in page


@pytest.fixture(scope="module")
def dollar_compare(tmp_path_factory):
    """Run a tiny compare whose class names hold `$`, HTML and `|`; return its folder."""
    root = tmp_path_factory.mktemp("dollar")
    demo = write_demo_dataset(root / "demo")
    tiny_configs(root, demo, steps=1, class_names={int(k): v for k, v in NAMES.items()})
    result = CliRunner().invoke(app, ["compare", str(root / "compare.yaml"), "-q"])
    return root, result


def test_a_compare_with_a_dollar_in_a_class_name_writes_one_consistent_set(dollar_compare):
    root, result = dollar_compare
    assert result.exit_code == 0, result.output
    out = root / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["class_names"]["3"] == "$x^$ building"
    assert (out / "results.md").read_text() == markdown(results)
    assert "$x^$ building" in (out / "results.html").read_text()
    assert "too few seeds to judge (2; at least 5)" in result.stdout


def test_a_page_that_fails_to_render_leaves_the_previous_set(dollar_compare, monkeypatch):
    root, _ = dollar_compare
    out = root / "out"
    before = {name: (out / name).read_bytes() for name in ("results.json", "results.md",
                                                           "results.html")}  # fmt: skip

    def broken(results):
        raise ValueError("the page cannot be drawn")

    monkeypatch.setattr("patchbalance.compare.html.render_compare_html", broken)
    result = CliRunner().invoke(app, ["compare", str(root / "compare.yaml"), "-q"])
    assert result.exit_code == 1
    assert {name: (out / name).read_bytes() for name in before} == before
