"""Ablation report statistics against hand-computed numbers, and final/best summaries of histories."""

import csv
import json
import math

import pytest

from alignlab.report import build_report, write_report
from alignlab.report.stats import welch_t
from alignlab.tracking.summary import summarise_history

# Arm a (baseline): acc [1, 3] -> mean 2, std sqrt(2); loss [0.5] + one seed missing -> n 1, std n/a.
# Arm b: acc [3, 5] -> mean 4, std sqrt(2); delta +2; Welch df = 2, t_{0.975,2} = 4.302652729911275 (table),
# half-width = 4.3027 * sqrt(2/2 + 2/2). Arm c: acc [10] -> n 1, no std, no CI.
RECORDS = [
    {"arm": "b", "seed": 0, "metrics": {"acc": 3.0, "loss": 0.25}},
    {"arm": "a", "seed": 0, "metrics": {"acc": 1.0, "loss": 0.5}},
    {"arm": "a", "seed": 1, "metrics": {"acc": 3.0}},
    {"arm": "b", "seed": 1, "metrics": {"acc": 5.0, "loss": 0.75}},
    {"arm": "c", "seed": 0, "metrics": {"acc": 10.0, "loss": None}},
]
T_975_DF2 = 4.302652729911275


def test_statistics_against_hand_computed():
    table = build_report(RECORDS, baseline="a")
    assert table.arms == ["a", "b", "c"] and table.metrics == ["acc", "loss"]
    assert table.runs_per_arm == {"a": 2, "b": 2, "c": 1}
    a_acc, b_acc, c_acc = (table.cell(arm, "acc") for arm in "abc")
    assert (a_acc["mean"], a_acc["std"], a_acc["n"], a_acc["delta"]) == (2.0, pytest.approx(math.sqrt(2)), 2, 0.0)
    assert (b_acc["mean"], b_acc["std"], b_acc["n"], b_acc["delta"]) == (4.0, pytest.approx(math.sqrt(2)), 2, 2.0)
    # a and b share seeds 0 and 1: paired, d = [2, 2] has no spread: the interval collapses onto +2 and the
    # sign-flip test (p = 2 / 2^2) decides
    assert (b_acc["test"], b_acc["ci_low"], b_acc["ci_high"], b_acc["p"]) == ("sign-flip", 2.0, 2.0, 0.5)
    assert math.isnan(a_acc["ci_low"]) and math.isnan(c_acc["std"]) and math.isnan(c_acc["ci_low"])
    assert c_acc["delta"] == 8.0
    a_loss, b_loss, c_loss = (table.cell(arm, "loss") for arm in "abc")
    assert a_loss["n"] == 1 and a_loss["mean"] == 0.5 and math.isnan(a_loss["std"])
    assert b_loss["delta"] == pytest.approx(0.0) and math.isnan(b_loss["ci_low"])  # baseline has n=1
    assert c_loss["n"] == 0 and math.isnan(c_loss["mean"])


def test_welch_unequal_variances():
    # s_a^2/n_a = 1, s_b^2/n_b = 8/2 = 4 -> se^2 = 5, df = 25 / (1/1 + 16/1) = 25/17.
    from scipy import stats

    delta, low, high, _ = welch_t([1.0, 3.0], [2.0, 6.0])
    assert high - delta == pytest.approx(stats.t.ppf(0.975, 25 / 17) * math.sqrt(5.0))
    assert welch_t([2.0, 2.0], [3.0, 3.0])[1:3] == (-1.0, -1.0)
    # unpaired arms in a report get the same interval: b's seeds 5, 6 are not a's 0, 1
    table = build_report([{"arm": "a", "seed": s, "metrics": {"x": v}} for s, v in ((0, 1.0), (1, 3.0))]
                         + [{"arm": "b", "seed": s, "metrics": {"x": v}} for s, v in ((5, 2.0), (6, 6.0))], "a")
    assert table.cell("b", "x")["test"] == "welch t"
    assert table.cell("b", "x")["ci_high"] - 2.0 == pytest.approx(stats.t.ppf(0.975, 25 / 17) * math.sqrt(5.0))


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_markdown_one_row_per_metric_and_arm():
    table = build_report(RECORDS, baseline="a")
    text = table.to_markdown(metrics=["acc"], details=False)
    rows = [_cells(line) for line in text.splitlines() if line.startswith("| ")][1:]
    assert [row[:2] for row in rows] == [["acc", "a (baseline)"], ["", "b"], ["", "c"]]
    assert rows[0][2:4] == ["2", "2.0 ± 1.4"]
    assert rows[1][3:] == ["4.0 ± 1.4", "+2 [2, 2] n.s.", "sign-flip"]
    assert rows[2][2:5] == ["1", "10 ± n/a", "+8 (no test: n < 2)"]
    assert "loss" not in text
    assert "| loss   | a (baseline) | 1 of 2 | 0.5 ± n/a" in table.to_markdown()
    with pytest.raises(ValueError, match="not in the report"):
        table.to_markdown(metrics=["recall"])


