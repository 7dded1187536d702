"""The per-raster stages on Dask (SPEC §10): real schedulers and worker processes, no mocks.

A `dask scheduler` and `dask worker` processes are started on 127.0.0.1 at free ports; the
tables they build must be byte-identical to the in-process build, also when a worker is killed
with SIGKILL in the middle of the run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

pytest.importorskip("distributed")

from distributed import Client  # noqa: E402

from patchbalance import compute  # noqa: E402
from patchbalance.balancing import stats  # noqa: E402
from patchbalance.balancing.pipeline import run_build  # noqa: E402
from patchbalance.config import config_from_mapping, load_config  # noqa: E402
from patchbalance.demo import write_demo_dataset  # noqa: E402
from patchbalance.errors import ConfigError, InputError  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def dask_cluster(log_dir: Path, n_workers: int = 2):
    """Start a real `dask scheduler` and `n_workers` `dask worker` processes; stop them after.

    Yields:
        The scheduler address and the worker processes (each a single worker, no nanny, so
        that killing one kills that worker).
    """
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    started: list[subprocess.Popen] = []

    def start(arguments: list[str], name: str) -> subprocess.Popen:
        log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, "-m", *arguments], stdout=log, stderr=log)
        started.append(process)
        return process

    try:
        start(
            ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--no-dashboard"],
            "scheduler",
        )  # fmt: skip
        workers = [
            start(
                [
                    "distributed.cli.dask_worker",
                    address,
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                    "--name",
                    f"w{i}",
                ],
                f"worker{i}",
            )  # fmt: skip
            for i in range(n_workers)
        ]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=60)
        yield address, workers
    finally:
        for process in reversed(started):
            if process.poll() is None:
                process.terminate()
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        assert all(process.poll() is not None for process in started)


def table_text(config) -> str:
    return run_build(config, write=False).table.to_csv(index=False, lineterminator="\n")


def demo_config(folder: Path, overrides: list[str] = ()):
    return load_config(write_demo_dataset(folder)["config"], list(overrides))


def dense_grid_config(folder: Path, scheduler: str) -> dict:
    """Return a rasters-source config: 64 px windows every 8 px over the three demo scenes."""
    write_demo_dataset(folder)
    pairs = [
        {"image_path": str(folder / "images" / f"scene_{i}.tif"),
         "mask_path": str(folder / "masks" / f"scene_{i}.tif")}
        for i in (1, 2, 3)
    ]  # fmt: skip
    return {
        "input": {"rasters": pairs, "patch_size": 64, "stride": 8},
        "exclusion": {"exclude_black_border": True},
        "clustering": {"k_selection": "fixed", "k": 4},
        "compute": {"scheduler": scheduler},
        "output": {"csv_path": str(folder / "out.csv")},
    }


def test_a_running_scheduler_builds_the_same_table_as_the_in_process_build(tmp_path):
    in_process = table_text(demo_config(tmp_path / "a", ["compute.scheduler=synchronous"]))
    with dask_cluster(tmp_path) as (address, _):
        config = demo_config(tmp_path / "b", [f"compute.scheduler={address}"])
        result = run_build(config, write=False)
        on_cluster = result.table.to_csv(index=False, lineterminator="\n")
    # The demo writes the same files under another folder; the paths are the only difference.
    assert on_cluster.replace(str(tmp_path / "b"), "<D>") == in_process.replace(
        str(tmp_path / "a"), "<D>"
    )
    assert result.summary["compute"]["scheduler"] == address
    assert result.summary["compute"]["workers"] == 2
    assert result.summary["timings_s"]["mask_statistics"] > 0


def test_a_worker_killed_during_the_build_loses_nothing(tmp_path, monkeypatch):
    # Small partitions, so that the build is many tasks and one is running when the kill comes.
    monkeypatch.setattr(stats, "CLUSTER_PARTITION_WINDOWS", 256)
    mapping = dense_grid_config(tmp_path, "synchronous")
    expected = table_text(config_from_mapping(mapping))
    with dask_cluster(tmp_path) as (address, workers):
        mapping["compute"]["scheduler"] = address
        outcome: dict = {}

        def build() -> None:
            try:
                outcome["table"] = table_text(config_from_mapping(mapping))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

        runner = threading.Thread(target=build)
        runner.start()
        with Client(address) as watcher:
            deadline = time.monotonic() + 60
            busy = {}
            while not busy and time.monotonic() < deadline:
                busy = {w: keys for w, keys in watcher.processing().items() if keys}
                time.sleep(0.02)
            assert busy, "no task ever ran on the workers"
            victim_address = sorted(busy)[0]
            pid = watcher.run(os.getpid, workers=[victim_address])[victim_address]
            os.kill(pid, signal.SIGKILL)
            runner.join(timeout=180)
            assert not runner.is_alive()
            assert len(watcher.scheduler_info()["workers"]) == 1
        killed = [w for w in workers if w.pid == pid]
        assert killed and killed[0].wait(timeout=10) == -signal.SIGKILL
    assert "error" not in outcome, outcome.get("error")
    assert outcome["table"] == expected


def session_processes(session: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def test_the_embedded_cluster_starts_and_stops_its_own_processes(tmp_path):
    config = write_demo_dataset(tmp_path)["config"]
    command = [
        str(Path(sys.executable).with_name("patchbalance")), "build-balanced-dataset",
        str(config), "--scheduler", "auto", "--set", "compute.cluster_above=100",
        "--set", "compute.workers=2", "-q",
    ]  # fmt: skip
    # Its own session: every process the build starts (scheduler, nannies, workers, helpers)
    # belongs to it, whatever its parent becomes.
    build = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, text=True)
    output, _ = build.communicate(timeout=300)
    assert build.returncode == 0, output
    deadline = time.monotonic() + 20
    while session_processes(build.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session_processes(build.pid), "processes left behind"
    summary = json.loads((tmp_path / "balanced_train.summary.json").read_text())
    assert summary["compute"]["scheduler"] == "local"
    assert summary["compute"]["workers"] == 2
    assert summary["compute"]["threads_per_worker"] == [1]
    in_process = run_build(demo_config(tmp_path / "again", ["compute.scheduler=threads"]))
    text = (tmp_path / "balanced_train.csv").read_text()
    expected = (tmp_path / "again" / "balanced_train.csv").read_text()
    assert text.replace(str(tmp_path), "<D>") == expected.replace(str(tmp_path / "again"), "<D>")
    assert len(in_process.table) == summary["n_patches"]


def test_auto_stays_in_process_up_to_cluster_above(tmp_path):
    result = run_build(demo_config(tmp_path, ["compute.cluster_above=100000"]), write=False)
    assert result.summary["compute"] == {"scheduler": "threads", "workers": os.cpu_count()}


def test_an_unknown_scheduler_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"compute\.scheduler.*tcp://host:8786"):
        demo_config(tmp_path, ["compute.scheduler=cluster"])


def test_an_unreachable_scheduler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(compute, "CONNECT_TIMEOUT_S", 2)
    config = demo_config(tmp_path, [f"compute.scheduler=tcp://127.0.0.1:{free_port()}"])
    with pytest.raises(InputError, match="cannot reach the Dask scheduler at tcp://127.0.0.1"):
        run_build(config, write=False)


def test_the_class_centred_search_on_a_local_cluster_finds_the_same_windows(tmp_path):
    mapping = dense_grid_config(tmp_path, "synchronous")
    mapping["input"].update(
        {"stride": 64, "placement": "class_centred", "rare_classes": [3], "max_overlap": 0.3}
    )
    here = run_build(config_from_mapping(mapping), write=False)
    mapping["compute"] = {"scheduler": "local", "workers": 2}
    there = run_build(config_from_mapping(mapping), write=False)
    assert there.summary["compute"]["scheduler"] == "local"
    assert (there.table["placement"] != "grid").sum() > 0
    assert there.summary["source"]["placement"] == here.summary["source"]["placement"]
    assert there.table.to_csv(index=False) == here.table.to_csv(index=False)


def test_a_refused_scheduler_port_fails_within_seconds(tmp_path):
    # The default wait of 30 s is kept: the refusal itself must end the wait.
    config = demo_config(tmp_path, [f"compute.scheduler=tcp://127.0.0.1:{free_port()}"])
    start = time.monotonic()
    with pytest.raises(InputError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1"):
        run_build(config, write=False)
    assert time.monotonic() - start < compute.PROBE_TIMEOUT_S


@pytest.mark.parametrize("dashboard", [False, True])
def test_a_dashboard_link_is_given_only_when_the_scheduler_has_one(dashboard):
    from distributed import LocalCluster

    pytest.importorskip("bokeh")
    # Without a dashboard the scheduler still serves HTTP on its port (as `dask scheduler
    # --no-dashboard` does), and distributed still makes a link to it.
    started = LocalCluster(
        n_workers=1,
        processes=False,
        dashboard_address=":0",
        scheduler_kwargs={"dashboard": dashboard},
    )
    with started as cluster:
        settings = config_from_mapping(
            {
                "input": {"records_path": "r.csv"},
                "compute": {"scheduler": cluster.scheduler_address},
                "output": {"csv_path": "t.csv"},
            }
        ).compute
        with compute.open_compute(settings, 10, 1) as running:
            notes = running.describe()
    if dashboard:
        assert notes["dashboard"].startswith("http://")
    else:
        assert "dashboard" not in notes
