"""Weighted samplers that go beyond `torch.utils.data.WeightedRandomSampler`.

`torch.utils.data.WeightedRandomSampler` draws with `torch.multinomial`, which refuses more than
2^24 categories, and it has no notion of DDP ranks. The samplers here draw with numpy's
`Generator` instead. Both derive from `WeightedSampler`, which holds the shared constructor and
the draw:

- `NumpyWeightedRandomSampler`: the same contract as torch's sampler, for any number of rows.
- `DistributedWeightedSampler`: every rank draws the same global sample for an epoch (from
  `seed` and the epoch given to `set_epoch`) and keeps a disjoint slice of it, padded or cut like
  `torch.utils.data.DistributedSampler`, so that the union over the ranks follows the weights.

Draws are exact: with replacement, the counts per row are one multinomial draw over the rows of
positive weight, put in a uniformly random order (which is the law of independent draws); without
replacement, the order is that of exponential race keys E_i / w_i (Efraimidis-Spirakis), which is
the law of successive weighted draws. Rows of weight 0 take no part in either, so they are never
drawn.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from patchbalance.balanced_table import check_weights
from patchbalance.errors import InputError

# torch.multinomial (behind WeightedRandomSampler) refuses more categories than this.
TORCH_MULTINOMIAL_MAX_CATEGORIES = 2**24

# Indices are handed to the DataLoader in chunks, so that a draw of 10^7 rows never becomes a
# list of 10^7 Python ints at once.
_YIELD_CHUNK = 65536


def _positive_rows(weights: np.ndarray) -> np.ndarray | None:
    """Return the indices of the rows with weight > 0, or None when every row has one."""
    positive = weights > 0
    return None if positive.all() else np.flatnonzero(positive)


def _draw(
    weights: np.ndarray,
    positive: np.ndarray | None,
    num_samples: int,
    replacement: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Return `num_samples` row indices drawn by weight; `positive` = rows with weight > 0."""
    # Without zero weights the rows are used in place (no index copy): at 2 x 10^7 rows every
    # array of that length costs 160 MB.
    w = weights if positive is None else weights[positive]
    if replacement:
        # Only positive rows enter the multinomial: its last category takes the remainder of
        # the draw, which must never be a row of weight 0.
        counts = rng.multinomial(num_samples, w / w.sum())
        drawn = np.repeat(np.arange(w.size) if positive is None else positive, counts)
        rng.shuffle(drawn)
        return drawn
    keys = rng.standard_exponential(w.size) / w
    if num_samples < w.size:
        chosen = np.argpartition(keys, num_samples - 1)[:num_samples]
    else:
        chosen = np.arange(w.size)
    chosen = chosen[np.argsort(keys[chosen], kind="stable")]
    return chosen if positive is None else positive[chosen]


def _check_num_samples(num_samples: int, replacement: bool, n_positive: int) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
        raise InputError(f"weighted_sampler_num_samples must be an integer, got {num_samples!r}")
    if num_samples <= 0:
        raise InputError(f"weighted_sampler_num_samples must be > 0, got {num_samples}")
    if not replacement and num_samples > n_positive:
        raise InputError(
            f"weighted_sampler_num_samples is {num_samples} with weighted_sampler_replacement: "
            f"false, but only {n_positive} rows have a weight > 0; lower num_samples or set "
            "weighted_sampler_replacement: true"
        )
    return int(num_samples)


def _seed_from_torch() -> int:
    # Without an explicit seed, follow torch's global RNG, so torch.manual_seed() controls the
    # draw as it does for torch's own samplers.
    return int(torch.empty((), dtype=torch.int64).random_().item())


def _yield_chunks(indices: np.ndarray) -> Iterator[int]:
    for start in range(0, indices.size, _YIELD_CHUNK):
        yield from indices[start : start + _YIELD_CHUNK].tolist()


