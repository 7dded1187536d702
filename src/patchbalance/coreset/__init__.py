"""CoreSet selection (SPEC §6): pick the most informative share of the pool to train on.

The six scorers of Nogueira et al. 2026 ("Core-Set Selection for Data-Efficient Land Cover
Segmentation", IEEE Access): `lc`, `cb`, `fa`, `fd`, `lc_fd` and `fa_cb`. The selected rows
get training weights; every other row gets weight 0.

Modules: `config` (the `coreset:` keys), `pool` (the pool and the budget), `pool_embeddings`
(the pool's vectors), `scorers` (the scores), `selection` (the table of scorers and
`select_coreset`), `weights` (training weights over the CoreSet) and `command`
(`patchbalance select-coreset`).
"""

from __future__ import annotations

from patchbalance.coreset.command import run_select_coreset_command
from patchbalance.coreset.pool import budget_count
from patchbalance.coreset.scorers import (
    class_balance_order,
    class_balance_scores,
    feature_activation_scores,
    feature_diversity_order,
    label_complexity_scores,
    vendi_score,
)
from patchbalance.coreset.selection import CoresetResult, run_selection, select_coreset

__all__ = [
    "CoresetResult",
    "budget_count",
    "class_balance_order",
    "class_balance_scores",
    "feature_activation_scores",
    "feature_diversity_order",
    "label_complexity_scores",
    "run_select_coreset_command",
    "run_selection",
    "select_coreset",
    "vendi_score",
]
