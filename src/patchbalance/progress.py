"""Progress for the commands: a clock that times named stages and a progress bar.

The build and `select-coreset` both time their stages for the summary and show a bar for any
step that can take more than a few seconds; both use these two.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


class StageClock:
    """Times named stages, in seconds, for a summary.

    Args:
        digits: the seconds are rounded to this many decimals.
        seconds: the mapping to record into (a new one when None); a stage timed twice adds up.
    """

    def __init__(self, digits: int = 4, seconds: dict[str, float] | None = None) -> None:
        self.digits = digits
        self.seconds: dict[str, float] = {} if seconds is None else seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage `name`.

        Yields:
            None; the time is recorded when the block ends, also when it raises.
        """
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.seconds[name] = round(elapsed, self.digits)


def progress_bar(
    total: int, description: str, enabled: bool, unit: str = "patch", mininterval: float = 0.1
) -> tqdm:
    """Return a tqdm bar that leaves nothing behind; it shows nothing unless `enabled` and total > 0.

    Args:
        total: the number of steps.
        description: the text before the bar.
        enabled: False for quiet runs.
        unit: what a step is.
        mininterval: the least seconds between two redraws.

    Returns:
        The bar; use it as a context manager or close it.
    """
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        disable=not enabled or total == 0,
        leave=False,
        mininterval=mininterval,
    )
