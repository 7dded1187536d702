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

from patchbalance.errors import ConfigError
from patchbalance.measures import class_share, effective_sample_size

# How far inside the edge of the reachable set a moved target stays, as a share of the largest
# feasible step: on the edge the solution draws only the patches on the hull's face (lambda is
# infinite), and just inside it almost only those.
FEASIBLE_MARGIN = 0.1
SHARE_TOLERANCE = 1e-9
# The most Newton steps of the dual solve, after its gradient-based start.
NEWTON_STEPS = 50
# Rows per block where a pass over the patches would otherwise make (N, C) temporaries.
BLOCK_ROWS = 1 << 16
# Column generation of the reachable-shares linear program.
MAX_LP_ROUNDS = 200
LP_COLUMNS_PER_ROUND = 64
LP_TOLERANCE = 1e-7  # HiGHS's own dual feasibility tolerance


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
    converged: bool = True  # whether the dual solve converged
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
            "dual_converged": self.converged,
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
    newton_steps: int | None = None,
) -> ClassTargetResult:
    """Return the least-KL draw probabilities whose class pixel shares reach `target`.

    Args:
        counts: (N, C) class pixel counts of the active patches (finite, >= 0).
        target: (C,) the requested shares, summing to 1.
        min_ess: the smallest effective sample size allowed, as a fraction of N; None or 0 for
            none.
        newton_steps: the most Newton steps of the dual solve (after its gradient-based
            start); None for `NEWTON_STEPS`.

    Returns:
        The probabilities and the figures of SPEC §3.8; `notes` says when the targets moved,
        when the dual solve stopped short of convergence and when a solver failed.
    """
    newton_steps = NEWTON_STEPS if newton_steps is None else newton_steps
    # One float64 copy of the counts, scaled so that lambda is of order one whatever the window
    # size; every other per-patch array is a vector or a block of rows.
    scaled = np.array(counts, dtype=np.float64)
    requested = np.asarray(target, dtype=np.float64)
    n = scaled.shape[0]
    totals = scaled.sum(axis=1)
    uniform = class_share(scaled)
    reachable_max = _largest_shares(scaled, totals)
    notes: list[str] = []

    alpha, failure = _largest_feasible_step(scaled, totals, uniform, requested)
    if failure:
        notes.append(failure)
    elif alpha < 1.0:
        notes.append(
            "the requested shares lie outside what any weighting of these patches can reach; "
            f"targets moved {1 - alpha:.1%} of the way back toward the uniform shares, "
            f"{FEASIBLE_MARGIN:.0%} of the largest reachable step inside the edge"
        )
    scale = float(totals.mean()) if n and totals.mean() > 0 else 1.0
    scaled /= scale
    totals /= scale

    def solve(step: float, start: np.ndarray) -> DualSolution:
        t = uniform + step * (requested - uniform)
        return _solve_dual(scaled, totals, t, start, newton_steps)

    solution = solve(alpha, np.zeros(scaled.shape[1]))
    ess = effective_sample_size(solution.probabilities)
    if min_ess and ess < min_ess * n:
        alpha, solution = _step_for_ess(solve, alpha, solution, min_ess * n)
        ess = effective_sample_size(solution.probabilities)
        notes.append(
            f"targets moved toward the uniform shares until the effective sample size reached "
            f"min_ess ({min_ess:.1%} of the active patches)"
        )
    if not solution.converged:
        notes.append(
            f"the dual solve stopped after {newton_steps} Newton steps without converging: the "
            f"reached shares miss the targets by up to {solution.share_error:.2g}"
        )
    moved = uniform + alpha * (requested - uniform)
    # lambda is fixed up to a constant added to every class; report the one with t . lambda = 0,
    # so that a patch's log weight is lambda . n_i up to a constant, whatever the solver's path.
    lambdas = solution.lambdas - float(moved @ solution.lambdas)
    return ClassTargetResult(
        probabilities=solution.probabilities,
        requested=requested,
        target=moved,
        reached=class_share(scaled, solution.probabilities),
        uniform=uniform,
        reachable_max=reachable_max,
        lambdas=lambdas / scale,
        alpha=alpha,
        ess=ess,
        converged=solution.converged,
        notes=notes,
    )


def _row_blocks(n: int):
    for start in range(0, n, BLOCK_ROWS):
        yield slice(start, min(start + BLOCK_ROWS, n))


