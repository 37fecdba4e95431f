"""The nightly suite's regression gate inside an ablation: `alignlab run` on a spec with a `gate` section
compares each run with the earlier runs of its arm in a real (sqlite) MLflow store, writes gate.{md,json},
exports the Prometheus textfile and sets the exit status; the KFP gate step does the same from the
evaluate steps' records. The gate's rules themselves are tested on synthetic histories in
test_regression_gate.py."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import tiny_config_tree

from alignlab.cli import main
from alignlab.tracking import RunTracker

RULES = {"window": 3, "repeat": 1, "min_history": 2,
         "rules": [{"metric": "final_loss", "direction": "lower", "abs_tolerance": 0.05}]}


def _spec(folder: Path, data_root: Path, uri: str) -> Path:
    base = tiny_config_tree(data_root, folder / "runs", max_steps=2)
    base["tracking"] = {"enabled": True, "tracking_uri": uri, "experiment": "nightly-test"}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    (folder / "gates").mkdir()
    (folder / "gates" / "rules.yaml").write_text(yaml.safe_dump(RULES))
    spec = {"name": "nightly-t", "base": "base.yaml", "arms": {"clip": {"loss.name": "infonce"}}, "seeds": [0],
            "gate": {"rules": "gates/rules.yaml", "textfile": str(folder / "gate.prom")}}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


def _past_night(uri: str, final_loss: float) -> None:
    tracker = RunTracker.start(uri, "nightly-test", "clip/seed-0",
                               {"alignlab.ablation": "nightly-t", "alignlab.arm": "clip"}, {})
    tracker.log_metrics({"final_loss": final_loss}, step=2)
    tracker.end("FINISHED")


def test_gate_in_the_ablation_sets_status_reports_and_exports(synth_root, tmp_path, monkeypatch, capsys):
    from alignlab_components.steps import gate_step

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec(tmp_path, Path(synth_root).resolve(), uri)

    # First night: no history yet -> insufficient_history, exit 0.
    assert main(["run", str(spec), "--runner", "inline"]) == 0
    gate_dir = tmp_path / "runs" / "nightly-t" / "gate"
    first = json.loads((gate_dir / "gate.json").read_text())
    assert first["status"] == "insufficient_history"
    first_loss = json.loads((tmp_path / "runs" / "nightly-t" / "clip" / "seed-0" / "results.json").read_text())
    assert "final_loss" in first_loss

    # Two earlier nights whose loss was far lower: today's loss is beyond tolerance -> regression, exit 1.
    for _ in range(2):
        _past_night(uri, final_loss=first_loss["final_loss"] - 1.0)
    assert main(["run", str(spec), "--runner", "inline"]) == 1
    second = json.loads((gate_dir / "gate.json").read_text())
    assert second["status"] == "regression"
    assert "regression" in (gate_dir / "gate.md").read_text()
    prom = (tmp_path / "gate.prom").read_text()
    assert 'suite="nightly-t"' in prom and "alignlab_gate" in prom

    # The KFP gate step reaches the same verdict from the evaluate steps' records and the embedded rules.
    run_dir = tmp_path / "runs" / "nightly-t" / "clip" / "seed-0"
    records = [{"arm": "clip", "seed": 0, "run_dir": str(run_dir)}]
    spec_dict = yaml.safe_load(spec.read_text())
    outcome = gate_step(records, spec_dict, yaml.safe_dump(RULES))
    assert outcome["status"] == "regression" and Path(outcome["gate_dir"], "gate.md").is_file()

    # A night back in line with the history (tolerance is absolute 0.05 around the window median) passes.
    for _ in range(3):
        _past_night(uri, final_loss=json.loads((run_dir / "results.json").read_text())["final_loss"])
    assert main(["run", str(spec), "--runner", "inline"]) == 0
    assert json.loads((gate_dir / "gate.json").read_text())["status"] == "ok"
