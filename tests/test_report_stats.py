"""Report statistics against scipy, brute force and hand-computed numbers; the report's n.s. labelling,
missing seeds and preliminary marking in Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from alignlab.report import build_report, write_report
from alignlab.report.stats import (cohens_dz, compare, hedges_g, holm, mean_ci, paired_t, sign_flip_p,
                                   welch_t)

# Hand-made seed-level data: the arm beats the baseline on every seed by 0.9-1.4.
BASE = [10.0, 12.0, 11.0, 13.0]
ARM = [11.2, 13.4, 11.9, 14.1]
DIFF = [1.2, 1.4, 0.9, 1.1]  # ARM - BASE


def test_paired_t_against_scipy_and_hand_computed():
    delta, low, high, p = paired_t(ARM, BASE)
    reference = stats.ttest_rel(ARM, BASE)
    assert p == pytest.approx(reference.pvalue, rel=1e-12)
    ci = reference.confidence_interval(0.95)
    assert (low, high) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
    # by hand: mean 1.15, sd(d) = sqrt(0.0433333), t_{0.975,3} = 3.182446305284263 (table)
    sd = math.sqrt(sum((d - 1.15) ** 2 for d in DIFF) / 3)
    assert delta == pytest.approx(1.15)
    assert high - delta == pytest.approx(3.182446305284263 * sd / 2, rel=1e-12)
    assert cohens_dz(DIFF) == pytest.approx(1.15 / sd)
    # all differences equal: the interval collapses and t is undefined (no p from two lucky seeds)
    lockstep = paired_t([2.0, 3.0], [1.0, 2.0])
    assert lockstep[:3] == (1.0, 1.0, 1.0) and math.isnan(lockstep[3])
    assert all(math.isnan(v) for v in paired_t([1.0], [0.0])[1:])


def test_welch_against_scipy_and_hand_computed():
    a, b = [1.0, 3.0], [2.0, 6.0]  # s_a^2/n_a = 1, s_b^2/n_b = 4 -> se^2 = 5, df = 25 / (1 + 16) = 25/17
    delta, low, high, p = welch_t(a, b)
    assert delta == -2.0
    assert high - delta == pytest.approx(stats.t.ppf(0.975, 25 / 17) * math.sqrt(5.0), rel=1e-12)
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert p == pytest.approx(reference.pvalue, rel=1e-12)
    ci = reference.confidence_interval(0.95)
    assert (low, high) == (pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10))
    constant = welch_t([2.0, 2.0], [3.0, 3.0])
    assert constant[:3] == (-1.0, -1.0, -1.0) and math.isnan(constant[3])
    assert math.isnan(welch_t([1.0], [2.0, 3.0])[3])


def test_hedges_g_and_mean_ci_by_hand():
    # a = [1, 3], b = [2, 6]: pooled var = (2 + 8) / 2 = 5, d = -2 / sqrt 5; df = 2 -> J = Gamma(1) /
    # (1 * Gamma(1/2)) = 1 / sqrt(pi)
    assert hedges_g([1.0, 3.0], [2.0, 6.0]) == pytest.approx(-2 / math.sqrt(5) / math.sqrt(math.pi), rel=1e-12)
    # large df: J -> 1 - 3 / (4 df - 1), Hedges' approximation
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 200), rng.normal(0, 1, 300)
    d = (a.mean() - b.mean()) / math.sqrt((199 * a.var(ddof=1) + 299 * b.var(ddof=1)) / 498)
    assert hedges_g(a, b) == pytest.approx(d * (1 - 3 / (4 * 498 - 1)), rel=1e-5)
    low, high = mean_ci([1.0, 2.0, 3.0])  # mean 2, s = 1, t_{0.975,2} = 4.302652729911275
    assert (low, high) == (pytest.approx(2 - 4.302652729911275 / math.sqrt(3)),
                           pytest.approx(2 + 4.302652729911275 / math.sqrt(3)))
    assert all(math.isnan(v) for v in mean_ci([5.0]))


def _brute_force_sign_flip(d: list[float]) -> float:
    observed = abs(sum(d))
    hits = total = 0
    for signs in itertools.product((-1, 1), repeat=len(d)):
        total += 1
        hits += abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-9
    return hits / total


@pytest.mark.parametrize("d", [DIFF, [0.5, -0.2, 0.3], [1.0, 1.0, 1.0], [3.0, -1.0, 2.0, -0.5, 0.25, 1.5, -2.0],
                               [0.0, 0.0], [2.5]])
def test_sign_flip_exact_against_brute_force(d):
    assert sign_flip_p(d) == pytest.approx(_brute_force_sign_flip(d), abs=1e-15)


def test_sign_flip_monte_carlo_beyond_the_exact_limit():
    d = list(np.random.default_rng(3).normal(0.4, 1.0, 17))
    exact = _brute_force_sign_flip(d)  # 2^17 patterns
    estimate = sign_flip_p(d, resamples=40_000)
    assert estimate == sign_flip_p(d, resamples=40_000)  # fixed seed: reproducible
    assert estimate != sign_flip_p(d, resamples=40_000, seed=1)
    assert estimate == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 40_000))
    assert sign_flip_p(d, max_exact_n=17) == pytest.approx(exact, abs=1e-15)
    assert math.isnan(sign_flip_p([])) and math.isnan(sign_flip_p([1.0, math.nan]))


def _brute_force_holm(p: list[float]) -> list[float]:
    """Definition: p_adj(i) = max over hypotheses j ranked no later than i of min(1, (m - rank_j + 1) p_j)."""
    ranked = sorted(range(len(p)), key=lambda i: p[i])
    rank = {i: r + 1 for r, i in enumerate(ranked)}
    m = len(p)
    return [max(min(1.0, (m - rank[j] + 1) * p[j]) for j in range(m) if rank[j] <= rank[i]) for i in range(m)]


def test_holm_hand_cases_and_brute_force():
    # m = 3, ascending 0.01, 0.03, 0.04: 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001, 0.9, 0.02]) == pytest.approx([1.0, 0.004, 1.0, 0.06])
    assert holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])  # ties share the value
    adjusted = holm([0.01, math.nan, 0.04])  # NaN is not a test: m = 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([]) == []
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = list(rng.uniform(0, 0.2, rng.integers(1, 9)) ** rng.uniform(0.5, 3))
        assert holm(p) == pytest.approx(_brute_force_holm(p), rel=1e-12)


def test_holm_against_statsmodels():
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    p = [0.001, 0.2, 0.013, 0.04, 0.04, 0.7]
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]), rel=1e-12)


def test_compare_picks_the_test_from_the_seeds():
    paired = compare(dict(enumerate(ARM)), dict(enumerate(BASE)))
    assert (paired.test, paired.paired, paired.n, paired.effect_size_kind) == ("paired t", True, 4, "cohens_dz")
    assert paired.p == pytest.approx(stats.ttest_rel(ARM, BASE).pvalue)
    assert paired.p_perm == pytest.approx(2 / 16)  # every difference positive: 2 extreme patterns of 16
    assert paired.p_welch == pytest.approx(stats.ttest_ind(ARM, BASE, equal_var=False).pvalue)
    # seeds 0-3 against 4-7: nothing to pair -> Welch on all values
    unpaired = compare(dict(enumerate(ARM)), {s + 4: v for s, v in enumerate(BASE)})
    assert (unpaired.test, unpaired.paired, unpaired.effect_size_kind) == ("welch t", False, "hedges_g")
    assert unpaired.p == pytest.approx(stats.ttest_ind(ARM, BASE, equal_var=False).pvalue)
    assert math.isnan(unpaired.p_perm)
    # one seed missing in the arm: the seed sets differ, Welch on the 3 + 4 values (nothing dropped)
    partial = compare({0: ARM[0], 1: ARM[1], 2: ARM[2]}, dict(enumerate(BASE)))
    assert (partial.test, partial.n, partial.n_baseline) == ("welch t", 3, 4)
    # the same count of test items gained on every seed: no spread, so the sign-flip p is the test
    lockstep = compare({0: 12.5, 1: 14.5, 2: 13.0}, {0: 8.5, 1: 10.5, 2: 9.0})
    assert (lockstep.test, lockstep.p, lockstep.ci_low, lockstep.ci_high) == ("sign-flip", 0.25, 4.0, 4.0)
    assert compare({0: 1.0, 1: 1.0}, {2: 1.0, 3: 1.0}).test == "none"  # constants, unpaired: nothing to test
    diverged = compare({0: math.nan, 1: 1.0}, {0: 1.0, 1: 2.0})
    assert diverged.test == "none" and math.isnan(diverged.p) and math.isnan(diverged.delta)


# A 3-seed report: "strong" beats the baseline on every seed, "noisy" does not; "short" has 2 seeds
# (preliminary) and is missing seed 2, which failed.
def _records() -> list[dict]:
    base = {0: 50.0, 1: 52.0, 2: 51.0}
    strong = {0: 58.0, 1: 64.0, 2: 61.0}
    noisy = {0: 53.0, 1: 49.0, 2: 52.5}
    short = {0: 51.0, 1: 53.5}
    records = []
    for arm, values in (("base", base), ("strong", strong), ("noisy", noisy), ("short", short)):
        records += [{"arm": arm, "seed": s, "metrics": {"acc": v, "loss": 1.0}} for s, v in values.items()]
    return records


MISSING = [{"arm": "short", "seed": 2, "reason": "failed: no results.json in runs/x/short/seed-2"}]


def test_report_cells_labels_and_holm_family():
    table = build_report(_records(), baseline="base", family=["acc"], missing_runs=MISSING)
    strong, noisy = table.cell("strong", "acc"), table.cell("noisy", "acc")
    assert strong["test"] == "paired t" and strong["paired"] is True and strong["n"] == 3
    raw = [table.cell(arm, "acc")["p"] for arm in ("strong", "noisy", "short")]
    assert [table.cell(arm, "acc")["p_holm"] for arm in ("strong", "noisy", "short")] == pytest.approx(holm(raw))
    assert strong["p_holm"] < 0.05 and strong["significant"] is True
    assert noisy["ci_low"] < 0 < noisy["ci_high"] and noisy["significant"] is False
    # loss is not in the Holm family: raw p only, no significance claim
    assert math.isnan(table.cell("strong", "loss")["p_holm"]) and table.cell("strong", "loss")["significant"] is None
    short = table.cell("short", "acc")
    assert short["n"] == 2 and short["missing_seeds"] == [2] and short["preliminary"] is True
    assert short["test"] == "welch t"  # seeds {0, 1} vs {0, 1, 2}
    assert table.preliminary_arms == ["short"]

    text = table.to_markdown(metrics=["acc"])
    row = next(line for line in text.splitlines() if "| strong " in line)
    assert f"p_holm={strong['p_holm']:.2g}" in row and "n.s." not in row
    noisy_row = next(line for line in text.splitlines() if "| noisy " in line)
    assert noisy_row.rstrip(" |").endswith("n.s.") or " n.s. " in noisy_row
    assert "paired t" in noisy_row
    assert text.startswith("**Preliminary**: arm short has fewer than 3 seeds")
    assert "short seed 2: failed: no results.json" in text
    short_row = next(line for line in text.splitlines() if "| short " in line)
    assert "2 of 3" in short_row and "(preliminary)" in short_row
    assert "Holm" in text and "paired t" in text and "Welch" in text


def test_report_with_all_arms_short_is_preliminary_and_everything_ns():
    records = [r for r in _records() if r["seed"] < 2 and r["arm"] != "short"]
    table = build_report(records, baseline="base")
    text = table.to_markdown()
    assert text.startswith("**Preliminary**") and "fewer than 3 seeds" in text
    assert table.preliminary_arms == ["base", "strong", "noisy"]
    # 2 seeds: the sign-flip p cannot go below 0.5
    strong = table.cell("strong", "acc")
    assert strong["p_perm"] == pytest.approx(0.5) and strong["p"] == pytest.approx(
        stats.ttest_rel([58.0, 64.0], [50.0, 52.0]).pvalue)


def test_csv_and_json_carry_the_new_fields(tmp_path):
    table = build_report(_records(), baseline="base", family=["acc"], missing_runs=MISSING)
    paths = write_report(table, tmp_path, metrics=["acc"])
    rows = {(r["arm"], r["metric"]): r for r in csv.DictReader(paths["csv"].open(newline=""))}
    strong = table.cell("strong", "acc")
    for key in ("p", "p_holm", "p_perm", "ci_low", "ci_high", "effect_size", "mean_ci_low"):
        assert float(rows["strong", "acc"][key]) == strong[key]  # full precision
    assert rows["strong", "acc"]["test"] == "paired t" and rows["strong", "acc"]["paired"] == "True"
    assert rows["short", "acc"]["missing_seeds"] == "2" and rows["short", "acc"]["seeds"] == "0;1"
    data = json.loads(paths["json"].read_text())
    cell = next(c for c in data["cells"] if c["arm"] == "strong" and c["metric"] == "acc")
    assert {k: cell[k] for k in ("p", "p_holm", "ci_low", "ci_high", "effect_size", "n", "paired", "test")} == {
        k: strong[k] for k in ("p", "p_holm", "ci_low", "ci_high", "effect_size", "n", "paired", "test")}
    assert data["missing_runs"] == MISSING and data["preliminary_arms"] == ["short"]
    assert data["holm"] == {"alpha": 0.05, "family_metrics": ["acc"], "family_size": 3}
    baseline = next(c for c in data["cells"] if c["arm"] == "base" and c["metric"] == "acc")
    assert baseline["test"] == "baseline" and baseline["p"] is None and baseline["delta"] == 0.0