def _largest_shares(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Return the largest share of each class in any patch with pixels, a block at a time."""
    largest = np.zeros(counts.shape[1])
    for rows in _row_blocks(counts.shape[0]):
        block, block_totals = counts[rows], totals[rows]
        has = block_totals > 0
        if has.any():
            np.maximum(largest, (block[has] / block_totals[has, None]).max(axis=0), out=largest)
    return largest


def _largest_feasible_step(
    counts: np.ndarray, totals: np.ndarray, uniform: np.ndarray, requested: np.ndarray
) -> tuple[float, str | None]:
    """Return the step alpha in [0, 1] to take toward the requested shares, and a failure note.

    The largest alpha for which u + alpha (t - u) lies in the convex hull of the patch
    compositions is found by a linear program over the compositions, with columns generated as
    they are needed (the hull of a million windows is spanned by few of them). The step taken
    is 1 when the target itself lies inside, else the largest step less `FEASIBLE_MARGIN` of it:
    at the edge the solution would draw only the patches on the hull's face. When the solver
    fails, the step is 0 (uniform shares) and the note says so.
    """
    direction = requested - uniform
    if not np.any(np.abs(direction) > SHARE_TOLERANCE):
        return 1.0, None
    c = len(uniform)
    # The uniform composition is a convex combination of the patches': a column that keeps the
    # restricted problem feasible (alpha = 0) without changing the hull.
    columns = [uniform]
    for j in range(c):
        columns += [_richest_composition(counts, totals, j)]
    points = np.unique(np.round(np.array(columns), 12), axis=0)
    for _ in range(MAX_LP_ROUNDS):
        m = len(points)
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
            return 0.0, (
                "the linear program that finds the reachable shares failed "
                f"({solution.message.strip()}); the targets were not moved from the uniform "
                "shares, so the weights are uniform"
            )
        entering = _entering_compositions(counts, totals, solution.eqlin.marginals)
        points = np.unique(np.round(np.vstack([points, entering]), 12), axis=0)
        if len(points) == m:  # no composition improves on the restricted problem: optimal
            break
    else:
        # The restricted problem's step is reachable, but may be shorter than the largest.
        alpha = min(float(solution.x[-1]), 1.0) * (1.0 - FEASIBLE_MARGIN)
        return alpha, (
            f"the search for the reachable shares stopped after {MAX_LP_ROUNDS} rounds of its "
            f"linear program; targets moved {1 - alpha:.1%} of the way back toward the uniform "
            "shares, which may be more than the patches need"
        )
    alpha = float(solution.x[-1])
    if alpha >= 1.0 - 1e-9:
        return 1.0, None
    return alpha * (1.0 - FEASIBLE_MARGIN), None


def _richest_composition(counts: np.ndarray, totals: np.ndarray, j: int) -> np.ndarray:
    """Return the composition of the patch with the largest share of class j."""
    best, best_share = 0, -1.0
    for rows in _row_blocks(counts.shape[0]):
        block_totals = totals[rows]
        shares = np.divide(
            counts[rows, j],
            block_totals,
            out=np.full(len(block_totals), -1.0),
            where=block_totals > 0,
        )
        i = int(np.argmax(shares))
        if shares[i] > best_share:
            best, best_share = rows.start + i, float(shares[i])
    return counts[best] / max(totals[best], 1e-300)


def _entering_compositions(counts: np.ndarray, totals: np.ndarray, duals: np.ndarray) -> np.ndarray:
    """Return the compositions whose column has a negative reduced cost (they improve alpha)."""
    found: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for rows in _row_blocks(counts.shape[0]):
        block_totals = totals[rows]
        has = block_totals > 0
        proportions = counts[rows][has] / block_totals[has, None]
        # Reduced cost of a composition column p: 0 - (y_shares . p + y_sum).
        gain = proportions @ duals[:-1] + duals[-1]
        better = gain > LP_TOLERANCE
        if better.any():
            found.append(proportions[better])
            scores.append(gain[better])
    if not found:
        return np.zeros((0, counts.shape[1]))
    proportions, gain = np.concatenate(found), np.concatenate(scores)
    return proportions[np.argsort(-gain)[:LP_COLUMNS_PER_ROUND]]


@dataclass
class DualSolution:
    """One solve of the dual: lambda (per scaled pixel), the probabilities, and convergence."""

    lambdas: np.ndarray
    probabilities: np.ndarray
    converged: bool
    share_error: float  # the largest |reached share - target| over the classes

    @property
    def ess(self) -> float:
        """Return the effective sample size of the probabilities."""
        return effective_sample_size(self.probabilities)


def _solve_dual(
    counts: np.ndarray,
    totals: np.ndarray,
    target: np.ndarray,
    start: np.ndarray,
    newton_steps: int = NEWTON_STEPS,
) -> DualSolution:
    """Return lambda minimising log sum_i exp(a_i . lambda), a_ic = n_ic - t_c n_i.

    Damped Newton steps on the exact Hessian (the covariance of a under pi); from a cold start
    (lambda = 0), or when Newton from a warm start does not converge, after a gradient-based
    start. The objective is invariant to adding a constant to every lambda_c, so the Hessian is
    singular along that direction and the steps use its pseudo-inverse. Converged means the
    gradient (the reached shares less the targets, per scaled pixel) is below 1e-9.
    """

    def objective(lambdas: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient, _ = _evaluate(counts, totals, target, lambdas)
        return value, gradient

    lambdas = np.asarray(start, dtype=np.float64)
    warm = bool(np.any(lambdas))
    if warm:
        lambdas, converged = _newton(counts, totals, target, lambdas, newton_steps)
    if not warm or not converged:
        result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 500})
        lambdas, converged = _newton(counts, totals, target, result.x, newton_steps)
    _, _, probabilities = _evaluate(counts, totals, target, lambdas)
    reached = class_share(counts, probabilities)
    return DualSolution(
        lambdas=lambdas,
        probabilities=probabilities,
        converged=converged,
        share_error=float(np.max(np.abs(reached - target))),
    )


def _newton(
    counts: np.ndarray,
    totals: np.ndarray,
    target: np.ndarray,
    lambdas: np.ndarray,
    steps: int,
) -> tuple[np.ndarray, bool]:
    """Return lambda after at most `steps` damped Newton steps, and whether it converged."""
    for step_count in range(steps + 1):
        value, gradient, probabilities = _evaluate(counts, totals, target, lambdas)
        if np.max(np.abs(gradient)) < SHARE_TOLERANCE:
            return lambdas, True
        if step_count == steps:
            break
        hessian = _covariance(counts, totals, target, probabilities) - np.outer(gradient, gradient)
        del probabilities
        step = -np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        # Backtrack until the objective decreases (it is convex, so a small enough step does).
        size = 1.0
        while size > 1e-8 and _evaluate(counts, totals, target, lambdas + size * step)[
            0
        ] > value + 1e-4 * size * (gradient @ step):
            size /= 2.0
        lambdas = lambdas + size * step
    return lambdas, False


def _evaluate(
    counts: np.ndarray, totals: np.ndarray, target: np.ndarray, lambdas: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Return the dual objective, its gradient and the probabilities pi at lambda."""
    probabilities = counts @ lambdas
    probabilities -= totals * (target @ lambdas)
    top = float(probabilities.max())
    probabilities -= top
    np.exp(probabilities, out=probabilities)
    total = float(probabilities.sum())
    probabilities /= total
    gradient = probabilities @ counts - target * (probabilities @ totals)
    return top + float(np.log(total)), gradient, probabilities


def _covariance(
    counts: np.ndarray, totals: np.ndarray, target: np.ndarray, probabilities: np.ndarray
) -> np.ndarray:
    """Return sum_i pi_i a_i a_i^T, a_i = n_i - t n_i (the total), a block of rows at a time."""
    c = counts.shape[1]
    gram = np.zeros((c, c))
    cross = np.zeros(c)
    for rows in _row_blocks(counts.shape[0]):
        block, weights = counts[rows], probabilities[rows]
        gram += block.T @ (block * weights[:, None])
        cross += (weights * totals[rows]) @ block
    square = float(probabilities @ np.square(totals))
    return (
        gram - np.outer(cross, target) - np.outer(target, cross) + square * np.outer(target, target)
    )


def _step_for_ess(
    solve, alpha: float, at_alpha: DualSolution, ess_floor: float
) -> tuple[float, DualSolution]:
    """Return the step (at most `alpha`) whose ESS is just at or above the floor, and its solve.

    The ESS falls as the step grows, from N at step 0 (uniform); the bracket [low: ESS >= floor,
    high: ESS < floor] shrinks by interpolating log ESS (Illinois false position), each solve
    starting from lambda interpolated between the ends, until the ends are within 0.1 % of
    `alpha` or the ESS is within 0.1 % of the floor.
    """
    log_floor = np.log(ess_floor)
    low, low_gap, best = 0.0, np.log(len(at_alpha.probabilities)) - log_floor, None
    high, high_gap, high_lambdas = alpha, np.log(at_alpha.ess) - log_floor, at_alpha.lambdas
    low_lambdas = np.zeros_like(high_lambdas)
    side = 0
    for _ in range(60):
        if high - low < 1e-3 * alpha:
            break
        middle = high - high_gap * (high - low) / (high_gap - low_gap)
        middle = min(max(middle, low + 0.01 * (high - low)), high - 0.01 * (high - low))
        share = (middle - low) / (high - low)
        solution = solve(middle, low_lambdas + share * (high_lambdas - low_lambdas))
        gap = np.log(solution.ess) - log_floor
        if gap >= 0:
            low, low_gap, low_lambdas, best = middle, gap, solution.lambdas, solution
            if gap < 1e-3:
                break
            if side == 1:
                high_gap /= 2.0
            side = 1
        else:
            high, high_gap, high_lambdas = middle, gap, solution.lambdas
            if side == -1:
                low_gap /= 2.0
            side = -1
    if best is None:
        return 0.0, solve(0.0, np.zeros_like(high_lambdas))
    return low, best
