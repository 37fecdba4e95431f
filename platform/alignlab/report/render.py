"""Markdown for an ablation report: a headline table a researcher reads in one screen, then every statistic.

Numbers are rounded to the precision their uncertainty supports (two significant digits of the std or of
the CI half-width), and a delta whose Holm-adjusted p is not below alpha is labelled "n.s." next to its
interval, so a difference the seeds cannot support never reads as a result.
"""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING

from alignlab.report.stats import MIN_SEEDS

if TYPE_CHECKING:  # aggregate imports this module to render its tables
    from alignlab.report.aggregate import ReportTable


def _decimals(spread: float) -> int | None:
    """Decimal places that keep two significant digits of `spread` (None when it gives no scale)."""
    if not math.isfinite(spread) or spread <= 0:
        return None
    return min(6, max(0, 1 - math.floor(math.log10(spread))))


def _fixed(x: float, decimals: int | None, sign: bool = False) -> str:
    if math.isnan(x):
        return "n/a"
    if decimals is None:
        return f"{x:+.4g}" if sign else f"{x:.4g}"
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def format_p(p: float) -> str:
    """Two significant digits; below 0.001 as "<0.001"."""
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.2g}"


def _p_label(name: str, p: float) -> str:
    text = format_p(p)
    return f"{name}{text}" if text.startswith("<") else f"{name}={text}"


def mean_text(row: dict) -> str:
    """"mean ± std" rounded to the std's precision ("± n/a" for one seed)."""
    places = _decimals(row["std"])
    return f"{_fixed(row['mean'], places)} ± {_fixed(row['std'], places)}"


def delta_text(row: dict) -> str:
    """"+12.4 [8.1, 16.7] p_holm=0.004", "+2.1 [-3.0, 7.2] n.s.", or the delta with why it has no test."""
    if row["test"] == "none":
        if row["n"] < 2 or row["n_baseline"] < 2:
            why = "n < 2"
        else:
            why = "a NaN value" if math.isnan(row["delta"]) else "no spread"
        return f"{_fixed(row['delta'], None, sign=True)} (no test: {why})"
    places = _decimals((row["ci_high"] - row["ci_low"]) / 2)
    low, high = _fixed(row["ci_low"], places), _fixed(row["ci_high"], places)
    text = f"{_fixed(row['delta'], places, sign=True)} [{low}, {high}]"
    if row["significant"] is None:  # outside the Holm family: the raw p, said to be unadjusted
        return f"{text} {_p_label('p', row['p'])} (unadjusted)"
    return f"{text} {_p_label('p_holm', row['p_holm'])}" if row["significant"] else f"{text} n.s."


def _n_text(row: dict) -> str:
    planned = row["n"] + len(row["missing_seeds"])
    return str(row["n"]) if planned == row["n"] else f"{row['n']} of {planned}"


