"""`alignlab run` end to end on the inline runner: shared data once, every arm x seed, report, MLflow."""

from __future__ import annotations

import csv
import json

import yaml

from alignlab.cli import main
from conftest import SMALL_SYNTH, tiny_config_tree


def test_run_ablation_end_to_end_with_report_plot_and_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = tiny_config_tree(tmp_path / "data", tmp_path / "runs", max_steps=4)
    base["data"]["synth"] = dict(SMALL_SYNTH, num_train=128)
    base["eval"] = {"enabled": True, "zeroshot_tasks": ["shape", "color"], "linear_probe_task": "shape",
                    "shifts": ["sketch"], "batch_size": 64}
    base["tracking"] = {"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "mini", "base": "base.yaml",
            "grid": {"loss.name": ["infonce", "hn_nce"], "loss.hn_nce.beta": [0.0, 0.5]},
            "seeds": [0, 1], "baseline": "name=infonce,beta=0.0",
            "report_metrics": ["retrieval/mean_R@1", "zeroshot/color/top1"],
            "report_plot": {"x": "loss.hn_nce.beta", "group": "loss.name", "metrics": ["zeroshot/color/top1"]}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    assert main(["run", "spec.yaml"]) == 0
    out = capsys.readouterr().out

    # the dataset is shared: generated once for all 8 runs
    assert len(list((tmp_path / "data").glob("synthcaps-*"))) == 1
    runs = sorted((tmp_path / "runs" / "mini").glob("*/seed-*/results.json"))
    assert len(runs) == 8
    results = json.loads(runs[0].read_text())
    assert {"final_loss", "best_loss", "retrieval/mean_R@1", "zeroshot/color/top1"} <= set(results)

    report = tmp_path / "runs" / "mini"
    assert "name=hn_nce,beta=0.5" in out and "retrieval/mean_R@1" in out
    rows = list(csv.DictReader((report / "report.csv").open()))
    baseline_rows = [r for r in rows if r["arm"] == "name=infonce,beta=0.0" and r["n"] != "0"]
    assert baseline_rows and all(float(r["delta"]) == 0.0 for r in baseline_rows)
    # a metric only one loss logs (its own loss term) is counted as absent for the other arms, not filled
    assert {r["n"] for r in rows if r["metric"] == "final_loss/hn_nce" and "infonce" in r["arm"]} == {"0"}
    assert {r["n"] for r in rows if r["metric"] == "final_loss"} == {"2"}
    assert (report / "report_plot.png").stat().st_size > 1000

    # beta is ignored by InfoNCE, so its two arms are the same training run: identical results
    a = json.loads((report / "name=infonce,beta=0.0" / "seed-0" / "results.json").read_text())
    b = json.loads((report / "name=infonce,beta=0.5" / "seed-0" / "results.json").read_text())
    assert a["final_loss"] == b["final_loss"]

    from alignlab.tracking import find_runs

    tracked = find_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "mini")
    # `alignlab run` defaults to kfp's local runner: one parent run for the pipeline run, the 8 runs nested in it
    parents = [r for r in tracked if r["tags"].get("alignlab.pipeline") == "mini"]
    tracked = [r for r in tracked if r not in parents]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    assert len(tracked) == 8 and {r["status"] for r in tracked} == {"FINISHED"}
    assert {r["tags"]["mlflow.parentRunId"] for r in tracked} == {parents[0]["run_id"]}
    one = next(r for r in tracked if r["tags"]["alignlab.arm"] == "name=hn_nce,beta=0.5"
               and r["tags"]["alignlab.seed"] == "1")
    assert one["params"]["loss.hn_nce.beta"] == "0.5" and one["tags"]["alignlab.dataset_hash"] != "unknown"
    assert "zeroshot/color/top1" in one["metrics"]

    # `alignlab report` rebuilds the same table from the run folders
    (report / "report.csv").unlink()
    assert main(["report", "spec.yaml"]) == 0
    assert list(csv.DictReader((report / "report.csv").open())) == rows
