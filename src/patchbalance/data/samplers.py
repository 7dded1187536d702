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
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

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

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed, fixes the next draw.

        Args:
            epoch: the epoch number (0 for the first).
        """
        self.epoch = int(epoch)

    def _draw_epoch(self, num_samples: int) -> np.ndarray:
        """Return `num_samples` indices drawn by weight for the current epoch (int64)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        return _draw(self.weights, self.positive, num_samples, self.replacement, rng)

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
    iteration draws from `numpy.random.default_rng([seed, epoch])`; the epoch advances by one
    after every iteration, or is set with `set_epoch`, so a run is reproducible from `seed`.

    Args:
        weights: one weight per row, finite and >= 0, not all 0.
        num_samples: draws per iteration (default: one per row).
        replacement: draw with replacement (True) or without.
        seed: the seed of every epoch's draw; None takes one from torch's global generator.
    """

    def draw(self) -> np.ndarray:
        """Return the indices of the current epoch (without advancing the epoch).

        Returns:
            (num_samples,) int64 row indices.
        """
        return self._draw_epoch(self.num_samples)

    def __iter__(self) -> Iterator[int]:
        """Yield the current epoch's draw, then advance the epoch by one.

        Yields:
            `num_samples` row indices, as Python ints.
        """
        indices = self.draw()
        self.epoch += 1
        return _yield_chunks(indices)


class DistributedWeightedSampler(WeightedSampler):
    """Weighted sampling for DDP: one global draw per epoch, a disjoint slice per rank.

    Every rank computes the same global draw of `num_samples` indices from
    `numpy.random.default_rng([seed, epoch])` and keeps positions `rank, rank + num_replicas,
    ...` of it, so the ranks' slices are disjoint and together are exactly the global draw.
    When `num_samples` is not a multiple of `num_replicas`, the draw is padded with its own
    first indices (or, with `drop_last`, its tail is cut) as `DistributedSampler` does, so every
    rank yields the same number of indices. Call `set_epoch(epoch)` before each epoch, as with
    `DistributedSampler`; without it every epoch repeats the draw of epoch 0.

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
        super().__init__(weights, num_samples, replacement, int(seed))
        self.global_num_samples = self.num_samples
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.global_num_samples % self.num_replicas:
            self.num_samples = self.global_num_samples // self.num_replicas
        else:
            self.num_samples = math.ceil(self.global_num_samples / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def global_draw(self) -> np.ndarray:
        """Return the epoch's global draw (identical on every rank), before padding.

        Returns:
            (global_num_samples,) int64 row indices.
        """
        return self._draw_epoch(self.global_num_samples)

    def rank_indices(self) -> np.ndarray:
        """Return this rank's slice of the epoch's global draw.

        Returns:
            (num_samples,) int64 row indices: positions rank, rank + num_replicas, ... of the
            padded (or cut) global draw.
        """
        indices = self.global_draw()
        if indices.size < self.total_size:
            repeats = math.ceil((self.total_size - indices.size) / indices.size)
            padding = np.tile(indices, repeats)[: self.total_size - indices.size]
            indices = np.concatenate([indices, padding])
        else:
            indices = indices[: self.total_size]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        """Yield this rank's slice of the current epoch's draw (the epoch does not advance).

        Yields:
            `num_samples` row indices, as Python ints.
        """
        return _yield_chunks(self.rank_indices())
