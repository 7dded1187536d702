"""`bench/evidence_pairs.py`: gains recomputed from an evidence folder's runs, as Markdown."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "evidence_pairs.py"


def load_pairs():
    spec = importlib.util.spec_from_file_location("evidence_pairs", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_work(work: Path) -> None:
    """Write runs.csv and results.json: classes 0, 1 and 2 (of interest), three seeds."""
    gains = {"0": [-0.01, -0.01, -0.01], "1": [-0.01, -0.01, -0.01], "2": [0.01, 0.02, 0.03]}
    base = {"0": 0.6, "1": 0.5, "2": 0.1}
    rows = []
    for step in (100, 200, 300):
        for j, seed in enumerate((42, 43, 44)):
            for arm in ("uniform", "weighted"):
                iou = {c: v + (gains[c][j] if arm == "weighted" else 0.0) for c, v in base.items()}
                iou["miou"] = sum(iou.values()) / 3
                rows += [
                    {"method": arm, "seed": seed, "step": step, "tau": 0.0, "class": c,
                     "iou": v, "precision": v, "recall": v}
                    for c, v in iou.items()
                ]  # fmt: skip
    pd.DataFrame(rows).to_csv(work / "runs.csv", index=False)
    names = {"0": "Background", "1": "Grass", "2": "Vehicle"}
    results = {"baseline": "uniform", "rarest_classes": [2], "class_names": names}
    (work / "results.json").write_text(json.dumps(results))


def test_the_gains_are_student_t_intervals_with_group_rows_in_markdown(tmp_path, capsys):
    write_work(tmp_path)
    load_pairs().main([str(tmp_path), "--pair", "uniform:weighted"])
    printed = capsys.readouterr().out
    assert "| A over B | Vehicle | mIoU | interest | rest |" in printed
    # Vehicle: gains 1, 2, 3 points: mean 2, s 1, t(0.975, 2) = 4.303: 2 ± 2.48.
    # rest (Background and Grass, averaged per seed): -1 point on every seed, no spread.
    row = next(line for line in printed.splitlines() if line.startswith("| weighted over"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "+2.0 [-0.5, +4.5] (3/3)"
    assert cells[3] == "+2.0 [-0.5, +4.5] (3/3)"
    assert cells[4] == "-1.0 [-1.0, -1.0] (0/3)"
    # 4 seeds: t(0.975, 3) = 3.182, 3.182 * 1 / 2 = 1.59 < 2; 3 seeds: 2.48 > 2.
    assert "Vehicle about 4" in printed
    reverse = next(line for line in printed.splitlines() if line.startswith("| uniform over"))
    assert "-2.0 [-4.5, +0.5] (0/3)" in reverse
    assert "still rising" not in printed and printed.count("plateaued") == 2


def test_every_class_gives_a_column_per_class_and_a_missing_folder_is_one_line(tmp_path, capsys):
    write_work(tmp_path)
    load_pairs().main([str(tmp_path), "--every-class"])
    printed = capsys.readouterr().out
    assert "| A over B | Background | Grass | Vehicle | mIoU | interest | rest |" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| weighted over"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == cells[2] == "-1.0 [-1.0, -1.0] (0/3)"  # Background, Grass
    assert cells[3] == "+2.0 [-0.5, +4.5] (3/3)"  # Vehicle

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        load_pairs().main([str(empty)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "runs.csv or results.json" in error
    assert len(error.splitlines()) == 1