class WeightedSampler(Sampler[int], abc.ABC):
    """The shared part of the weighted samplers: weights, draw size, seed, epoch and the draw.

    A subclass says which indices an iteration yields; the draw of an epoch comes from
    `numpy.random.default_rng([seed, epoch])`, so a run is reproducible from `seed`.

    The sampler keeps its place: `position` counts the indices of the current epoch already
    handed out (by this rank), and `state_dict()` / `load_state_dict()` carry seed, epoch,
    position and weights, so that an iteration started after `load_state_dict` continues the
    interrupted epoch with exactly the indices the uninterrupted one would have yielded.
    `set_weights` replaces the weights mid-epoch: the positions not yet handed out are drawn
    again from the new weights, with a generator keyed on (seed, epoch, position), so the
    result depends only on where the change happened, on every rank alike.

    Args:
        weights: one weight per row, finite and >= 0, not all 0.
        num_samples: indices per draw (default: one per row).
        replacement: draw with replacement (True) or without.
        seed: the seed of every epoch's draw; None takes one from torch's global generator.
    """

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int | None = None,
    ) -> None:
        self.weights = check_weights(weights)
        self.positive = _positive_rows(self.weights)
        self.replacement = bool(replacement)
        self.num_samples = _check_num_samples(
            self.weights.size if num_samples is None else num_samples,
            self.replacement,
            self.weights.size if self.positive is None else self.positive.size,
        )
        self.seed = _seed_from_torch() if seed is None else int(seed)
        self.epoch = 0
        self.position = 0
        # Where the current weights took over, in positions of the epoch's global draw (0: at
        # the start), and whether they are still the weights the sampler was built with.
        self._segment_start = 0
        self._replaced = False
        self._version = 0
        # Whether an iteration of this epoch has begun, and whether the next one resumes a
        # saved position instead of starting an epoch.
        self._epoch_begun = False
        self._resume_pending = False

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed, fixes the next draw; it starts from its top.

        Right after `load_state_dict`, setting the saved epoch keeps the saved position, so an
        engine that sets the epoch before every epoch (Lightning, DDP loops) resumes mid-epoch.

        Args:
            epoch: the epoch number (0 for the first).
        """
        if self._resume_pending and int(epoch) == self.epoch:
            return
        self.epoch = int(epoch)
        self.position = 0
        self._segment_start = 0
        self._epoch_begun = False
        self._resume_pending = False

    def set_weights(self, weights: Sequence[float] | np.ndarray) -> None:
        """Replace the weights for every index not yet handed out in this epoch and later ones.

        The indices already yielded stay as they were; the rest of the epoch is drawn from the
        new weights. Calling it at the same point on every rank gives every rank the same
        global draw. Under a DataLoader with workers, the batches already fetched ahead
        (`prefetch_factor` x `num_workers`) keep the old weights.

        Args:
            weights: one weight per row (as many rows as before), finite and >= 0, not all 0.
        """
        weights = check_weights(weights)
        if weights.size != self.weights.size:
            raise InputError(
                f"set_weights got {weights.size} weights for a sampler of {self.weights.size} rows"
            )
        positive = _positive_rows(weights)
        _check_num_samples(
            self._global_size(),
            self.replacement,
            weights.size if positive is None else positive.size,
        )
        self.weights, self.positive = weights, positive
        self._segment_start = self._global_position()
        self._replaced = True
        self._version += 1

    def state_dict(self) -> dict[str, Any]:
        """Return what resumes the draws: seed, epoch, position and (if replaced) the weights.

        Returns:
            A mapping of plain values and one numpy array, for `torch.save`.
        """
        state: dict[str, Any] = {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "segment_start": self._segment_start,
            "num_samples": self._global_size(),
        }
        if self._replaced:
            state["weights"] = self.weights.copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`: the next iteration resumes the saved epoch.

        Args:
            state: what `state_dict()` returned (of a sampler over the same rows).
        """
        if int(state["num_samples"]) != self._global_size():
            raise InputError(
                f"the saved sampler drew {state['num_samples']} rows per epoch and this one "
                f"draws {self._global_size()}; resume with the same weighted_sampler_num_samples"
            )
        if "weights" in state:
            self.set_weights(np.asarray(state["weights"]))
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._segment_start = int(state["segment_start"])
        self._epoch_begun = True
        self._resume_pending = True

    def _start_iteration(self, next_epoch: bool) -> None:
        """Begin an iteration: resume a loaded position, or start an epoch from its top.

        Args:
            next_epoch: whether an iteration after one of the same epoch moves to the next
                epoch (the single-process sampler) or replays the epoch (DDP's, which waits
                for `set_epoch`).
        """
        if self._resume_pending:
            self._resume_pending = False
            return
        if next_epoch and self._epoch_begun:
            self.epoch += 1
        self.position = 0
        self._segment_start = 0
        self._epoch_begun = True

    def _global_size(self) -> int:
        """Return the number of indices in one epoch's global draw."""
        return self.num_samples

    def _global_position(self) -> int:
        """Return the global position of this rank's next index."""
        return self.position

    def _draw_epoch(self, num_samples: int, start: int | None = None) -> np.ndarray:
        """Return the current epoch's indices drawn by weight from global position `start` on.

        `start` defaults to where the current weights took over (0 before any `set_weights` in
        this epoch, which gives the whole epoch's draw); a later start keys the generator on it
        too, so the rest of an epoch depends only on where the weights changed.
        """
        start = self._segment_start if start is None else start
        key = [self.seed, self.epoch, *([start] if start else [])]
        size = max(num_samples - start, 1)
        return _draw(
            self.weights, self.positive, size, self.replacement, np.random.default_rng(key)
        )

    def _segment(self) -> np.ndarray:
        """Return this rank's indices from `_segment_start` to the end of the epoch."""
        return self._draw_epoch(self._global_size())

    def _yield_epoch(self) -> Iterator[int]:
        """Yield the rest of the current epoch from `position`, following weight changes."""
        while self.position < len(self):
            version = self._version
            segment = self._segment()
            offset = self.position - self._local_start()
            for index in _yield_chunks(segment[offset:]):
                self.position += 1
                yield index
                if self._version != version:
                    break

    def _local_start(self) -> int:
        """Return this rank's position at which the current segment starts."""
        return self._segment_start

    @abc.abstractmethod
    def __iter__(self) -> Iterator[int]:
        """Yield the row indices of one iteration.

        Yields:
            Row indices, as Python ints.
        """

    def __len__(self) -> int:
        """Return how many indices one iteration yields.

        Returns:
            `num_samples`.
        """
        return self.num_samples


