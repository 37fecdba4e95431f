"""The compare table as Markdown (the core's `ReportTable.to_markdown`, as `alignlab report` prints it), CSV
(`ReportTable.to_csv`, report.csv's columns) and LaTeX (a booktabs table of mean ± std and the delta)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from alignlab.report import ReportTable
from alignlab.report.render import delta_text, mean_text

FORMATS = {"md": "text/markdown", "csv": "text/csv", "tex": "application/x-tex"}


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                          ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
                          ("^", r"\textasciicircum{}")):
        text = text.replace(char, escaped)
    return text.replace("±", r"$\pm$").replace("<", r"$<$")


def to_latex(table: ReportTable) -> str:
    """One row per arm, two columns per metric: mean ± std (n) and Δ vs the baseline with its verdict."""
    header = " & ".join(["arm"] + [f"{_latex_escape(m)} & $\\Delta$" for m in table.metrics])
    lines = [r"\begin{tabular}{l" + "rr" * len(table.metrics) + "}", r"\toprule", header + r" \\", r"\midrule"]
    for arm in table.arms:
        cells = [_latex_escape(arm + (" (baseline)" if arm == table.baseline else ""))]
        for metric in table.metrics:
            row = table.cell(arm, metric)
            cells.append(_latex_escape(f"{mean_text(row)} (n={row['n']})"))
            cells.append("" if arm == table.baseline else _latex_escape(delta_text(row)))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def export(table: ReportTable, fmt: str) -> str:
    if fmt == "md":
        return table.to_markdown(details=False)
    if fmt == "csv":
        with tempfile.TemporaryDirectory() as tmp:
            return table.to_csv(Path(tmp) / "report.csv").read_text()
    if fmt == "tex":
        return to_latex(table)
    raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
