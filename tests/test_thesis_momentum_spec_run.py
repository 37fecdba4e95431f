"""A two-arm slice of the shipped `ablations/thesis_momentum.yaml` (S-SMKE against S-SMKE with a momentum encoder
and queues) end to end on kfp's local runner at test size: the teacher trained by the spec's prepare steps,
both arms trained and evaluated, the report with the thesis' figures and the step cost beside the measured
ones."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from alignlab.cli import main
from conftest import SMALL_SYNTH, tiny_config_tree

REPO = Path(__file__).resolve().parents[1]
VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_thesis_momentum_slice_runs_end_to_end_on_the_local_runner(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((REPO / "ablations" / "thesis_momentum.yaml").read_text())
    base = tiny_config_tree(tmp_path / "data", tmp_path / "runs", max_steps=3)
    base["data"]["synth"] = dict(SMALL_SYNTH, num_train=96)
    base["model"]["image"] = {"name": "vit_tiny_patch16_224", "kwargs": VIT, "blocks": 1,
                              "pretrained": "teachers/thesis-vit/backbone.pth"}
    base["model"]["text"] = {"width": 32, "layers": 1, "heads": 2, "pool": "first", "causal": False}
    base["model"]["student"] = {"shared": "block", "out_dim": 32, "heads": 2, "tte": "after_ls"}
    base["distill"] = {"teacher": "teachers/thesis-vit", "knowledge": {"kind": "ssmke"}}
    base["eval"] = {"enabled": True, "zeroshot_tasks": ["shape_color"], "linear_probe_task": None, "shifts": [],
                    "histogram": False, "batch_size": 64}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    teacher_synth, teacher_train = (entry for entry in shipped["prepare"])
    teacher_synth["synth"]["config"] = dict(SMALL_SYNTH, seed=1, num_train=64)
    teacher_train["teacher_train"]["config"].update(kwargs=VIT, epochs=1, batch_size=32)
    spec = shipped | {"base": "base.yaml", "seeds": [0]}
    spec["arms"]["momentum"] = dict(spec["arms"]["momentum"], **{"distill.knowledge.momentum.queue_size": 64})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    assert main(["run", "spec.yaml"]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "runs" / "thesis_momentum" / "report.csv").open()))
    measured = {(r["arm"], r["metric"]) for r in rows if r["n"] == "1"}
    for metric in ("zeroshot/shape_color/top1", "retrieval/avg_R", "time/ms_per_batch", "final_loss/contrastive"):
        assert {("baseline", metric), ("momentum", metric)} <= measured, metric
    assert "momentum" in out and "time/ms_per_batch" in out
