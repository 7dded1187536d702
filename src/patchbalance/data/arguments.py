"""The whole-number arguments of a dataset block, checked once, naming the block and the key.

`int()` on a configuration value would turn `2.5` into 2, `-5` rows into "all but the last
five" and `abc` into a bare "invalid literal"; these checks refuse each with one line instead,
when the training configuration is loaded and when a dataset is made from Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from patchbalance.errors import ConfigError

# The dataset arguments that hold one whole number, and the least value each takes (None: any).
WHOLE_NUMBER_KEYS: dict[str, int | None] = {
    "n_classes": 1,
    "n_first_rows_to_read": 1,
    "mask_band": 1,
    "ignore_index": None,
}


def whole_number(value: Any, key: str, minimum: int | None = None) -> int:
    """Return `value` as an int; raise `ConfigError` naming `key` for text, a fraction, a bool
    or a number below `minimum`."""
    least = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"'{key}' must be a whole number{least}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"'{key}' must be a whole number{least}, got {value!r}")
    return int(value)


def band_numbers(value: Any, key: str) -> list[int] | None:
    """Return 1-based band numbers (None: every band); raise `ConfigError` naming `key`."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"'{key}' must be a list of 1-based band numbers, got {value!r}")
    return [whole_number(band, key, 1) for band in value]


def check_dataset_numbers(block: Mapping[str, Any], where: str) -> None:
    """Raise `ConfigError` naming `where.key` for a whole-number argument out of its range."""
    for key, minimum in WHOLE_NUMBER_KEYS.items():
        if block.get(key) is not None:
            whole_number(block[key], f"{where}.{key}", minimum)
    band_numbers(block.get("selected_bands"), f"{where}.selected_bands")
