"""Where the per-raster work runs (SPEC §10): in this process, or on a Dask cluster.

`open_compute` returns a `Compute` for one run. Its `as_completed` runs a module-level function
over a list of partitions (records of one raster, in block order) and yields each result with the
partition's position as soon as it is ready, so the caller merges results into arrays it holds
and never keeps them all. The same function runs in-process (`synchronous`, `threads`), on a
`distributed.LocalCluster` started for the run (`local`), or on a running Dask scheduler (an
address such as `tcp://host:8786`). A worker that dies has its partitions recomputed by Dask.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

from patchbalance.config import ComputeConfig
from patchbalance.errors import InputError, MissingDependencyError

log = logging.getLogger(__name__)

# Partitions handed to the workers at once, per worker: enough to keep each one busy while the
# client merges, few enough that the task arguments never pile up in memory.
IN_FLIGHT_PER_WORKER = 4
# Seconds to wait for a running scheduler to answer and to have at least one worker.
CONNECT_TIMEOUT_S = 30
# Seconds a first plain TCP connection to a scheduler address may take: a refused port fails
# at once, without the wait above.
PROBE_TIMEOUT_S = 5
DEFAULT_SCHEDULER_PORT = 8786


class LazySequence(Sequence[Any]):
    """A sequence whose items are made when they are asked for (`make(position)`).

    Args:
        make: returns the item at a position.
        length: the number of items.
    """

    def __init__(self, make: Callable[[int], Any], length: int) -> None:
        self._make = make
        self._length = length

    def __len__(self) -> int:
        """Return the number of items."""
        return self._length

    def __getitem__(self, position: int) -> Any:  # type: ignore[override]
        """Return the item at `position`, made now."""
        if not 0 <= position < self._length:
            raise IndexError(position)
        return self._make(position)


@dataclass
class Compute:
    """The scheduler of one run and the way to run partitions on it.

    Args:
        scheduler: what runs the work: `synchronous`, `threads`, `local` or a scheduler address.
        workers: worker processes (cluster) or threads (`threads`); 1 for `synchronous`.
        client: the `distributed.Client` when a cluster is used, else None.
    """

    scheduler: str
    workers: int
    client: Any = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        """Return whether the work runs on Dask workers (other processes) rather than here."""
        return self.client is not None

    def as_completed(
        self, function: Callable[[Any], Any], partitions: Sequence[Any]
    ) -> Iterator[tuple[int, Any]]:
        """Run `function` on every partition and yield `(position, result)` as each finishes.

        Args:
            function: a module-level function (it is pickled to the workers).
            partitions: its arguments, one per task.

        Yields:
            The position of the partition in `partitions` and `function(partition)`, in the
            order the tasks finish (not the order given).
        """
        if not partitions:
            return
        if self.client is not None:
            yield from self._on_cluster(function, partitions)
        elif self.scheduler == "synchronous" or self.workers <= 1 or len(partitions) == 1:
            for position, partition in enumerate(partitions):
                yield position, function(partition)
        else:
            yield from self._on_threads(function, partitions)

    def _on_threads(
        self, function: Callable[[Any], Any], partitions: Sequence[Any]
    ) -> Iterator[tuple[int, Any]]:
        limit = self.workers * IN_FLIGHT_PER_WORKER
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            waiting = iter(enumerate(partitions))
            running = {}
            for position, partition in waiting:
                running[pool.submit(function, partition)] = position
                if len(running) >= limit:
                    break
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    position = running.pop(future)
                    yield position, future.result()
                    following = next(waiting, None)
                    if following is not None:
                        running[pool.submit(function, following[1])] = following[0]

    def _on_cluster(
        self, function: Callable[[Any], Any], partitions: Sequence[Any]
    ) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        name = f"{getattr(function, '__name__', 'task')}-{uuid.uuid4().hex[:12]}"
        limit = max(1, self.workers) * IN_FLIGHT_PER_WORKER

        def submit(position: int) -> Any:
            # pure=False with a unique key: a retried task is the same task, never a cached one.
            return self.client.submit(
                function, partitions[position], key=f"{name}-{position}", pure=False
            )

        first = min(limit, len(partitions))
        positions = {}
        futures = []
        for position in range(first):
            future = submit(position)
            positions[future.key] = position
            futures.append(future)
        following = first
        pending = as_completed(futures, with_results=True)
        for future, result in pending:
            position = positions.pop(future.key)
            future.release()
            yield position, result
            if following < len(partitions):
                new = submit(following)
                positions[new.key] = following
                pending.add(new)
                following += 1

    def describe(self) -> dict[str, Any]:
        """Return the summary's `compute` block: the scheduler, its workers and notes."""
        return {"scheduler": self.scheduler, "workers": self.workers, **self.notes}


def choose_scheduler(config: ComputeConfig, n_patches: int) -> str:
    """Return the scheduler a run uses: `auto` becomes `threads` or `local` by the pool's size."""
    if config.scheduler != "auto":
        return config.scheduler
    if n_patches <= config.cluster_above:
        return "threads"
    try:
        import distributed  # noqa: F401
    except ImportError:
        log.info(
            "compute: %d patches is above cluster_above (%d) but dask[distributed] is not "
            "installed; running in threads",
            n_patches,
            config.cluster_above,
        )
        return "threads"
    return "local"