def _aligned(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """A Markdown table padded so that its columns also line up in a terminal."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    return [line(header), rule, *[line(r) for r in rows]]


def headline_table(table: ReportTable, metrics: list[str]) -> list[str]:
    """One row per metric x arm: n, mean ± std, delta to the baseline [95 % CI] with its verdict, the test."""
    mixed = 0 < len(table.preliminary_arms) < len(table.arms)
    rows = []
    for metric in metrics:
        for index, arm in enumerate(table.arms):
            row = table.cell(arm, metric)
            label = f"{arm} (baseline)" if arm == table.baseline else arm
            if mixed and row["preliminary"]:
                label += " (preliminary)"
            baseline = arm == table.baseline
            rows.append([metric if index == 0 else "", label, _n_text(row), mean_text(row),
                         "" if baseline else delta_text(row), "" if baseline else row["test"]])
    header = ["metric", "arm", "n", "mean ± std", f"Δ vs {table.baseline} [95 % CI]", "test"]
    return _aligned([h.replace("|", "\\|") for h in header],
                    [[c.replace("|", "\\|") for c in r] for r in rows], right={2})


def notes(table: ReportTable) -> list[str]:
    """What the cells mean, which test and correction produced them, and every run that is not in them."""
    lines = textwrap.wrap(
        f"Δ = arm − baseline [95 % CI]: paired t-test when both arms have the same seeds, else Welch's t. "
        f"p_holm: Holm-adjusted over {table.family_size} comparisons ({len(table.arms) - 1} arm(s) x "
        f"{len(table.family)} metric(s)); n.s. = p_holm ≥ {table.alpha:g}. n: seeds with a value (k of m planned). "
        f"Permutation and Welch p, effect sizes, CIs of the means: report.csv, report.json, and Details in "
        f"report.md.", width=110, break_on_hyphens=False)
    if table.missing_runs:
        lines += ["", f"Missing {len(table.missing_runs)} run(s) (not in the numbers above):"]
        lines += [f"- {r['arm']} seed {r['seed']}: {r['reason']}" for r in table.missing_runs]
    if table.skipped_runs:
        lines += ["", f"Left out {len(table.skipped_runs)} run(s):"]
        lines += [f"- {r.get('run_id', '?')} arm {r.get('arm')} seed {r.get('seed')}: {r.get('reason')}"
                  for r in table.skipped_runs]
    return lines


def preliminary_banner(table: ReportTable) -> list[str]:
    arms = table.preliminary_arms
    if not arms:
        return []
    if len(arms) == len(table.arms):
        who = "every arm has"
    else:
        who = f"arm {arms[0]} has" if len(arms) == 1 else f"arms {', '.join(arms)} have"
    return textwrap.wrap(f"**Preliminary**: {who} fewer than {MIN_SEEDS} seeds; intervals are wide and tests "
                         f"weak (a sign-flip test cannot reach p < 0.05 below 6 seeds). Run more seeds before "
                         f"concluding.", width=110, break_on_hyphens=False) + [""]


def details_table(table: ReportTable, metrics: list[str]) -> list[str]:
    """Every statistic of every arm x metric, at display precision (report.json has full precision)."""
    header = ["metric", "arm", "seeds", "mean [95 % CI]", "Δ [95 % CI]", "test", "p", "p_perm", "p_welch",
              "p_holm", "effect size"]
    rows = []
    for metric in metrics:
        for arm in table.arms:
            row = table.cell(arm, metric)
            places = _decimals((row["mean_ci_high"] - row["mean_ci_low"]) / 2)
            mean = f"{_fixed(row['mean'], places)} [{_fixed(row['mean_ci_low'], places)}, " \
                   f"{_fixed(row['mean_ci_high'], places)}]"
            seeds = ",".join(map(str, row["seeds"])) + (f" (missing {','.join(map(str, row['missing_seeds']))})"
                                                        if row["missing_seeds"] else "")
            if arm == table.baseline:
                rows.append([metric, f"{arm} (baseline)", seeds, mean] + [""] * 7)
                continue
            places = _decimals((row["ci_high"] - row["ci_low"]) / 2)
            delta = f"{_fixed(row['delta'], places, sign=True)} [{_fixed(row['ci_low'], places)}, " \
                    f"{_fixed(row['ci_high'], places)}]"
            effect = "n/a" if math.isnan(row["effect_size"]) else \
                f"{row['effect_size_kind'].replace('cohens_dz', 'd_z').replace('hedges_g', 'g')} " \
                f"{row['effect_size']:+.2f}"
            rows.append([metric, arm, seeds, mean, delta, row["test"], format_p(row["p"]), format_p(row["p_perm"]),
                         format_p(row["p_welch"]), format_p(row["p_holm"]), effect])
    return _aligned([h.replace("|", "\\|") for h in header], [[c.replace("|", "\\|") for c in r] for r in rows],
                    right=set())


def report_markdown(table: ReportTable, metrics: list[str], details: bool = True) -> str:
    """Banner (preliminary), headline table, notes; with `details`, the table of every statistic."""
    unknown = [m for m in metrics if m not in table.metrics]
    if unknown:
        raise ValueError(f"metrics {unknown} are not in the report; available: {table.metrics}")
    lines = preliminary_banner(table) + headline_table(table, metrics) + [""] + notes(table)
    if details:
        lines += ["", "## Details", ""] + details_table(table, metrics)
    return "\n".join(lines) + "\n"
