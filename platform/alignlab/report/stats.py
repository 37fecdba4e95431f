"""Statistics for "does arm A beat the baseline": confidence intervals, paired and unpaired tests, effect
sizes and Holm's correction, as plain functions of seed-level values.

Why these: seeds are the replication unit of an ablation and there are few of them (2-10). When two arms ran
the same seeds, a seed fixes data order and initialisation for both, so the per-seed differences carry
the signal (paired t-test; the exact sign-flip permutation test checks it without the normality
assumption). Arms without common seeds get Welch's t, which does not assume equal variances. A report
compares many arms x metrics at once, so its p-values are Holm-adjusted (family-wise error <= alpha).

Every function returns NaN for what the data cannot give (fewer than 2 values, NaN inputs) instead of
raising: a report shows "n/a" there.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

CONFIDENCE = 0.95
EXACT_PERMUTATION_MAX_N = 16  # 2^16 sign patterns enumerated at most; Monte Carlo beyond
PERMUTATION_RESAMPLES = 100_000
PERMUTATION_SEED = 0
MIN_SEEDS = 3  # fewer finished seeds than this: an arm (and its report) is preliminary


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline on one metric: delta = arm - baseline, its CI, the test and effect size.

    `test` is "paired t" (same seeds in both arms), "sign-flip" (same seeds, but every difference is equal,
    so t is undefined), "welch t", or "none" (too few values, NaN values, or no spread without pairs);
    `n` counts pairs for a paired test, the arm's values otherwise (`n_baseline` the baseline's).
    `p_perm` is the sign-flip permutation p of a paired test (NaN otherwise); `p_welch` is Welch's p in
    every case, for comparison. `effect_size` is Cohen's d_z (paired) or Hedges' g (unpaired)."""

    delta: float
    ci_low: float
    ci_high: float
    test: str
    paired: bool
    n: int
    n_baseline: int
    p: float
    p_perm: float
    p_welch: float
    effect_size: float
    effect_size_kind: str


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """t-based interval of the mean: mean ± t_{(1+c)/2, n-1} * s / sqrt(n); (NaN, NaN) for n < 2."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    half = stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def mean_ci_columns(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """`mean_ci` of every column of a 2-D array at once, NaN entries left out of their column (a curve's
    seeds at each step; a seed that has not reached a step yet is NaN there). NaN where a column has < 2."""
    x = np.asarray(values, dtype=float)
    n = np.sum(~np.isnan(x), axis=0)
    low, high = np.full(x.shape[1], math.nan), np.full(x.shape[1], math.nan)
    ok = n >= 2
    if ok.any():
        mean, sd = np.nanmean(x[:, ok], axis=0), np.nanstd(x[:, ok], axis=0, ddof=1)
        half = stats.t.ppf((1 + confidence) / 2, n[ok] - 1) * sd / np.sqrt(n[ok])
        low[ok], high[ok] = mean - half, mean + half
    return low, high


def cohens_dz(differences: Sequence[float]) -> float:
    """Cohen's d_z = mean(d) / sd(d) of paired differences (ddof=1); NaN for n < 2 or sd = 0."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2 or d.std(ddof=1) == 0:
        return math.nan
    return float(d.mean() / d.std(ddof=1))


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Hedges' g of mean(a) - mean(b): Cohen's d with the pooled sd (ddof=1) times the exact small-sample
    correction J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)), df = n_a + n_b - 2 (Hedges 1981).
    NaN unless both samples have >= 2 values and the pooled sd is > 0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    df = len(a) + len(b) - 2
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / df)
    if not pooled > 0:
        return math.nan
    correction = math.exp(special.gammaln(df / 2) - special.gammaln((df - 1) / 2)) / math.sqrt(df / 2)
    return float(correction * (a.mean() - b.mean()) / pooled)