class NumpyWeightedRandomSampler(WeightedSampler):
    """Sample row indices in proportion to `weights`, for any number of rows.

    The contract of `torch.utils.data.WeightedRandomSampler` (`num_samples` draws per
    iteration, with or without replacement) without torch.multinomial's 2^24-row limit. Each
    epoch draws from `numpy.random.default_rng([seed, epoch])`; each new iteration moves to the
    next epoch (as torch's sampler draws afresh), unless `set_epoch` set one or
    `load_state_dict` restored a position to continue from, so a run is reproducible from
    `seed`.

    Args:
        weights: one weight per row, finite and >= 0, not all 0.
        num_samples: draws per iteration (default: one per row).
        replacement: draw with replacement (True) or without.
        seed: the seed of every epoch's draw; None takes one from torch's global generator.
    """

    def draw(self) -> np.ndarray:
        """Return the indices of the current epoch from its top (without advancing the epoch).

        Returns:
            (num_samples,) int64 row indices; after a mid-epoch `set_weights`, the indices from
            the change on.
        """
        return self._segment()

    def __iter__(self) -> Iterator[int]:
        """Yield the rest of the current epoch's draw, then advance the epoch by one.

        Yields:
            Row indices, as Python ints: `num_samples` of them from the top of an epoch.
        """
        self._start_iteration(next_epoch=True)
        yield from self._yield_epoch()


