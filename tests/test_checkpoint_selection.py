"""Checkpoint selection by zero-shot on the val split after each epoch (`train.select_by`, the thesis): the
kept weights are those of the argmax epoch of the logged val metric, the final evaluation reports the test
metrics of the selected and of the last epoch (results.json and MLflow), and a run killed between a
selection and its checkpoint resumes to the same selection, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from alignlab.config import ConfigError, validate_config
from alignlab.experiment import run_experiment, val_zero_shot_scorer
from alignlab.training.checkpoint import load_checkpoint
from alignlab.training.selection import SELECTED_DIR, EpochSelector, selected_checkpoint, selected_files
from alignlab.training.trainer import train
from conftest import Crash, crash_at, tiny_config_tree

METRIC = "val/zeroshot/shape/top1"
EVAL = {"enabled": True, "batch_size": 64, "zeroshot_tasks": ["shape"], "linear_probe_task": None, "shifts": [],
        "histogram": False}


def _cfg(synth_root, tmp_path, **train):
    tree = tiny_config_tree(synth_root, tmp_path, epochs=3, lr=3e-3, select_by="shape", **train)
    return validate_config(tree | {"eval": EVAL})


def test_selector_keeps_the_best_epoch_and_settles_after_a_kill(tmp_path):
    scores = iter([10.0, 30.0, 30.0, 30.0, 20.0])  # epochs 1, 2, 2 again, 3, 4
    model = torch.nn.Linear(2, 2)
    selector = EpochSelector(tmp_path, METRIC, lambda m: next(scores), is_main=True)
    saved = lambda: {"model": model.state_dict()}  # noqa: E731
    assert selector.epoch_end(model, 1, 8, saved) == {METRIC: 10.0}
    selector.commit()
    before = selector.state_dict()
    selector.epoch_end(model, 2, 16, saved)  # better: written next to epoch 1 ...
    assert [p.name for p in selected_files(tmp_path)] == ["epoch-1.pt", "epoch-2.pt"]
    selector.restore(before)  # ... and a kill before its checkpoint resumes from epoch 1's state
    assert [p.name for p in selected_files(tmp_path)] == ["epoch-1.pt"]
    selector.epoch_end(model, 2, 16, saved)
    selector.commit()
    selector.epoch_end(model, 3, 24, saved)  # a tie keeps the earlier epoch
    selector.epoch_end(model, 4, 32, saved)
    selector.commit()
    assert selector.state_dict() == {"epoch": 2, "step": 16, "value": 30.0}
    assert selected_checkpoint(tmp_path).name == "epoch-2.pt"
    assert load_checkpoint(selected_checkpoint(tmp_path))["selected_by"] == METRIC


def test_selection_picks_the_argmax_epoch_and_reports_both(synth_root, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(synth_root, tmp_path, checkpoint_every=8, keep_checkpoints=10)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": True, "tracking_uri": uri})})
    run_dir = tmp_path / "run"
    results = run_experiment(cfg, run_dir)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {row["epoch"]: row[METRIC] for row in rows if METRIC in row}
    assert sorted(val) == [1, 2, 3] and [r["step"] for r in rows if METRIC in r] == [8, 16, 24]
    best = max(val, key=lambda e: (val[e], -e))  # the first epoch with the highest val top-1
    assert results["selected/epoch"] == best
    assert [p.name for p in (run_dir / SELECTED_DIR).iterdir()] == [f"epoch-{best}.pt"]
    kept = load_checkpoint(run_dir / SELECTED_DIR / f"epoch-{best}.pt")
    at_epoch_end = load_checkpoint(run_dir / "checkpoints" / f"step-{8 * best:08d}.pt")
    assert kept["value"] == val[best] and kept["step"] == 8 * best
    for name, tensor in at_epoch_end["model"].items():
        assert torch.equal(kept["model"][name], tensor), name
    assert {"zeroshot/shape/top1", "selected/zeroshot/shape/top1", "selected/retrieval/avg_R"} <= set(results)
    assert results["best_" + METRIC] == val[best]
    assert json.loads((run_dir / "eval-selected" / "eval.json").read_text())["zeroshot/shape/top1"] == \
        results["selected/zeroshot/shape/top1"]
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "selected/zeroshot/shape/top1")
    assert [m.value for m in history] == [results["selected/zeroshot/shape/top1"]]


def test_a_kill_between_selection_and_checkpoint_resumes_to_the_same_selection(synth_root, tmp_path):
    # Checkpoints every 5 steps and (forced) at each epoch end, 8 steps per epoch: the crash at step 16
    # comes after epoch 2's selection wrote its file and before that epoch's checkpoint.
    cfg = _cfg(synth_root, tmp_path, checkpoint_every=5)
    score = val_zero_shot_scorer(cfg)
    full = train(cfg, tmp_path / "full", score_epoch=score)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", on_metrics=crash_at(16, "simulated kill"), score_epoch=score)
    resumed = train(cfg, tmp_path / "resumed", resume=True, score_epoch=score)
    assert [(h["step"], h["loss"], h.get(METRIC)) for h in resumed.history] == \
        [(h["step"], h["loss"], h.get(METRIC)) for h in full.history]
    a, b = selected_checkpoint(tmp_path / "full"), selected_checkpoint(tmp_path / "resumed")
    assert a.name == b.name
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["value"] == sb["value"]
    for name, tensor in sa["model"].items():
        assert torch.equal(sb["model"][name], tensor), name


def test_bad_selection_settings_are_named(synth_root, tmp_path):
    with pytest.raises(ConfigError, match="train.select_by"):
        validate_config(tiny_config_tree(synth_root, tmp_path, select_by="a/b"))
    cfg = validate_config(tiny_config_tree(synth_root, tmp_path, select_by="nonexistent"))
    with pytest.raises(ConfigError, match="train.select_by=nonexistent .* does not exist"):
        val_zero_shot_scorer(cfg)
    with pytest.raises(ConfigError, match="pass score_epoch"):
        train(validate_config(tiny_config_tree(synth_root, tmp_path, select_by="shape", max_steps=1)), tmp_path / "r")
