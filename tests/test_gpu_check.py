"""The GPU check script (bench/gpu/run.sh) run on the CPU at tiny sizes, so it keeps working
between GPU runs: every step, the figures beside their baselines, the device checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "gpu" / "run.sh"

pytest.importorskip("faiss")
pytest.importorskip("segmentation_models_pytorch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        ["bash", str(RUN), str(out / "out"), "--cpu", "--small", "--work", str(out / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    report = json.loads((out / "out" / "gpu.json").read_text(encoding="utf-8"))
    return completed, report, out


def test_cpu_run_exits_zero_and_records_every_step_as_ok(check):
    completed, report, _ = check
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert report["ok"] is True and report["problems"] == []
    assert report["device_under_test"] == "cpu" and report["small"] is True
    assert list(report["steps"]) == [
        "data",
        "embeddings_vit_s14",
        "embeddings_vit_b14",
        "knn",
        "coreset",
        "train",
    ]
    assert {step["status"] for step in report["steps"].values()} == {"ok"}
    assert report["steps"]["data"]["patches"] == 128


def test_every_device_check_saw_the_cpu(check):
    _, report, _ = check
    seen = {
        f"{name}.{check}": result["seen"]
        for name, step in report["steps"].items()
        for check, result in step.get("device_checks", {}).items()
    }
    assert seen == {
        "embeddings_vit_s14.embeddings": "cpu",
        "embeddings_vit_s14.uniqueness_exact": "cpu",
        "embeddings_vit_b14.embeddings": "cpu",
        "embeddings_vit_b14.uniqueness_exact": "cpu",
        "knn.uniqueness_exact": "cpu",
        "coreset.cb": "numpy",
        "train.train_fp32": "cpu",
        "train.train_bf16": "cpu",
        "train.train_bf16_autocast": "bfloat16",
    }


def test_embeddings_figures_sit_beside_the_forward_only_baseline(check):
    _, report, _ = check
    for key in ("embeddings_vit_s14", "embeddings_vit_b14"):
        step = report["steps"][key]
        assert step["end_to_end_patches_per_second"] > 0
        assert step["forward_only_patches_per_second"] == max(step["forward_only_runs"]) > 0
        assert step["ratio"] == pytest.approx(
            step["end_to_end_patches_per_second"] / step["forward_only_patches_per_second"],
            abs=1e-3,
        )
        assert step["precision"] == "bf16" and step["autocast_dtype"] == "bfloat16"
        # Every active patch was computed (the mosaic's nodata margin excludes a few).
        assert 0 < step["patches"] <= 128


def test_knn_and_coreset_agree_with_their_baselines(check):
    _, report, _ = check
    knn = report["steps"]["knn"]
    assert knn["neighbours_identical"] is True and knn["rows_differing_beyond_ties"] == 0
    assert knn["exact_seconds"] > 0 and knn["faiss_seconds"] > 0
    assert knn["faiss"].startswith("faiss-cpu") and "IndexFlatIP" in knn["faiss"]
    coreset = report["steps"]["coreset"]
    for method in ("cb", "fd"):
        assert coreset[method]["same_picks"] is True
        assert coreset[method]["picks"] == 200  # 10 % of 2,000
        assert coreset[method]["device_seconds"] > 0 and coreset[method]["cpu_seconds"] > 0


def test_train_compares_bf16_with_fp32_and_writes_metrics(check):
    _, report, out = check
    train = report["steps"]["train"]
    assert train["metrics_written"] is True
    for precision in ("bf16", "fp32"):
        run = train[precision]
        assert run["steps"] == 6 and run["metrics_rows"] == 2 and run["steps_per_second"] > 0
    assert train["fp32"]["trained_on"] == {
        "device": "cpu",
        "logits_dtype": "float32",
        "autocast_dtype": None,
    }
    assert train["bf16"]["trained_on"]["logits_dtype"] == "bfloat16"
    assert (out / "work" / "train_bf16" / "metrics.csv").is_file()


def test_gpu_md_shows_each_figure_and_the_verdict(check):
    _, _, out = check
    text = (out / "out" / "gpu.md").read_text(encoding="utf-8")
    for phrase in ("forward-only", "IndexFlatIP", "CoreSet cb", "CoreSet fd", "steps/s fp32"):
        assert phrase in text
    assert "Verdict" in text and "problems" not in text.split("Verdict", 1)[1].lower()


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """Write a wheel file holding only its METADATA (all that the install plan reads)."""
    import zipfile

    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    metadata = [f"Name: {name}", f"Version: {version}"] + [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(metadata)
        )
    return path


def test_install_plan_adds_a_newer_dependency_only_where_the_machine_has_an_older_one(tmp_path):
    sys.path.insert(0, str(REPO / "bench" / "gpu"))
    try:
        import setup_env
    finally:
        sys.path.remove(str(REPO / "bench" / "gpu"))
    _fake_wheel(
        tmp_path, "pydantic", "2.14.4", ["pydantic-core==2.50.5", "typing-extensions>=4.16"]
    )
    _fake_wheel(tmp_path, "pydantic-core", "2.50.5", ["typing-extensions>=4.16"])
    _fake_wheel(tmp_path, "typing-extensions", "4.16.0", [])
    _fake_wheel(
        tmp_path, "omegaconf", "2.3.1", ["PyYAML>=5.1.0", 'dataclasses; python_version == "3.6"']
    )
    wheels = setup_env.wheel_folder(tmp_path)
    old_machine = {"typing-extensions": "4.12.2", "pyyaml": "6.0.2"}
    files, unmet = setup_env.plan_install(["pydantic", "pydantic-core"], wheels, old_machine.get)
    assert files == [
        "pydantic-2.14.4-py3-none-any.whl",
        "pydantic_core-2.50.5-py3-none-any.whl",
        "typing_extensions-4.16.0-py3-none-any.whl",
    ]
    assert unmet == []
    new_machine = {"typing-extensions": "4.16.0", "pyyaml": "6.0.2"}
    files, _ = setup_env.plan_install(["pydantic", "pydantic-core"], wheels, new_machine.get)
    assert "typing_extensions-4.16.0-py3-none-any.whl" not in files
    # A requirement neither on the machine nor among the wheels is reported, not ignored.
    files, unmet = setup_env.plan_install(["omegaconf", "hydra-core"], wheels, {}.get)
    assert files == ["omegaconf-2.3.1-py3-none-any.whl"]
    assert unmet == [
        f"hydra-core: no wheel in {setup_env.WHEELS}",
        "omegaconf needs PyYAML>=5.1.0, the machine has none",
    ]
