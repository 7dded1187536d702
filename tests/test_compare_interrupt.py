"""An interrupted `compare` (Ctrl-C, `kill -INT`): the running trainings finish, no queued one
starts, and what finished is kept (docs/bad-input.md, round four, B10)."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from compare_fixtures import error_line, sleepy_training, tiny_configs
from patchbalance.cli import app
from patchbalance.compare import command
from patchbalance.compare.engine import CompareInterrupted, train_in_pool
from patchbalance.demo import write_demo_dataset

runner = CliRunner()


def interrupt_when_started(folder, timeout: float = 120.0) -> None:
    """Send this process SIGINT (as `kill -INT` does) once a job has marked its start."""
    deadline = time.monotonic() + timeout
    while not list(folder.glob("*.started")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler, as a command-line run has it: a library that an earlier
    test used in this process (a trainer, a cluster) may have installed one of its own."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_lets_the_running_trainings_finish_and_starts_no_queued_one(
    tmp_path, python_sigint
):
    jobs = [(f"run{i}", 1.5, str(tmp_path)) for i in range(5)]
    recorded = []
    threading.Thread(target=interrupt_when_started, args=(tmp_path,), daemon=True).start()

    with pytest.raises(KeyboardInterrupt):
        train_in_pool(jobs, 2, lambda job, _: recorded.append(job[0]), train=sleepy_training)

    started = sorted(path.stem for path in tmp_path.glob("*.started"))
    finished = sorted(path.stem for path in tmp_path.glob("*.finished"))
    # At most the two that were running when the interrupt came; each finished and recorded.
    assert 1 <= len(started) <= 2, started
    assert sorted(recorded) == started == finished


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


FINISHED = pd.DataFrame(
    {"arm": "uniform", "seed": 42, "step": [1], "tau": 0.0, "class": "miou", "iou": 0.5}
)


def interrupted(plan, progress=False):
    """Stand in for the builds and trainings: interrupted after one of four runs."""
    raise CompareInterrupted(FINISHED, total=4)


def test_an_interrupted_compare_writes_the_finished_runs_and_exits_130(tmp_path, demo, monkeypatch):
    config = tiny_configs(tmp_path, demo)
    finished = FINISHED
    monkeypatch.setattr(command, "run_compare_runs", interrupted)
    result = runner.invoke(app, ["compare", str(config)])

    assert result.exit_code == 130, result.output
    assert "interrupted: 1 of 4 runs finished" in result.stderr
    kept = pd.read_csv(tmp_path / "out" / "runs.csv")
    pd.testing.assert_frame_equal(kept, finished, check_dtype=False)
    assert not (tmp_path / "out" / "results.json").exists()


def test_runs_csv_is_replaced_whole_or_not_at_all(tmp_path, demo, monkeypatch):
    config = tiny_configs(tmp_path, demo)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "runs.csv").write_text("the previous runs\n")

    def disk_full(frame, stream, **options):
        stream.write("arm,seed\nuniform,")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(command, "run_compare_runs", interrupted)
    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    result = runner.invoke(app, ["compare", str(config)])

    assert result.exit_code == 2, result.output
    assert "runs.csv" in error_line(result) and "no space left" in error_line(result).lower()
    assert (tmp_path / "out" / "runs.csv").read_text() == "the previous runs\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["runs.csv"]