def _import_distributed(scheduler: str) -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise MissingDependencyError(
            f"compute.scheduler: {scheduler} needs dask[distributed]; "
            'install it with pip install "patchbalance[dask]"'
        ) from exc
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # The scheduler and workers log every start and stop at INFO; keep runs readable.
        logging.getLogger("distributed").setLevel(logging.WARNING)
    return distributed


@contextmanager
def open_compute(config: ComputeConfig, n_patches: int, num_workers: int) -> Iterator[Compute]:
    """Return the `Compute` of one run; a cluster started here is stopped when the block ends.

    Args:
        config: the `compute:` block.
        n_patches: the size of the pool (`auto` decides by it).
        num_workers: the thread count of the `threads` scheduler.

    Yields:
        The run's `Compute`.
    """
    scheduler = choose_scheduler(config, n_patches)
    if scheduler == "synchronous":
        yield Compute("synchronous", 1)
        return
    if scheduler == "threads":
        yield Compute("threads", max(1, num_workers))
        return
    if scheduler != "local":
        _probe_scheduler(scheduler)
    distributed = _import_distributed(scheduler)
    if scheduler == "local":
        workers = config.workers or os.cpu_count() or 1
        with _local_cluster(distributed, workers) as cluster, distributed.Client(cluster) as client:
            yield _cluster_compute("local", client, workers)
        return
    try:
        client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise InputError(
            f"compute.scheduler: cannot reach the Dask scheduler at {scheduler} ({exc}); "
            "start one with `dask scheduler` and `dask worker`, or use scheduler: local"
        ) from exc
    with client:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError as exc:
            raise InputError(
                f"compute.scheduler: the Dask scheduler at {scheduler} has no worker after "
                f"{CONNECT_TIMEOUT_S} s; start one with `dask worker {scheduler}`"
            ) from exc
        workers = len(client.scheduler_info()["workers"])
        yield _cluster_compute(scheduler, client, workers)


def _probe_scheduler(address: str) -> None:
    """Raise `InputError` at once when nothing accepts a TCP connection at `address`.

    A refused or unroutable connection fails within `PROBE_TIMEOUT_S`; a scheduler that
    answers (or a connection that neither opens nor fails in time) gets the longer wait of
    `distributed.Client`.
    """
    parts = urlsplit(address)
    if parts.scheme not in ("tcp", "tls") or not parts.hostname:
        return
    try:
        port = parts.port or DEFAULT_SCHEDULER_PORT
    except ValueError:
        raise InputError(f"compute.scheduler: {address} has no valid port number") from None
    try:
        with socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S):
            return
    except TimeoutError:
        return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    raise InputError(
        f"compute.scheduler: cannot reach the Dask scheduler at {address} ({reason}); start "
        "one with `dask scheduler` and `dask worker`, or use scheduler: local"
    )


@contextmanager
def _local_cluster(distributed: Any, workers: int) -> Iterator[Any]:
    """Return a started `LocalCluster` of `workers` one-thread processes; stop it after."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    # Dask sets a low glibc trim threshold for its workers, which also pins glibc's mmap
    # threshold at 128 KB: every array above that is then mapped and unmapped anew, and the
    # statistics' box counting (a few MB of temporaries per partition) runs 3x slower.
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0" if _has_bokeh() else None,
                silence_logs=logging.ERROR,
            )
    except RuntimeError as exc:
        # Worker processes are spawned: they import the main module again, and a script that
        # starts the build at import time fails there.
        raise InputError(
            "compute.scheduler: local could not start its worker processes; a Python script "
            "that runs the build must do so under `if __name__ == '__main__':` (or use "
            "scheduler: threads)"
        ) from exc
    with cluster:
        yield cluster


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401  (the dashboard is served only when bokeh is installed)
    except ImportError:
        return False
    return True


def _dashboard_served(link: str) -> bool:
    """Return whether the dashboard page at `link` answers.

    A scheduler started with `--no-dashboard` (or without bokeh) still serves HTTP on its
    dashboard port, and distributed still makes a link to it, but the page is not there.
    """
    try:
        with urlopen(link, timeout=PROBE_TIMEOUT_S) as response:  # noqa: S310 - the user's scheduler
            return response.status == 200
    except (OSError, ValueError):
        return False


def _cluster_compute(scheduler: str, client: Any, workers: int) -> Compute:
    compute = Compute(scheduler, workers, client)
    link = client.dashboard_link if _has_bokeh() else None
    if link and scheduler != "local" and not _dashboard_served(link):
        link = None
    if link:
        compute.notes["dashboard"] = link
        log.info("Dask dashboard: %s", link)
    compute.notes["threads_per_worker"] = sorted(
        {int(w.get("nthreads", 1)) for w in client.scheduler_info()["workers"].values()}
    )
    return compute
