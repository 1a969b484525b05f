import numpy as np
import pytest

from pkt_bench.stats import bootstrap_ci, is_binary, mcnemar, mean_std, paired_bootstrap


def test_bootstrap_ci_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(7)
    draws, n_items, true_mean = 200, 80, 0.3
    data = (rng.random((draws, n_items)) < true_mean).astype(float)  # 200 synthetic test sets of 0/1 outcomes
    covered = 0
    for i in range(draws):
        ci = bootstrap_ci(data[i][None, :], seed=i)
        covered += ci.low <= true_mean <= ci.high
    assert 0.93 <= covered / draws <= 0.97


def test_bootstrap_ci_resamples_seeds_too():
    one_seed = np.array([[0.0, 1.0] * 20])
    spread_seeds = np.vstack([one_seed, one_seed * 0.0, one_seed * 0.0 + 1.0])  # seeds disagree wildly
    narrow, wide = bootstrap_ci(one_seed), bootstrap_ci(spread_seeds)
    assert narrow.low < 0.5 < narrow.high
    assert wide.high - wide.low > 2 * (narrow.high - narrow.low)
    assert bootstrap_ci(np.ones((3, 10))) == bootstrap_ci(np.ones((3, 10)))  # fixed RNG: same CI every time


def test_mean_std_over_seeds():
    assert mean_std([0.2, 0.3, 0.31])[0] == pytest.approx(0.27)
    assert mean_std([0.2, 0.3, 0.31])[1] == pytest.approx(np.std([0.2, 0.3, 0.31], ddof=1))
    assert mean_std([0.5]) == (0.5, None)


def test_mcnemar_matches_hand_computed_cases():
    # exact: 1 pair where only the method is right, 6 where only the baseline is; 3 concordant pairs.
    # p = 2 * P[Bin(7, 1/2) <= 1] = 2 * (1 + 7) / 128 = 0.125
    method = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    baseline = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    assert mcnemar(method, baseline) == pytest.approx(0.125)
    assert mcnemar(baseline, method) == pytest.approx(0.125)
    # chi-square: b = 10, c = 30 -> (|10 - 30| - 1)^2 / 40 = 9.025, p = P[chi2_1 > 9.025] = 0.0026631...
    method = np.array([1] * 10 + [0] * 30 + [1] * 5)
    baseline = np.array([0] * 10 + [1] * 30 + [1] * 5)
    assert mcnemar(method, baseline) == pytest.approx(0.002663119259138558, rel=1e-9)
    assert mcnemar(method, method) == 1.0


def test_mcnemar_with_seeds_counts_items_not_item_seed_pairs():
    method = np.array([[1, 1, 1, 0], [1, 0, 1, 0]])  # item means 1, .5, 1, 0
    baseline = np.array([[0, 0, 0, 0]])  # one seed: item means 0, 0, 0, 0
    assert mcnemar(method, baseline) == pytest.approx(2 * 1 / 8)  # b = 3 items, c = 0: 2 * P[Bin(3, .5) = 0]
    assert mcnemar(np.vstack([method] * 5), baseline) == mcnemar(method, baseline)  # more seeds, same items


def test_paired_bootstrap_sign_and_significance():
    rng = np.random.default_rng(0)
    baseline = (rng.random((3, 200)) < 0.3).astype(float)
    better = np.maximum(baseline, (rng.random((3, 200)) < 0.4).astype(float))  # right wherever the baseline is
    up = paired_bootstrap(better, baseline)
    down = paired_bootstrap(baseline, better)
    assert up.delta > 0.1 and up.ci.low > 0 and up.p_value < 0.01 and up.items == 200
    assert down.delta == pytest.approx(-up.delta) and down.ci.high < 0
    noise = paired_bootstrap(baseline[:1], baseline[1:2])  # two draws of the same process
    assert noise.ci.low < 0 < noise.ci.high and noise.p_value > 0.05
    same = paired_bootstrap(baseline, baseline)
    assert same.delta == 0 and same.p_value == 1.0


def test_is_binary():
    assert is_binary(np.array([[0.0, 1.0]])) and not is_binary(np.array([[0.5, 1.0]]))


def test_smallest_significant_delta_matches_hand_computed_cases():
    from pkt_bench.stats import smallest_significant_delta

    def pair(b, c, items=100):
        """b items only the method gets right, c only the baseline, the rest both wrong."""
        method = np.zeros(items)
        baseline = np.zeros(items)
        method[:b] = 1
        baseline[b:b + c] = 1
        return method, baseline

    # d = 20 discordant (exact test): 15:5 gives 2 * P[Bin(20, .5) <= 5] = 0.041, 14:6 gives 0.115 -> |b - c| = 10
    assert smallest_significant_delta(*pair(12, 8)) == pytest.approx(0.10)
    assert smallest_significant_delta(*pair(3, 17)) == pytest.approx(0.10)  # whichever way the observed split goes
    # d = 40 (chi-square, continuity-corrected): (14 - 1)^2 / 40 = 4.23 > 3.84, (12 - 1)^2 / 40 = 3.03 -> 14
    assert smallest_significant_delta(*pair(20, 20)) == pytest.approx(0.14)
    assert smallest_significant_delta(*pair(20, 20, items=200)) == pytest.approx(0.07)  # over all items
    # d = 5: even 5:0 gives 2 / 32 = 0.0625, not significant
    assert smallest_significant_delta(*pair(5, 0)) is None
    assert smallest_significant_delta(*pair(6, 0)) == pytest.approx(0.06)  # 2 / 64 = 0.031
    # two seeds: the items differ by their seed-averaged outcome; 20 discordant items of mean |difference| 0.75
    method = np.zeros((2, 100))
    method[0, :20] = 1
    method[1, :10] = 1  # items 0-9 differ by 1, items 10-19 by 0.5
    assert smallest_significant_delta(method, np.zeros(100)) == pytest.approx(10 * 0.75 / 100)
