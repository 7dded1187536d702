"""Class targets: the draw distribution closest to uniform that delivers a class mix (SPEC §3.8).

With n_ic the pixels of class c in active patch i and n_i = sum_c n_ic its valid pixels, the class
pixel share per epoch under draw probabilities pi is s_c = sum_i pi_i n_ic / sum_i pi_i n_i. For
targets t, the pi of least KL(pi || uniform) with s(pi) = t is pi_i ∝ exp(sum_c lambda_c a_ic),
a_ic = n_ic - t_c n_i, where lambda minimises the convex log-sum-exp of a @ lambda.

The shares reachable by any pi are the convex hull of the patches' own compositions (s is a
convex combination of them with weights ∝ pi_i n_i). A target outside it, or one that would push
the effective sample size below `min_ess`, is moved toward the uniform shares along the straight
line u + alpha (t - u).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linprog, minimize
from scipy.special import logsumexp

from patchbalance.errors import ConfigError
from patchbalance.table import class_share, effective_sample_size

# How close to the edge of the reachable set a moved target may go: exactly on the edge the
# solution puts zero probability on some patches and lambda is infinite.
FEASIBLE_MARGIN = 1e-3
SHARE_TOLERANCE = 1e-9


@dataclass
class ClassTargetResult:
    """The solved class-target weights of the active patches and the figures behind them."""

    probabilities: np.ndarray  # (N,) draw probabilities, summing to 1
    requested: np.ndarray  # (C,) the targets as asked
    target: np.ndarray  # (C,) the targets solved for (moved toward uniform when needed)
    reached: np.ndarray  # (C,) the shares that `probabilities` deliver
    uniform: np.ndarray  # (C,) the shares under uniform sampling
    reachable_max: np.ndarray  # (C,) the largest share of each class any weighting can reach
    lambdas: np.ndarray  # (C,) the dual solution, per pixel
    alpha: float  # the step from the uniform shares toward the requested ones that was taken
    ess: float
    notes: list[str] = field(default_factory=list)

    def to_summary(self, class_values: list[int]) -> dict[str, object]:
        """Return the figures for the build summary, keyed by class value.

        Args:
            class_values: the class value of each column.

        Returns:
            A JSON-ready mapping with the targets, shares, lambda, alpha, ESS and notes.
        """

        def by_class(values: np.ndarray, digits: int = 6) -> dict[str, float]:
            return {
                str(v): round(float(x), digits) for v, x in zip(class_values, values, strict=True)
            }

        return {
            "target_requested": by_class(self.requested),
            "target": by_class(self.target),
            "share_reached": by_class(self.reached),
            "share_uniform": by_class(self.uniform),
            "share_reachable_max": by_class(self.reachable_max),
            "lambda_per_pixel": {
                str(v): float(f"{x:.6g}") for v, x in zip(class_values, self.lambdas, strict=True)
            },
            "step_toward_target": round(self.alpha, 6),
            "effective_sample_size": round(self.ess, 3),
            "notes": list(self.notes),
        }


def parse_target_share(
    spec: str | dict[int, float], uniform: np.ndarray, class_values: list[int]
) -> np.ndarray:
    """Return the target shares that `weights.target_share` asks for.

    Args:
        spec: `sqrt`, `balanced`, `power:<p>` (p in [0, 1]), or a mapping {class value: share}
            for some classes, the others keeping their relative uniform shares in what is left.
        uniform: (C,) the uniform shares of the active patches.
        class_values: the class value of each column.

    Returns:
        (C,) targets summing to 1; classes without pixels get 0.
    """
    present = uniform > 0
    if isinstance(spec, dict):
        return _mapping_target(spec, uniform, class_values)
    # The configuration has validated the text: sqrt, balanced or power:<p>, p in [0, 1].
    exponent = {"sqrt": 0.5, "balanced": 0.0}.get(spec)
    if exponent is None:
        exponent = float(spec.split(":", 1)[1])
    target = np.zeros_like(uniform)
    target[present] = np.power(uniform[present], exponent)
    return target / target.sum()


def _mapping_target(
    spec: dict[int, float], uniform: np.ndarray, class_values: list[int]
) -> np.ndarray:
    index = {int(v): j for j, v in enumerate(class_values)}
    unknown = [key for key in spec if int(key) not in index]
    if unknown:
        raise ConfigError(
            f"weights.target_share names class {unknown[0]}, which is not among the classes "
            f"{list(class_values)}; use class values as keys"
        )
    given = np.zeros(len(class_values), dtype=bool)
    target = np.zeros(len(class_values))
    # The configuration has checked that each share lies in [0, 1] and that they add up to <= 1.
    for key, share in spec.items():
        given[index[int(key)]] = True
        target[index[int(key)]] = float(share)
    left = 1.0 - target.sum()
    rest = np.where(given, 0.0, uniform)
    if rest.sum() > 0:
        target += max(left, 0.0) * rest / rest.sum()
    elif left > 1e-12:
        raise ConfigError(
            "weights.target_share gives shares that add up to less than 1 to every class; "
            "make them add up to 1"
        )
    return target / target.sum()


def class_target_weights(
    counts: np.ndarray,
    target: np.ndarray,
    min_ess: float | None = None,
) -> ClassTargetResult:
    """Return the least-KL draw probabilities whose class pixel shares reach `target`.

    Args:
        counts: (N, C) class pixel counts of the active patches (validated, finite, >= 0, every
            row with at least one pixel).
        target: (C,) the requested shares, summing to 1.
        min_ess: the smallest effective sample size allowed, as a fraction of N; None for none.

    Returns:
        The probabilities and the figures of SPEC §3.8.
    """
    counts = np.asarray(counts, dtype=np.float64)
    requested = np.asarray(target, dtype=np.float64)
    n = counts.shape[0]
    uniform = class_share(counts, np.ones(n))
    totals = counts.sum(axis=1)
    proportions = counts / totals[:, None]
    reachable_max = proportions.max(axis=0)
    notes: list[str] = []

    alpha = _largest_feasible_step(proportions, uniform, requested)
    if alpha < 1.0:
        notes.append(
            "the requested shares lie outside what any weighting of these patches can reach; "
            f"targets moved {1 - alpha:.1%} of the way back toward the uniform shares"
        )
    # Scale pixels so that lambda is of order one whatever the window size.
    scale = float(totals.mean())
    scaled = counts / scale
    scaled_totals = totals / scale

    def solve(step: float, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = uniform + step * (requested - uniform)
        lambdas = _solve_dual(scaled, scaled_totals, t, start)
        return lambdas, _probabilities(scaled, scaled_totals, t, lambdas)

    lambdas, probabilities = solve(alpha, np.zeros(counts.shape[1]))
    ess = effective_sample_size(probabilities)
    if min_ess is not None and ess < min_ess * n:
        alpha, lambdas, probabilities = _step_for_ess(solve, alpha, lambdas, min_ess * n)
        ess = effective_sample_size(probabilities)
        notes.append(
            f"targets moved toward the uniform shares until the effective sample size reached "
            f"min_ess ({min_ess:.1%} of the active patches)"
        )
    moved = uniform + alpha * (requested - uniform)
    return ClassTargetResult(
        probabilities=probabilities,
        requested=requested,
        target=moved,
        reached=class_share(counts, probabilities),
        uniform=uniform,
        reachable_max=reachable_max,
        lambdas=lambdas / scale,
        alpha=alpha,
        ess=ess,
        notes=notes,
    )


def _largest_feasible_step(
    proportions: np.ndarray, uniform: np.ndarray, requested: np.ndarray
) -> float:
    """Return the largest alpha in [0, 1] (less a margin) for which u + alpha (t - u) lies in
    the convex hull of the patch compositions; 1 when the target itself lies inside."""
    direction = requested - uniform
    if not np.any(np.abs(direction) > SHARE_TOLERANCE):
        return 1.0
    # Compositions repeat a lot (pure patches); the hull only needs the distinct ones.
    points = np.unique(np.round(proportions, 12), axis=0)
    m, c = points.shape
    # Variables: mu (m convex weights) and alpha; maximise alpha.
    objective = np.zeros(m + 1)
    objective[-1] = -1.0
    equality = np.zeros((c + 1, m + 1))
    equality[:c, :m] = points.T
    equality[:c, -1] = -direction
    equality[c, :m] = 1.0
    rhs = np.append(uniform, 1.0)
    bounds = [(0, None)] * m + [(0, 1)]
    solution = linprog(objective, A_eq=equality, b_eq=rhs, bounds=bounds, method="highs")
    if solution.status != 0:
        return 0.0
    alpha = float(solution.x[-1])
    return 1.0 if alpha >= 1.0 - 1e-12 else alpha * (1.0 - FEASIBLE_MARGIN)


def _probabilities(
    counts: np.ndarray, totals: np.ndarray, target: np.ndarray, lambdas: np.ndarray
) -> np.ndarray:
    logits = counts @ lambdas - totals * (target @ lambdas)
    return np.exp(logits - logsumexp(logits))


def _solve_dual(
    counts: np.ndarray, totals: np.ndarray, target: np.ndarray, start: np.ndarray
) -> np.ndarray:
    """Return lambda minimising log sum_i exp(a_i . lambda), a_ic = n_ic - t_c n_i.

    Newton steps on the exact Hessian (the covariance of a under pi) after a gradient-based
    start; the objective is invariant to adding a constant to every lambda_c, so the Hessian is
    singular along that direction and the steps use its pseudo-inverse.
    """

    def objective(lambdas: np.ndarray) -> tuple[float, np.ndarray]:
        logits = counts @ lambdas - totals * (target @ lambdas)
        value = float(logsumexp(logits))
        probabilities = np.exp(logits - value)
        gradient = probabilities @ counts - target * (probabilities @ totals)
        return value, gradient

    result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    lambdas = result.x
    for _ in range(50):
        value, gradient = objective(lambdas)
        if np.max(np.abs(gradient)) < SHARE_TOLERANCE:
            break
        logits = counts @ lambdas - totals * (target @ lambdas)
        probabilities = np.exp(logits - value)
        centred = counts - totals[:, None] * target[None, :]
        hessian = (centred * probabilities[:, None]).T @ centred - np.outer(gradient, gradient)
        step = -np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        # Backtrack until the objective decreases (it is convex, so a small enough step does).
        size = 1.0
        while size > 1e-8 and objective(lambdas + size * step)[0] > value + 1e-4 * size * (
            gradient @ step
        ):
            size /= 2.0
        lambdas = lambdas + size * step
    return lambdas


def _step_for_ess(solve, alpha: float, lambdas: np.ndarray, ess_floor: float):
    """Return (alpha, lambda, probabilities) with the largest step whose ESS is >= the floor."""
    low, high = 0.0, alpha
    best = (0.0, np.zeros_like(lambdas), None)
    for _ in range(40):
        middle = (low + high) / 2.0
        middle_lambdas, probabilities = solve(middle, best[1])
        if effective_sample_size(probabilities) >= ess_floor:
            low, best = middle, (middle, middle_lambdas, probabilities)
        else:
            high = middle
        if high - low < 1e-6:
            break
    if best[2] is None:
        best = (0.0, *solve(0.0, np.zeros_like(lambdas)))
    return best
