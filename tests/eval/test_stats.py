"""Leaderboard statistics: known values for Wilson, bootstrap CIs, McNemar and the paired bootstrap."""

import math

import numpy as np
import pytest

from ptqbench.eval import stats
from ptqbench.eval.stats import bootstrap_mean, mcnemar, paired_bootstrap, wilson

Z = 1.959963984540054


def test_wilson_195_of_200_closed_form_and_published_value():
    k, n, p = 195, 200, 195 / 200
    center = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    lo, hi = wilson(k, n)
    assert (lo, hi) == pytest.approx((center - half, center + half), abs=1e-12)
    # By hand: denom 1.019207, center 0.966048, half 0.023227 -> (0.942822, 0.989275).
    assert (lo, hi) == pytest.approx((0.942822, 0.989275), abs=5e-7)
    assert (round(lo, 4), round(hi, 4)) == (0.9428, 0.9893)


def test_wilson_edges():
    assert wilson(0, 10) == (0.0, pytest.approx(Z**2 / (10 + Z**2)))  # = 0.277533
    assert wilson(0, 10)[1] == pytest.approx(0.277533, abs=1e-6)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.277533, abs=1e-6)
    assert all(math.isnan(x) for x in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_bootstrap_constant_is_zero_width():
    lo, hi = bootstrap_mean([0.25] * 50)
    assert lo == hi == 0.25


def test_bootstrap_matches_normal_interval():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=2000)
    lo, hi = bootstrap_mean(x)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(len(x))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.10)
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.1 * half)


def test_bootstrap_ratio_contains_sum_over_sum_and_needs_two_items():
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, 40, size=300)
    nll = tokens * rng.uniform(0.5, 3.0, size=300)  # per-item summed -logp
    lo, hi = bootstrap_mean(nll, weights=tokens)
    assert lo < nll.sum() / tokens.sum() < hi
    assert all(math.isnan(x) for x in bootstrap_mean([1.0]))
    with pytest.raises(ValueError, match="3 vs 2"):
        bootstrap_mean([1, 2, 3], weights=[1, 2])


def test_mcnemar_known_values():
    assert mcnemar([1] * 10 + [0] * 5, [0] * 10 + [0] * 5) == 2 * 0.5**10 == 0.001953125
    assert mcnemar([1, 0, 1, 1], [1, 0, 1, 1]) == 1.0
    # b01=3, b10=5: 2 * P(X <= 3 | n=8, 1/2) = 2 * (1 + 8 + 28 + 56) / 256 = 186/256.
    a = [0] * 3 + [1] * 5 + [1, 0]
    b = [1] * 3 + [0] * 5 + [1, 0]
    assert mcnemar(a, b) == 186 / 256 == 0.7265625
    assert mcnemar(b, a) == 0.7265625
    with pytest.raises(ValueError):
        mcnemar([0, 2], [0, 1])


def test_mcnemar_large_counts_log_space_agrees_with_exact(monkeypatch):
    a, b = [1] * 900 + [0] * 1100, [0] * 900 + [1] * 1100
    exact = mcnemar(a, b)
    monkeypatch.setattr(stats, "_EXACT_MAX_N", 10)
    assert mcnemar(a, b) == pytest.approx(exact, rel=1e-9)
    assert 0 < exact < 1e-5


def test_paired_bootstrap():
    a = np.random.default_rng(3).normal(0.0, 1.0, size=200)
    assert paired_bootstrap(a, a + 0.5) < 0.01
    assert paired_bootstrap(a, a.copy()) == 1.0
    toks = np.full(200, 10)
    assert paired_bootstrap(a, a + 0.5, weights_a=toks, weights_b=toks) < 0.01
    # One item apart out of 200: most resamples tie, and ties count against significance.
    c = np.zeros(200)
    d = c.copy()
    d[0] = 1
    assert paired_bootstrap(c, d) > 0.5


def test_determinism_and_seed():
    x = np.random.default_rng(4).normal(size=100)
    y = x + np.random.default_rng(5).normal(0.1, 1.0, size=100)
    assert bootstrap_mean(x, seed=7) == bootstrap_mean(x, seed=7)
    assert paired_bootstrap(x, y, seed=7) == paired_bootstrap(x, y, seed=7)
    assert bootstrap_mean(x, seed=7) != bootstrap_mean(x, seed=8)


def test_length_mismatch_raises():
    for fn in (mcnemar, paired_bootstrap):
        with pytest.raises(ValueError, match="3 and 2"):
            fn([1, 0, 1], [1, 0])


def test_compare_and_significant():
    a, b = [1] * 10 + [0] * 5, [0] * 15
    assert stats.compare("proportion", a, b) == mcnemar(a, b)
    x = np.arange(20.0)
    expected = paired_bootstrap(x, x + 1, np.ones(20), seed=1)
    assert stats.compare("mean", x, x + 1, weights_a=np.ones(20), seed=1) == expected
    with pytest.raises(ValueError):
        stats.compare("median", a, b)
    assert stats.significant(0.01) and not stats.significant(0.05) and not stats.significant(math.nan)
    assert stats.significant(0.04, alpha=0.05) and not stats.significant(0.04, alpha=0.01)
