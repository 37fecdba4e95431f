"""A two-arm slice of the shipped `ablations/thesis_momentum.yaml` (S-SMKE against S-SMKE with a momentum encoder
and queues) end to end on kfp's local runner at test size: the teacher trained by the spec's prepare steps,
both arms trained and evaluated, the report with the thesis' figures and the step cost beside the measured
ones."""

from __future__ import annotations

import csv

from alignlab.cli import main
from thesis_slice import write_thesis_slice


def test_thesis_momentum_slice_runs_end_to_end_on_the_local_runner(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_thesis_slice(tmp_path, "thesis_momentum",
                       {"baseline": {}, "momentum": {"distill.knowledge.momentum.queue_size": 64}})

    assert main(["run", "spec.yaml"]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "runs" / "thesis_momentum" / "report.csv").open()))
    measured = {(r["arm"], r["metric"]) for r in rows if r["n"] == "1"}
    for metric in ("zeroshot/shape_color/top1", "retrieval/avg_R", "time/ms_per_batch", "final_loss/contrastive"):
        assert {("baseline", metric), ("momentum", metric)} <= measured, metric
    assert "momentum" in out and "time/ms_per_batch" in out
