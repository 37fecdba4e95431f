"""A two-arm slice of the shipped `ablations/thesis_ctl.yaml` (S-SMKE's MSE against CTL with a teacher memory
bank) end to end on kfp's local runner at test size: SynthCaps for the teacher, the teacher trained by the
spec's prepare steps, the student starting from its first block, both arms trained and evaluated, the
report with the thesis' figures beside the measured ones."""

from __future__ import annotations

import csv

from alignlab.cli import main
from thesis_slice import write_thesis_slice


def test_thesis_ctl_slice_runs_end_to_end_on_the_local_runner(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_thesis_slice(tmp_path, "thesis_ctl", {"MSE": {}, "CTL+MB": {"distill.knowledge.bank_size": 64}})

    assert main(["run", "spec.yaml"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "teachers" / "thesis-vit" / "backbone.pth").is_file()
    rows = list(csv.DictReader((tmp_path / "runs" / "thesis_ctl" / "report.csv").open()))
    arms = {r["arm"] for r in rows if r["metric"] == "zeroshot/shape_color/top1" and r["n"] == "1"}
    assert arms == {"MSE", "CTL+MB"}
    kd_terms = {(r["arm"], r["metric"]) for r in rows if r["metric"].startswith("final_loss/kd_") and r["n"] == "1"}
    assert kd_terms == {("MSE", "final_loss/kd_ssmke"), ("CTL+MB", "final_loss/kd_ctl")}
    assert "CTL+MB" in out and "zeroshot/shape_color/top1" in out