@contextlib.contextmanager
def _quiet_precision_warning():
    """scipy warns of "precision loss" when a sample's values are (nearly) identical, e.g. colour accuracy at
    100 % in every seed; the spread is then exactly what the test should see, and the warning only clutters
    the report."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        yield


def paired_t(a: Sequence[float], b: Sequence[float],
             confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean difference, CI low, CI high, two-sided p) of the paired t-test on d = a - b (same order =
    same seed). CI: mean(d) ± t_{(1+c)/2, n-1} * sd(d) / sqrt(n); p from scipy.stats.ttest_rel.
    All differences equal (no spread, e.g. accuracies on a small test set that moved by the same count):
    the interval collapses onto them and p is NaN, because t is undefined there (scipy's limit p = 0
    would claim certainty from two seeds); `compare` falls back to the sign-flip test. NaN for n < 2."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return float(d.mean()) if len(d) else math.nan, math.nan, math.nan, math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return mean, mean, mean, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, len(d) - 1) * sd / math.sqrt(len(d)))
    with _quiet_precision_warning():
        p = float(stats.ttest_rel(a, b).pvalue)
    return mean, mean - half, mean + half, p


def welch_t(a: Sequence[float], b: Sequence[float],
            confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean(a) - mean(b), CI low, CI high, two-sided p) of Welch's t-test, one scipy call:
    `scipy.stats.ttest_ind(equal_var=False)` and its `confidence_interval` (delta ± t_{(1+c)/2, nu} *
    sqrt(s_a^2/n_a + s_b^2/n_b), Welch-Satterthwaite nu). No spread in either sample: the interval
    collapses onto delta and p is NaN (t is undefined, see `paired_t`). NaN interval and p unless both
    samples have >= 2 values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    delta = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return delta, math.nan, math.nan, math.nan
    if a.var() + b.var() == 0:
        return delta, delta, delta, math.nan
    with _quiet_precision_warning():
        result = stats.ttest_ind(a, b, equal_var=False)
        interval = result.confidence_interval(confidence)
    return delta, float(interval.low), float(interval.high), float(result.pvalue)


def sign_flip_p(differences: Sequence[float], *, max_exact_n: int = EXACT_PERMUTATION_MAX_N,
                resamples: int = PERMUTATION_RESAMPLES, seed: int = PERMUTATION_SEED) -> float:
    """Two-sided p of the sign-flip permutation test of mean(d) = 0: the share of sign patterns s in
    {-1, +1}^n with |sum(s * d)| >= |sum(d)|. Exact (all 2^n patterns, the observed one included) for
    n <= `max_exact_n`; beyond, `resamples` random patterns from a generator seeded with `seed`, with
    p = (1 + hits) / (1 + resamples) (never 0; Phipson & Smyth 2010). The smallest exact p is 2 / 2^n:
    0.25 for 3 seeds, so this test alone cannot reach 0.05 below 6 seeds. NaN for n < 1 or NaN values."""
    d = np.asarray(differences, dtype=float)
    if len(d) == 0 or not np.all(np.isfinite(d)):
        return math.nan
    observed = abs(d.sum())
    tolerance = 100 * np.finfo(float).eps * max(observed, np.abs(d).sum())  # ties up to rounding count as hits
    if len(d) <= max_exact_n:
        patterns = np.arange(2 ** len(d))[:, None] >> np.arange(len(d)) & 1
        sums = np.abs(((2 * patterns - 1) * d).sum(axis=1))
        return float(np.mean(sums >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 10_000):  # chunks bound the memory at 10k x n
        signs = rng.choice((-1.0, 1.0), size=(min(10_000, resamples - start), len(d)))
        hits += int(np.sum(np.abs(signs @ d) >= observed - tolerance))
    return (1 + hits) / (1 + resamples)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order: sort ascending, p_adj(i) =
    max_{j <= i} min(1, (m - j + 1) p_(j)) for 1-based rank i, so adjusted values never decrease with the
    raw ones. NaN entries are not tests: they stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(len(p), math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    if len(tested) == 0:
        return adjusted.tolist()
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(stepped)
    return adjusted.tolist()


def compare(arm: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE) -> Comparison:
    """Compare an arm's per-seed values ({seed: value}) with the baseline's.

    Paired (t-test on the differences, sign-flip permutation p, d_z) when both arms have the metric for
    exactly the same seeds, at least 2 of them; when the differences have no spread the sign-flip p is the
    test. Otherwise Welch's t and Hedges' g on all values. A NaN value anywhere (e.g. a diverged run) leaves
    the test undefined ("none") rather than dropping the seed.
    """
    a, b = list(arm.values()), list(baseline.values())
    welch = welch_t(a, b, confidence)
    if not all(math.isfinite(v) for v in a + b) or len(a) < 2 or len(b) < 2:
        return Comparison(welch[0], math.nan, math.nan, "none", False, len(a), len(b), math.nan, math.nan,
                          math.nan, math.nan, "")
    if set(arm) == set(baseline):
        seeds = sorted(arm)
        x, y = [arm[s] for s in seeds], [baseline[s] for s in seeds]
        delta, low, high, p = paired_t(x, y, confidence)
        differences = np.subtract(x, y)
        p_perm = sign_flip_p(differences)
        test = "paired t" if math.isfinite(p) else "sign-flip"
        return Comparison(delta, low, high, test, True, len(seeds), len(seeds), p if math.isfinite(p) else p_perm,
                          p_perm, welch[3], cohens_dz(differences), "cohens_dz")
    delta, low, high, p = welch
    return Comparison(delta, low, high, "welch t" if math.isfinite(p) else "none", False, len(a), len(b), p,
                      math.nan, p, hedges_g(a, b), "hedges_g")
