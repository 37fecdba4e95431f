"""A two-arm slice of the shipped `ablations/thesis_ctl.yaml` (S-SMKE's MSE against CTL with a teacher memory
bank) end to end on kfp's local runner at test size: SynthCaps for the teacher, the teacher trained by the
spec's prepare steps, the student starting from its first block, both arms trained and evaluated, the
report with the thesis' figures beside the measured ones."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from alignlab.cli import main
from conftest import SMALL_SYNTH, tiny_config_tree

REPO = Path(__file__).resolve().parents[1]
VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_thesis_ctl_slice_runs_end_to_end_on_the_local_runner(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((REPO / "ablations" / "thesis_ctl.yaml").read_text())
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
    spec = shipped | {"base": "base.yaml", "seeds": [0],
                      "arms": {arm: shipped["arms"][arm] for arm in ("MSE", "CTL+MB")}}
    spec["arms"]["CTL+MB"] = dict(spec["arms"]["CTL+MB"], **{"distill.knowledge.bank_size": 64})
    paper = spec["paper"]  # the paper's rows and claims of the arms in the slice
    paper["rows"] = {arm: row for arm, row in paper["rows"].items() if arm in spec["arms"]}
    paper["claims"] = [claim for claim in paper["claims"] if claim["arm"] in spec["arms"]]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    assert main(["run", "spec.yaml"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "teachers" / "thesis-vit" / "backbone.pth").is_file()
    rows = list(csv.DictReader((tmp_path / "runs" / "thesis_ctl" / "report.csv").open()))
    arms = {r["arm"] for r in rows if r["metric"] == "zeroshot/shape_color/top1" and r["n"] == "1"}
    assert arms == {"MSE", "CTL+MB"}
    kd_terms = {(r["arm"], r["metric"]) for r in rows if r["metric"].startswith("final_loss/kd_") and r["n"] == "1"}
    assert kd_terms == {("MSE", "final_loss/kd_ssmke"), ("CTL+MB", "final_loss/kd_ctl")}
    assert "CTL+MB" in out and "zeroshot/shape_color/top1" in out