def test_csv_and_json_roundtrip(tmp_path):
    table = build_report(RECORDS, baseline="a", metrics=["acc", "loss"])
    paths = write_report(table, tmp_path / "out", metrics=["acc"])
    with paths["csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:5] == ["arm", "metric", "mean", "std", "n"] and list(rows[0])[-1] == "baseline"
    assert len(rows) == 6 and {row["baseline"] for row in rows} == {"a"}
    by_key = {(row["arm"], row["metric"]): row for row in rows}
    assert float(by_key["a", "acc"]["std"]) == math.sqrt(2) and int(by_key["a", "loss"]["n"]) == 1
    assert math.isnan(float(by_key["c", "loss"]["mean"])) and float(by_key["b", "acc"]["delta"]) == 2.0
    data = json.loads(paths["json"].read_text())
    assert data["baseline"] == "a" and data["arms"] == ["a", "b", "c"]
    assert [c["std"] for c in data["cells"] if c["arm"] == "c"] == [None, None]
    assert "loss" not in paths["md"].read_text().splitlines()[0]


def test_bad_records_are_rejected():
    with pytest.raises(ValueError, match="baseline arm 'z'"):
        build_report(RECORDS, baseline="z")
    with pytest.raises(ValueError, match="appears twice"):
        build_report(RECORDS + [RECORDS[0]], baseline="a")
    with pytest.raises(ValueError, match="not logged"):
        build_report(RECORDS, baseline="a", metrics=["recall"])
    with pytest.raises(ValueError, match="seed"):
        build_report([{"arm": "a", "seed": "0", "metrics": {}}], baseline="a")
    with pytest.raises(ValueError, match="'acc' must be a number"):
        build_report([{"arm": "a", "seed": 0, "metrics": {"acc": "high"}}], baseline="a")


def test_summarise_history_directions():
    history = [{"train_loss": 2.0, "acc": 0.1, "median_rank": 50.0},
               {"train_loss": 1.0, "acc": 0.7},
               {"train_loss": 1.5, "acc": 0.4, "median_rank": 20.0, "Val Loss": math.nan}]
    summary = summarise_history(history)
    assert summary["final_train_loss"] == 1.5 and summary["best_train_loss"] == 1.0
    assert summary["final_acc"] == 0.4 and summary["best_acc"] == 0.7
    assert summary["final_median_rank"] == 20.0 and summary["best_median_rank"] == 20.0
    assert math.isnan(summary["final_Val Loss"]) and math.isnan(summary["best_Val Loss"])
    assert summarise_history(history, {"acc": False})["best_acc"] == 0.1  # dict override
    assert summarise_history(history, {"acc": False})["best_train_loss"] == 1.0  # others keep the name rule
    assert summarise_history(history, lambda name: True)["best_train_loss"] == 2.0  # callable decides all
    assert summarise_history([{"loss": math.nan}, {"loss": 3.0}, {"loss": math.nan}])["best_loss"] == 3.0
    assert summarise_history([]) == {}
    with pytest.raises(ValueError, match=r"history\[0\]"):
        summarise_history([{"loss": "x"}])


def test_cost_figures_median_step_device_hours_and_price():
    from alignlab.tracking.summary import cost_figures

    figures = cost_figures([0.3, 0.1, float("nan"), 0.2, 0.5], train_seconds=7200.0, devices=2,
                           usd_per_device_hour=0.69)
    assert figures["time/ms_per_batch"] == pytest.approx(250.0)  # median of 0.1, 0.2, 0.3, 0.5 (NaN left out)
    assert figures["time/device_hours"] == pytest.approx(4.0)
    assert figures["cost/usd"] == pytest.approx(2.76)
    assert "cost/usd" not in cost_figures([0.1], 36.0, 1)


def test_a_run_reports_its_cost(tmp_path, synth_root):
    from alignlab.config import validate_config
    from alignlab.experiment import train_run
    from conftest import tiny_config_tree

    tree = tiny_config_tree(synth_root, tmp_path, max_steps=2, usd_per_device_hour=3.06)
    outcome = train_run(validate_config(tree), tmp_path / "run")
    assert outcome.metrics["time/ms_per_batch"] > 0
    assert outcome.metrics["cost/usd"] == pytest.approx(outcome.metrics["train_seconds"] / 3600 * 3.06)