class DistributedWeightedSampler(WeightedSampler, DistributedSampler):
    """Weighted sampling for DDP: one global draw per epoch, a disjoint slice per rank.

    Every rank computes the same global draw of `num_samples` indices from
    `numpy.random.default_rng([seed, epoch])` and keeps positions `rank, rank + num_replicas,
    ...` of it, so the ranks' slices are disjoint and together are exactly the global draw.
    When `num_samples` is not a multiple of `num_replicas`, the draw is padded with its own
    first indices (or, with `drop_last`, its tail is cut) as `DistributedSampler` does, so every
    rank yields the same number of indices. Call `set_epoch(epoch)` before each epoch, as with
    `DistributedSampler`; without it every epoch repeats the draw of epoch 0.

    It is a `torch.utils.data.DistributedSampler`, so PyTorch Lightning, Accelerate and plain
    DDP code use it as it is: Lightning wraps any other sampler in its
    `DistributedSamplerWrapper`, which would slice the per-rank draw a second time.

    Args:
        weights: one weight per row, finite and >= 0, not all 0.
        num_samples: indices of the global draw (default: one per row); kept as
            `global_num_samples`, while `num_samples` becomes this rank's share.
        replacement: draw with replacement (True) or without.
        seed: the seed of every epoch's draw, the same on every rank.
        num_replicas: the number of ranks (default: the process group's world size).
        rank: this rank (default: the process group's rank).
        drop_last: cut the draw's tail rather than pad it to a multiple of `num_replicas`.
    """

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if num_replicas is None or rank is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise RuntimeError(
                    "DistributedWeightedSampler needs num_replicas and rank, or an initialised "
                    "torch.distributed process group"
                )
            num_replicas = (
                torch.distributed.get_world_size() if num_replicas is None else num_replicas
            )
            rank = torch.distributed.get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        WeightedSampler.__init__(self, weights, num_samples, replacement, int(seed))
        self.global_num_samples = self.num_samples
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        # DistributedSampler's own attributes, for code that reads them.
        self.dataset = None
        self.shuffle = True
        if self.drop_last and self.global_num_samples % self.num_replicas:
            self.num_samples = self.global_num_samples // self.num_replicas
        else:
            self.num_samples = math.ceil(self.global_num_samples / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def _global_size(self) -> int:
        return self.global_num_samples

    def _global_position(self) -> int:
        # Every rank has handed out `position` indices: global positions below
        # position x num_replicas are taken.
        return self.position * self.num_replicas

    def _local_start(self) -> int:
        return self._segment_start // self.num_replicas

    def _segment(self) -> np.ndarray:
        """Return this rank's slice of the global draw from `_segment_start` on, padded or cut."""
        indices = self._draw_epoch(self.global_num_samples)
        needed = self.total_size - self._segment_start
        if indices.size < needed:
            indices = np.tile(indices, math.ceil(needed / indices.size))
        return indices[: max(needed, 0)][self.rank :: self.num_replicas]

    def global_draw(self) -> np.ndarray:
        """Return the epoch's global draw (identical on every rank), before padding.

        Returns:
            (global_num_samples,) int64 row indices, from the top of the epoch with the
            current weights.
        """
        return self._draw_epoch(self.global_num_samples, start=0)

    def rank_indices(self) -> np.ndarray:
        """Return this rank's slice of the epoch's draw, from the current weights' start.

        Returns:
            int64 row indices: positions rank, rank + num_replicas, ... of the padded (or cut)
            global draw (`num_samples` of them from the top of an epoch).
        """
        return self._segment()

    def __iter__(self) -> Iterator[int]:
        """Yield the rest of this rank's slice of the current epoch (the epoch does not advance).

        Yields:
            Row indices, as Python ints: `num_samples` of them from the top of an epoch.
        """
        self._start_iteration(next_epoch=False)
        yield from self._yield_epoch()
