"""Statistics for comparing methods honestly: spread over seeds, bootstrap CIs, paired tests against a baseline.

The per-item outcomes of a cell group (one method on one task, several seeds) form a matrix `[seeds, items]`:
the primary metric of each evaluated item under each seed, items in the same order for every seed.

- `mean_std`: the mean and sample standard deviation of per-seed scores (the run-to-run spread).
- `bootstrap_ci`: the 95% percentile-bootstrap CI of the mean score, resampling items and seeds (both with
  replacement, independently), so it reflects both the finite test set and the run-to-run spread. With one
  seed it covers the true mean at the nominal rate (tests/test_stats.py). With several seeds it is
  conservative when item-by-seed noise dominates (that noise is counted by both resamplings), and it
  undercovers when a large shift between seeds meets very few seeds (3 seeds: about 90% in a simulation),
  because three seeds say little about the spread of seeds.
- `paired_bootstrap`: the difference method − baseline on the same items. Each item's outcome is first
  averaged over the seeds of each side (a method's seed and the baseline's seed are not paired draws); items
  are resampled; the CI and a two-sided p-value come from the bootstrap distribution of the mean difference.
- `mcnemar`: McNemar's test for paired binary outcomes (accuracy, exact match), exact binomial when there are
  fewer than 25 discordant items, else chi-square with continuity correction. With few items it is the honest
  test: a bootstrap of 5 items that all flip claims p < 0.001, McNemar says 0.06.

Every function takes a fixed RNG seed, so a leaderboard prints the same CIs each time it is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Paired:
    """A paired comparison: mean difference `delta` with its CI and p-value, on `items` shared items."""

    delta: float
    ci: Interval
    p_value: float
    items: int


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value) of per-seed scores."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else None


def _resample_counts(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
    """`[draws, n]` counts of how often each of `n` units appears in each bootstrap resample of size `n`."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(float)


def _interval(means: np.ndarray, level: float) -> Interval:
    alpha = 1.0 - level
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(low), float(high))


def bootstrap_means(outcomes: np.ndarray, draws: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution `[draws]` of the mean of an `[seeds, items]` matrix, resampling both axes."""
    x = np.asarray(outcomes, dtype=float)
    assert x.ndim == 2 and x.size, "outcomes must be a non-empty [seeds, items] matrix"
    n_seeds, n_items = x.shape
    rng = np.random.default_rng(seed)
    item_counts = _resample_counts(rng, n_items, draws)  # [draws, items]
    seed_counts = _resample_counts(rng, n_seeds, draws) if n_seeds > 1 else np.ones((draws, 1))  # [draws, seeds]
    return ((seed_counts @ x) * item_counts).sum(axis=1) / (n_seeds * n_items)


def bootstrap_ci(outcomes: np.ndarray, level: float = LEVEL, draws: int = N_BOOT, seed: int = 0) -> Interval:
    """Percentile-bootstrap CI of the mean of an `[seeds, items]` outcome matrix."""
    return _interval(bootstrap_means(outcomes, draws, seed), level)


def paired_bootstrap(method: np.ndarray, baseline: np.ndarray, level: float = LEVEL, draws: int = N_BOOT,
                     seed: int = 0) -> Paired:
    """Method − baseline on the same items: `[seeds, items]` matrices, items aligned, seed counts may differ."""
    diff = np.asarray(method, dtype=float).mean(axis=0) - np.asarray(baseline, dtype=float).mean(axis=0)  # [items]
    means = bootstrap_means(diff[None, :], draws, seed)
    below, above = int((means <= 0).sum()), int((means >= 0).sum())
    p_value = min(1.0, 2 * (min(below, above) + 1) / (draws + 1))
    return Paired(float(diff.mean()), _interval(means, level), p_value, len(diff))


def mcnemar(method: np.ndarray, baseline: np.ndarray) -> float:
    """Two-sided p-value of McNemar's test on paired 0/1 outcomes, `[seeds, items]` (or `[items]`) on each side.

    Only the discordant items count: `b` (the method right, the baseline wrong) and `c` (the reverse). Under the
    null each is a fair coin: exact binomial p = min(1, 2 P[X <= min(b, c)]) with X ~ Bin(b + c, 1/2) when
    b + c < 25, else the chi-square statistic (|b - c| - 1)^2 / (b + c) with one degree of freedom. With several
    seeds an item counts toward b (c) when its seed-averaged outcome is higher (lower) for the method: the sign
    test on items, which is McNemar's test for one seed and keeps the items as the independent units.
    """
    diff = _item_differences(method, baseline)
    return _mcnemar_p(int((diff > 0).sum()), int((diff < 0).sum()))


def _item_differences(method: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """[items]: the method's seed-averaged outcome minus the baseline's."""
    return np.atleast_2d(np.asarray(method, dtype=float)).mean(axis=0) - np.atleast_2d(
        np.asarray(baseline, dtype=float)).mean(axis=0)


def _mcnemar_p(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    if n < 25:
        return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)
    statistic = (abs(b - c) - 1) ** 2 / n
    return math.erfc(math.sqrt(statistic / 2))  # survival function of chi-square with 1 dof


def smallest_significant_delta(method: np.ndarray, baseline: np.ndarray, alpha: float = 0.05) -> float | None:
    """The smallest |Δ| that `mcnemar` would call significant (p < `alpha`) on these items, with the discordance
    observed: the number d of items where the two differ, and their mean |difference|, held fixed, the smallest
    |b − c| (b + c = d) with p < α, as a difference of means over all items. With one seed that is (b − c) / items
    exactly; with several it assumes the discordant items differ by their mean. None when no split of the d items
    is significant (d < 6, for α = 0.05): on these items nothing the method changes could be seen.
    """
    diff = _item_differences(method, baseline)
    discordant = diff[diff != 0]
    d = len(discordant)
    for b in range((d + 1) // 2, d + 1):  # b ≥ c, |b − c| growing
        if _mcnemar_p(b, d - b) < alpha:
            return (2 * b - d) * float(np.abs(discordant).mean()) / len(diff)
    return None


def is_binary(outcomes: np.ndarray) -> bool:
    return bool(np.isin(np.asarray(outcomes), (0.0, 1.0)).all())
