"""Uncertainty for the leaderboard: confidence intervals and paired significance tests.

Pure functions over plain sequences (numpy only, no torch). Everything random takes a `seed` and
draws from its own ``numpy.random.Generator``, so a rendered page is identical run to run. Paired
tests require the two systems' scores on the same items in the same order: pairing removes the
item-difficulty variance that both systems share, which is what makes small gaps detectable.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
_EXACT_MAX_N = 20_000  # exact integer binomial tails up to here (~0.1 s); log-space above
_CHUNK = 1 << 20  # resampled indices held at once, to bound memory on large item sets


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials. Unlike the Wald interval it stays inside
    [0, 1] and keeps non-zero width at k=0 and k=n, where accuracies near 0% or 100% live."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At k=0 (k=n) center and half are equal mathematically; pin the bound so rounding can't leak.
    return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


def _arrays(values, weights=None) -> tuple[np.ndarray, np.ndarray | None]:
    v = np.asarray(values, dtype=float)
    if weights is None:
        return v, None
    w = np.asarray(weights, dtype=float)
    if w.shape != v.shape:
        raise ValueError(f"values and weights differ in length: {len(v)} vs {len(w)}")
    return v, w


def _stat(v: np.ndarray, w: np.ndarray | None, idx=None) -> np.ndarray:
    """Mean (or ratio sum(v)/sum(w)) of v, along the last axis of `idx` when resampling."""
    if idx is None:
        return v.mean() if w is None else v.sum() / w.sum()
    return v[idx].mean(axis=-1) if w is None else v[idx].sum(axis=-1) / w[idx].sum(axis=-1)


def _resampled_indices(n: int, n_boot: int, seed: int):
    """Yield blocks of bootstrap index rows (n_boot rows in all), drawn from one seeded Generator."""
    rng, rows = np.random.default_rng(seed), max(1, _CHUNK // max(n, 1))
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def bootstrap_mean(values, weights=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over items. With `weights` it is the ratio estimator
    sum(values)/sum(weights) resampling (value, weight) pairs: an item's summed -logp with its token
    count gives a token-weighted NLL whose uncertainty still comes from items, not tokens."""
    v, w = _arrays(values, weights)
    if len(v) < 2:
        return math.nan, math.nan
    stats = np.concatenate([_stat(v, w, idx) for idx in _resampled_indices(len(v), n_boot, seed)])
    lo, hi = np.nanquantile(stats, [(1 - level) / 2, (1 + level) / 2])  # nan: an all-zero-weight draw
    return float(lo), float(hi)


def _binom_lower_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    if n <= _EXACT_MAX_N:  # exact: big-int sum of C(n, i), one correctly rounded division at the end
        c = total = 1
        for i in range(k):
            c = c * (n - i) // (i + 1)
            total += c
        return total / 2**n
    i = np.arange(k + 1)  # log-space: 2**n overflows floats, so sum the pmf as a logsumexp
    lgamma = np.vectorize(math.lgamma)
    logp = lgamma(n + 1.0) - lgamma(i + 1.0) - lgamma(n - i + 1.0) - n * math.log(2)
    top = logp.max()
    return float(math.exp(top + math.log(np.exp(logp - top).sum())))


def _paired(a, b) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired test needs equal lengths, got {len(a)} and {len(b)}")


def mcnemar(a, b) -> float:
    """Exact two-sided McNemar p-value for paired 0/1 outcomes: only discordant items carry
    information, and under H0 each is equally likely to favour either side (Binomial(n, 1/2))."""
    _paired(a, b)
    a, b = np.asarray(a), np.asarray(b)
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("mcnemar needs 0/1 outcomes")
    b01, b10 = int(((a == 0) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())
    if b01 + b10 == 0:
        return 1.0
    return min(1.0, 2 * _binom_lower_tail(min(b01, b10), b01 + b10))


def paired_bootstrap(a, b, weights_a=None, weights_b=None, n_boot: int = 2000, seed: int = 0) -> float:
    """Two-sided paired-bootstrap p-value (Koehn 2004; Berg-Kirkpatrick et al. 2012) that the
    (ratio-)means of a and b differ. Items are resampled jointly so per-item pairing is kept; p is
    twice the fraction of resamples whose difference does not keep the observed sign."""
    _paired(a, b)
    va, wa = _arrays(a, weights_a)
    vb, wb = _arrays(b, weights_b)
    observed = _stat(va, wa) - _stat(vb, wb)
    if observed == 0 or len(va) == 0:
        return 1.0
    flips = 0
    for idx in _resampled_indices(len(va), n_boot, seed):
        d = _stat(va, wa, idx) - _stat(vb, wb, idx)
        # A tie (d == 0) counts as a flip: conservative, so ties on 0/1 data never manufacture a "best".
        flips += int(np.count_nonzero(~(d * np.sign(observed) > 0)))
    return min(1.0, 2 * flips / n_boot)


def significant(p: float, alpha: float = 0.05) -> bool:
    """True when p is a real number below alpha (a nan p-value is never significant)."""
    return bool(p < alpha)


def compare(kind: str, a, b, **kw) -> float:
    """p-value for "is a different from b": "proportion" (0/1 per item) -> McNemar; "mean" -> paired
    bootstrap, with `weights_a`/`weights_b`/`n_boot`/`seed` passed through."""
    if kind == "proportion":
        return mcnemar(a, b, **kw)
    if kind == "mean":
        return paired_bootstrap(a, b, **kw)
    raise ValueError(f"compare kind {kind!r} is not accepted; accepted: proportion, mean")
