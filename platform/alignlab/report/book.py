"""The results book: one Markdown page per shipped seed spec, regenerated from that spec's finished runs.

A page puts the platform's measured table (mean ± std over seeds, the delta to the baseline arm with its
95 % interval and Holm-adjusted p, from `alignlab.report.aggregate`) beside the paper's own numbers (the
spec's `paper:` block) and gives one verdict per claim of the paper:

- "reproduces": the Holm-adjusted test is significant and the delta has the claimed sign;
- "does not reproduce": significant, with the opposite sign;
- "inconclusive at this scale": not significant (n.s.), or no test was possible (fewer than 2 seeds);
- "not run": the arm or the baseline has no finished run.

Any verdict from an arm with fewer than 3 finished seeds is marked preliminary, and so is the page. The
verdicts are about SynthCaps at laptop scale, not about the paper's data: a page says so, and lists the
recipe it ran.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from alignlab.ablation import AblationSpec, PaperClaim
from alignlab.report.aggregate import MIN_SEEDS, ReportTable, build_report


@dataclass(frozen=True)
class Verdict:
    claim: PaperClaim
    verdict: str
    evidence: str
    preliminary: bool


def claim_tables(spec: AblationSpec, records: list[dict]) -> dict[str, ReportTable]:
    """One report per baseline the claims name (the spec's baseline first), each over the metrics of the page,
    so every claim's p-value is Holm-adjusted with the other claims and metrics against the same baseline."""
    paper = spec.paper
    logged = {name for record in records for name in record["metrics"]}
    metrics = [m for m in dict.fromkeys(list(paper.columns.values()) + [c.metric for c in paper.claims])
               if m in logged]
    arms = {record["arm"] for record in records}
    baselines = dict.fromkeys([spec.baseline_arm] + [c.baseline or spec.baseline_arm for c in paper.claims])
    return {b: build_report(records, baseline=b, metrics=metrics) for b in baselines if b in arms and metrics}


def judge_claim(claim: PaperClaim, table: ReportTable | None) -> Verdict:
    """The verdict on one claim from its report's cell (`claim.arm` vs that report's baseline)."""
    if table is None or claim.arm not in table.arms or table.runs_per_arm.get(claim.arm, 0) == 0 \
            or claim.metric not in table.metrics:
        return Verdict(claim, "not run", "no finished runs of this arm or of its baseline", True)
    cell = table.cell(claim.arm, claim.metric)
    preliminary = min(table.runs_per_arm[claim.arm], table.runs_per_arm[table.baseline]) < MIN_SEEDS
    delta, low, high = cell["delta"], cell["ci_low"], cell["ci_high"]
    if math.isnan(delta) or cell.get("significant") is None:
        return Verdict(claim, "inconclusive at this scale",
                       f"no test possible (n = {cell['n']} vs {cell['n_baseline']} seeds)", preliminary)
    interval = (f"Δ = {delta:+.2f} [{low:+.2f}, {high:+.2f}] ({cell['test']}, n = {cell['n']}, "
                f"p_holm = {cell['p_holm']:.3g})")
    if not cell["significant"]:
        return Verdict(claim, "inconclusive at this scale", f"{interval}: n.s.", preliminary)
    wanted = 1 if claim.direction == "higher" else -1
    if math.copysign(1, delta) == wanted:
        return Verdict(claim, "reproduces", interval, preliminary)
    return Verdict(claim, "does not reproduce", f"{interval}: significant in the opposite direction", preliminary)


def _fmt(value: float, digits: int = 1, sign: str = "") -> str:
    """`digits` decimals; a measured value below 1 in size (a loss, a usage fraction) keeps 3 significant digits
    instead, so that 0.394 against 0.327 does not print as 0.4 against 0.3."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if digits == 1 and 0 < abs(value) < 1:
        return f"{value:{sign}.3g}"
    return f"{value:{sign}.{digits}f}"


def _measured_cell(table: ReportTable, arm: str, metric: str) -> str:
    cell = table.cell(arm, metric)
    if cell["n"] == 0:
        return "not run"
    text = f"{_fmt(cell['mean'])} ± {_fmt(cell['std'])}"
    if arm != table.baseline and not math.isnan(cell["delta"]):
        if math.isnan(cell["ci_low"]):  # e.g. one seed on a side: a difference, no interval
            text += f" (Δ {_fmt(cell['delta'], sign='+')}, no test possible)"
        else:
            mark = "" if cell.get("significant") else " n.s."
            text += f" (Δ {_fmt(cell['delta'], sign='+')} [{_fmt(cell['ci_low'])}, {_fmt(cell['ci_high'])}]{mark})"
    return text


def book_page(spec: AblationSpec, records: list[dict], *, command: str, recipe: str) -> tuple[str, str]:
    """(Markdown page, status) of `spec` (its `paper` block must be set) from its finished runs' records
    ({"arm", "seed", "metrics"}, as `alignlab report` collects them; empty: not run yet)."""
    paper = spec.paper
    if paper is None:
        raise ValueError(f"spec {spec.name} has no `paper:` block; the results book needs the paper's numbers")
    tables = claim_tables(spec, records) if records else {}
    main = tables.get(spec.baseline_arm)
    verdicts = [judge_claim(c, tables.get(c.baseline or spec.baseline_arm)) for c in paper.claims]
    if main is None:
        status = "not run yet"
    elif any(main.runs_per_arm.get(a, 0) < MIN_SEEDS for a in spec.arm_overrides()):
        status = "preliminary (fewer than 3 finished seeds in some arm)"
    else:
        status = "complete"
    lines = [f"# {paper.title}", "", f"Spec: `ablations/{spec.name}.yaml` · paper: {paper.source} · "
             f"status: **{status}**", "", f"Regenerate: `{command}`", "", f"Recipe at this scale: {recipe}", ""]
    if spec.description:
        lines += [spec.description, ""]
    lines += ["## Verdicts", "", "| claim | arm vs baseline | metric | verdict | evidence |", "|---|---|---|---|---|"]
    for v in verdicts:
        label = f"{v.verdict} (preliminary)" if v.preliminary and v.verdict != "not run" else v.verdict
        lines.append(f"| {v.claim.claim} | {v.claim.arm} vs {v.claim.baseline or spec.baseline_arm} | "
                     f"`{v.claim.metric}` | **{label}** | {v.evidence} |")
    lines += [""]
    if main is not None:
        lines += [f"## Measured here (mean ± std over seeds; Δ to {main.baseline} with its 95 % interval)", "",
                  "| arm | seeds | " + " | ".join(f"`{m}`" for m in main.metrics) + " |",
                  "|---|---|" + "---|" * len(main.metrics)]
        for arm in main.arms:
            lines.append(f"| {arm} | {main.runs_per_arm[arm]} | "
                         + " | ".join(_measured_cell(main, arm, m) for m in main.metrics) + " |")
        lines += ["", f"Holm-adjusted over {main.family_size} tests at α = {main.alpha}; n.s. = not significant.",
                  ""]
    if paper.rows:
        lines += ["## The paper's numbers", "", "| arm here | paper row | " + " | ".join(paper.columns) + " |",
                  "|---|---|" + "---|" * len(paper.columns)]
        for arm, row in paper.rows.items():
            lines.append(f"| {arm} | {row.label} | "
                         + " | ".join(_fmt(row.values.get(c), 2) for c in paper.columns) + " |")
        lines += [""]
    if paper.columns:
        mapping = ", ".join(f"{col} ↔ `{metric}`" for col, metric in paper.columns.items())
        lines += [f"Paper columns stand for these SynthCaps metrics: {mapping}. The scales differ by orders of "
                  "magnitude; a verdict says whether the *direction* of the paper's claim holds here.", ""]
    if paper.notes:
        lines += [paper.notes.strip(), ""]
    return "\n".join(lines), status


# The pages, most important first.
BOOK_ORDER = ("demo", "benchmark", "benchmark_6ep", "psd", "psd_noise40", "noise_sweep", "hn_nce", "diht", "cat")
_STATUS = re.compile(r"status: \*\*(.+?)\*\*")


def write_book_index(out_dir: Path) -> Path:
    """docs/results/README.md: every page in `out_dir`, in BOOK_ORDER then by name, with its status line."""
    pages = sorted(out_dir.glob("*.md"), key=lambda p: (BOOK_ORDER.index(p.stem) if p.stem in BOOK_ORDER
                                                        else len(BOOK_ORDER), p.stem))
    lines = ["# The alignlab results book", "",
             "One page per shipped seed spec, each regenerated from real runs by "
             "`alignlab report ablations/SPEC.yaml --book`. A verdict is about SynthCaps at laptop scale; a "
             "page with fewer than 3 finished seeds in some arm is preliminary.", "",
             "| page | status |", "|---|---|"]
    for page in pages:
        if page.name == "README.md":
            continue
        text = page.read_text()
        title = text.splitlines()[0].lstrip("# ").strip() if text else page.stem
        status = _STATUS.search(text)
        lines.append(f"| [{title}]({page.name}) | {status.group(1) if status else '?'} |")
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
