"""Failure handling in training: non-finite settings refused by the schema, divergence stops the run with
nothing non-finite saved (R7), skipped non-finite steps, honest resume, safe checkpoint loading, a metrics
file that survives kills. Real trainer, real MLflow (sqlite store in tmp_path), real CLI processes."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

from alignlab.config import ConfigError, apply_overrides, validate_config
from alignlab.experiment import end_tracking_on_error, run_experiment, start_run_tracking, train_only
from alignlab.training import builders
from alignlab.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    remove_partial_files,
    save_checkpoint,
    state_is_finite,
)
from alignlab.training.errors import CheckpointError, DivergenceError
from alignlab.training.optim import cosine_lr_factor, warmup_steps_for
from alignlab.training.trainer import train
from conftest import Crash, crash_at, tiny_config_tree


def config(synth_root, tmp_path, overrides=(), **train_fields):
    return validate_config(apply_overrides(tiny_config_tree(synth_root, tmp_path, **train_fields), list(overrides)))


def losses(history):
    return [(h["step"], h["loss"]) for h in history]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------- schema

@pytest.mark.parametrize("override, field", [
    ("train.lr=.inf", "train.lr"), ("train.lr=.nan", "train.lr"), ("loss.hn_nce.beta=.inf", "loss.hn_nce.beta"),
    ("loss.hn_nce.beta=.nan", "loss.hn_nce.beta"), ("train.betas=[.inf, 0.98]", "train.betas.0"),
    ("model.init_logit_scale=.inf", "model.init_logit_scale"), ("train.grad_clip=.nan", "train.grad_clip"),
    ("data.synth.mismatch=.nan", "data.synth.mismatch"), ("model.max_logit_scale=1e39", "model.max_logit_scale"),
])
def test_schema_refuses_non_finite_values_naming_the_field(tmp_path, override, field):
    tree = apply_overrides(tiny_config_tree(tmp_path, tmp_path), ["data.synth={}", override])
    with pytest.raises(ConfigError) as err:
        validate_config(tree)
    message = str(err.value)
    assert f"  {field}:" in message and ("finite number" in message or "less than or equal to 1" in message)


def test_synthcaps_and_ablation_schemas_refuse_non_finite_values():
    from pydantic import ValidationError

    from alignlab.teachers.settings import TeacherSettings
    from alignlab.data.synth import SynthCapsConfig

    with pytest.raises(ValidationError, match="finite number"):
        SynthCapsConfig(mismatch=math.nan)
    with pytest.raises(ValidationError, match="finite number"):
        TeacherSettings(lr=math.inf)


# ------------------------------------------------------------------------------------------ divergence

def test_divergence_probes_fail_the_run_keep_the_finite_checkpoint_and_resume_exactly(synth_root, tmp_path):
    """R7: lr, logit scale and HN-NCE beta each make the loss non-finite; the run raises, MLflow says FAILED
    with the reason, nothing non-finite is saved, and the last finite checkpoint resumes to the exact end."""
    from alignlab.tracking import find_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = ["tracking.enabled=true", f"tracking.tracking_uri={uri}", "tracking.experiment=r7"]
    good = config(synth_root, tmp_path, tracked, max_steps=8, checkpoint_every=2, keep_checkpoints=1)
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(good, run_dir, on_metrics=crash_at(5))
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [4]

    probes = {  # resumed from the step-4 checkpoint with a diverging setting (beta: .inf is refused; 1e300
        # is finite but overflows float32 in beta * logit, which HN-NCE's log-space form cannot absorb)
        "lr": ["train.lr=1e9"],
        "beta": ["loss.name=hn_nce", "loss.hn_nce.beta=1e300"],
    }
    for name, overrides in probes.items():
        # lr: step 5's update is huge but finite, step 6's loss is NaN, at the step a checkpoint was due
        with pytest.raises(DivergenceError, match="diverged at step [56]: non-finite") as err:
            run_experiment(config(synth_root, tmp_path, tracked + overrides, max_steps=8, checkpoint_every=2,
                                  keep_checkpoints=1), run_dir, resume=True, allow_config_change=True)
        assert "loss/" in str(err.value) and "step-00000004.pt" in str(err.value), name
        assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [4], name  # pruning kept it
        assert state_is_finite(load_checkpoint(run_dir / "checkpoints" / "step-00000004.pt"))
        assert not (run_dir / "final.pt").exists() and not (run_dir / "results.json").exists()

    # logit scale: a fresh run whose first logits overflow (init = max = 1e30: the gradient norm is inf)
    with pytest.raises(DivergenceError, match="diverged at step 1: non-finite gradient norm .*no checkpoint"):
        run_experiment(config(synth_root, tmp_path, tracked + ["model.init_logit_scale=1e30",
                                                               "model.max_logit_scale=1e30"], max_steps=8),
                       tmp_path / "scale")
    assert not list_checkpoints(tmp_path / "scale" / "checkpoints") and not (tmp_path / "scale" / "final.pt").exists()

    runs = find_runs(uri, "r7")
    assert [r["status"] for r in runs] == ["FAILED"] * 3
    assert all(r["tags"]["alignlab.failure"].startswith("DivergenceError: training diverged at step") for r in runs)
    assert "\n" not in "".join(r["tags"]["alignlab.failure"] for r in runs)
    assert "train.lr 0.001 -> 1000000000.0" in runs[0]["tags"]["alignlab.config_changed"]

    # a pipeline's training job (train_only into the step's open run) records its own reason; the step that
    # launched it ends the run FAILED and keeps that reason rather than its own "job failed"
    job_cfg = config(synth_root, tmp_path, tracked + ["tracking.experiment=r7-job", "train.lr=1e9"], max_steps=4)
    tracker = start_run_tracking(job_cfg, tmp_path / "job", synth_root)
    with pytest.raises(DivergenceError):
        train_only(job_cfg, tmp_path / "job", mlflow_run_id=tracker.run_id)
    end_tracking_on_error(tracker, RuntimeError("torchx job failed with exit code 2"))
    (job,) = find_runs(uri, "r7-job")
    assert job["status"] == "FAILED" and job["tags"]["alignlab.failure"].startswith("DivergenceError: training diverged")

    # the finite checkpoint resumes with the original config to the end of an uninterrupted run, bit for bit
    resumed = train(good, run_dir, resume=True)
    full = train(good, tmp_path / "full")
    assert losses(resumed.history) == losses(full.history) and len(resumed.history) == 8
    assert_same_weights(resumed.model.state_dict(), full.model.state_dict())
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert [(h["step"], sorted(h["changes"])) for h in history] == [
        (4, ["train.lr"]), (4, ["loss.hn_nce.beta", "loss.name"]), (4, [])]  # the last line: back to the original
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == good.train.lr


def test_a_diverged_state_is_never_saved_and_pruning_keeps_the_finite_checkpoint(tmp_path):
    finite = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}}
    save_checkpoint(tmp_path, 2, finite, keep=1)
    diverged = {"model": {"w": torch.tensor([1.0, math.nan, 0.0])}, "optimizer": {"state": {}}}
    with pytest.raises(DivergenceError, match="refusing to save checkpoint step 4"):
        save_checkpoint(tmp_path, 4, diverged, keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not state_is_finite({"model": {}, "optimizer": {"state": {0: {"exp_avg_sq": torch.tensor([math.inf])}}}})


def _poison_loss_at(monkeypatch, step: int):
    """Make the loss of optimizer step `step` (1-based) NaN, as a bad batch or an overflow would."""
    real = builders.loss_from_config

    def loss_from_config(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        def poisoned(outputs, context):
            terms, logs = loss_fn(outputs, context)
            if context["step"] + 1 == step:
                terms = {name: value * math.nan for name, value in terms.items()}
            return terms, logs
        return poisoned

    monkeypatch.setattr(builders, "loss_from_config", loss_from_config)


def test_skip_nonfinite_steps_skips_within_the_budget_and_fails_without_one(synth_root, tmp_path, monkeypatch,
                                                                           capsys):
    _poison_loss_at(monkeypatch, 3)
    with pytest.raises(DivergenceError, match=r"diverged at step 3: non-finite loss and gradient norm "
                                              r"\(loss=nan, loss/contrastive=nan, grad_norm=nan\)"):
        train(config(synth_root, tmp_path, max_steps=6), tmp_path / "strict")
    assert [s for s, _ in list_checkpoints(tmp_path / "strict" / "checkpoints")] == []  # step 3 was not saved

    result = train(config(synth_root, tmp_path, max_steps=6, skip_nonfinite_steps=1), tmp_path / "skip")
    assert result.steps == 6 and result.skipped_steps == 1
    assert "step 3: non-finite loss" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1] and math.isnan(rows[2]["loss"])
    final = torch.load(tmp_path / "skip" / "final.pt", weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in final.values())
    optimizer = load_checkpoint(tmp_path / "skip" / "checkpoints" / "step-00000006.pt")["optimizer"]
    assert {int(s["step"]) for s in optimizer["state"].values()} == {5}  # 6 steps, one of them skipped

    _poison_loss_at(monkeypatch, 2)  # a second bad step (with step 3's) exceeds a budget of one
    with pytest.raises(DivergenceError, match="2 non-finite steps exceed train.skip_nonfinite_steps=1"):
        train(config(synth_root, tmp_path, max_steps=6, skip_nonfinite_steps=1), tmp_path / "skip2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist on a GPU")
def test_guard_observes_a_step_without_a_host_sync(tmp_path):
    from alignlab.training.guard import DivergenceGuard

    guard = DivergenceGuard(torch.device("cuda"), 0, tmp_path, advice="")
    loss, norm = torch.tensor(1.0, device="cuda"), torch.tensor(math.inf, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            guard.observe(step, loss, norm if step == 2 else loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(DivergenceError, match="step 2: non-finite gradient norm"):
        guard.check(lambda _: {})


# ----------------------------------------------------------------------------------------------- resume

def test_resume_with_a_changed_config_is_refused_naming_the_fields(synth_root, tmp_path):
    cfg = config(synth_root, tmp_path, max_steps=8, checkpoint_every=2)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", on_metrics=crash_at(5))
    before = (tmp_path / "run" / "config.yaml").read_text()
    changed = config(synth_root, tmp_path,
                     ["train.lr=0.002", "train.max_steps=10", "data.num_workers=1", "train.threads=1"],
                     checkpoint_every=2)
    with pytest.raises(ConfigError) as err:
        train(changed, tmp_path / "run", resume=True)
    message = str(err.value)
    assert "\n" not in message and "step-00000004.pt" in message and "--allow-config-change" in message
    assert "train.lr 0.001 -> 0.002" in message and "train.max_steps 8 -> 10" in message
    assert "num_workers" not in message and "threads" not in message  # free fields (a thread change is recorded)
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # the record still says what was trained


def test_a_resume_at_another_thread_count_is_said_and_recorded(synth_root, tmp_path, capsys):
    """Free to change, but a CPU sums in another order at another thread count: recorded, never silent."""
    cfg = config(synth_root, tmp_path, ["train.threads=1"], max_steps=6, checkpoint_every=2)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", on_metrics=crash_at(3))
    train(config(synth_root, tmp_path, ["train.threads=2"], max_steps=6, checkpoint_every=2), tmp_path / "run",
          resume=True)
    assert "compute threads 1 -> 2 at step 2" in capsys.readouterr().out
    history = [json.loads(line) for line in (tmp_path / "run" / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and history[-1]["changes"] == {"compute_threads": {"old": 1, "new": 2}}

    with pytest.raises(Crash):  # the same thread count: nothing to record
        train(cfg, tmp_path / "same", on_metrics=crash_at(3))
    train(cfg, tmp_path / "same", resume=True)
    assert not (tmp_path / "same" / "config_history.jsonl").exists()


def test_allowed_config_change_rebuilds_lr_weight_decay_and_schedule_and_records_it(synth_root, tmp_path):
    cfg = config(synth_root, tmp_path, max_steps=8, checkpoint_every=2, warmup=2, min_lr_ratio=0.1)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", on_metrics=crash_at(5))
    new = config(synth_root, tmp_path, ["train.lr=0.004", "train.weight_decay=0.05"], max_steps=10,
                 checkpoint_every=2, keep_checkpoints=5, warmup=2, min_lr_ratio=0.1)
    result = train(new, tmp_path / "run", resume=True, allow_config_change=True)
    assert result.steps == 10 and [str(c) for c in result.config_changes] == [
        "train.lr 0.001 -> 0.004", "train.max_steps 8 -> 10", "train.weight_decay 0.1 -> 0.05"]

    expected = [0.004 * cosine_lr_factor(s, warmup_steps_for(2, 10), 10, 0.1) for s in range(5, 11)]
    assert [h["lr"] for h in result.history[4:]] == pytest.approx(expected, rel=1e-12)
    fresh = train(new, tmp_path / "fresh")  # the same schedule as a run that had the new config all along
    assert [h["lr"] for h in result.history[4:]] == [h["lr"] for h in fresh.history[4:]]
    groups = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000006.pt")["optimizer"]["param_groups"]
    factor = cosine_lr_factor(6, 2, 10, 0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("decay", pytest.approx(0.004 * factor), 0.05), ("no_decay", pytest.approx(0.004 * factor), 0.0)]

    entries = [json.loads(line) for line in (tmp_path / "run" / "config_history.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["step"] == 4 and entries[0]["time"]
    assert entries[0]["changes"]["train.lr"] == {"old": 0.001, "new": 0.004}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr"] == 0.004


def test_cli_gives_one_line_errors_for_divergence_and_a_changed_resume(synth_root, tmp_path):
    """Real `alignlab train` processes: one `alignlab: error:` line, no traceback; exit status 1 for a run that
    diverged (the run failed), 2 for a refused resume (bad input)."""
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config_tree(synth_root, tmp_path, max_steps=6, checkpoint_every=2)))
    with pytest.raises(Crash):
        train(validate_config(yaml.safe_load(config_path.read_text())), tmp_path / "run", on_metrics=crash_at(3))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "alignlab.cli", "train", str(config_path)]
    commands = {"diverge": cli + ["train.lr=1e9", "--run-dir", str(tmp_path / "diverge")],
                "changed": cli + ["train.lr=2e-3", "--run-dir", str(tmp_path / "run"), "--resume"]}
    running = {name: subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, argv in commands.items()}
    outputs = {name: process.communicate(timeout=180) for name, process in running.items()}
    for name, process in running.items():
        stderr = outputs[name][1]
        errors = [line for line in stderr.splitlines() if line.startswith("alignlab: error:")]
        status = {"diverge": 1, "changed": 2}[name]
        assert process.returncode == status and len(errors) == 1 and "Traceback" not in stderr, (name, stderr)
    assert "training diverged at step 2" in outputs["diverge"][1]
    assert "train.lr 0.001 -> 0.002" in outputs["changed"][1] and "--allow-config-change" in outputs["changed"][1]


def test_ablation_resume_continues_an_interrupted_arm_and_refuses_a_changed_spec(synth_root, tmp_path, monkeypatch,
                                                                                   capsys):
    """`alignlab run --resume` (inline runner): the spec's config equals its checkpoint's, so an interrupted arm
    continues; the same spec with a changed override is refused, naming the field."""
    from alignlab.ablation import load_spec
    from alignlab.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config_tree(synth_root, tmp_path / "runs", max_steps=6)))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "mini", "base": "base.yaml", "seeds": [0],
                                                        "arms": {"clip": {}}, "baseline": "clip",
                                                        "report_metrics": ["final_loss"]}))
    _, plans = load_spec(tmp_path / "spec.yaml")
    with pytest.raises(Crash):
        train(plans[0].config, plans[0].run_dir, on_metrics=crash_at(4))
    assert main(["run", "spec.yaml", "train.lr=0.002", "--resume", "--runner", "inline"]) == 1  # its task failed
    assert "train.lr 0.001 -> 0.002" in capsys.readouterr().err
    assert main(["run", "spec.yaml", "--resume", "--runner", "inline"]) == 0
    capsys.readouterr()
    assert "resumed from" in (tmp_path / "runs" / "mini" / "logs" / "run-clip-seed-0.log").read_text()  # its task log
    rows = [json.loads(line)["step"] for line in (plans[0].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6] and (plans[0].run_dir / "results.json").is_file()


# --------------------------------------------------------------------------------------- metrics file

def test_kill_before_the_first_checkpoint_restarts_with_an_empty_history(synth_root, tmp_path):
    cfg = config(synth_root, tmp_path, max_steps=6, checkpoint_every=4)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", on_metrics=crash_at(3))
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")
    resumed = train(cfg, tmp_path / "run", resume=True)
    rows = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]


def test_torn_metrics_line_is_dropped_with_a_warning_and_stray_temp_files_are_removed(synth_root, tmp_path):
    cfg = config(synth_root, tmp_path, max_steps=8)
    full = train(cfg, tmp_path / "full")
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", on_metrics=crash_at(5))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 6, "epoch": 0, "lr": 0.000')  # an append cut by a kill
    stray = [tmp_path / "run" / "checkpoints" / ".step-00000006.pt.ab12cd34.tmp", tmp_path / "run" / ".final.pt.x_y1z2w3.tmp"]
    for path in stray:
        path.write_bytes(b"\0" * 1024)
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        resumed = train(cfg, tmp_path / "run", resume=True)
    assert losses(resumed.history) == losses(full.history)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 9))
    assert not any(path.exists() for path in stray)
    assert remove_partial_files(tmp_path / "run") == []


def test_a_corrupt_line_inside_metrics_is_an_error_naming_the_line(synth_root, tmp_path):
    cfg = config(synth_root, tmp_path, max_steps=4)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", on_metrics=crash_at(4))
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:1] + ["garbage"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON row"):
        train(cfg, tmp_path / "run", resume=True)


def test_a_fresh_run_removes_an_earlier_runs_checkpoints(synth_root, tmp_path):
    """Otherwise pruning keeps the earlier run's higher steps and a later --resume picks them up."""
    train(config(synth_root, tmp_path, max_steps=8), tmp_path / "run")
    with pytest.raises(Crash):
        train(config(synth_root, tmp_path, max_steps=8, lr=2e-3), tmp_path / "run", on_metrics=crash_at(4))
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [3]
    assert not (tmp_path / "run" / "final.pt").exists()


# ----------------------------------------------------------------------------------------- checkpoints

class _Payload:
    """Unpickling this runs code: it writes a file (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(synth_root, tmp_path, capsys, writer):
    from alignlab.cli import main

    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "run" / "checkpoints" / "step-00000005.pt"
    evil.parent.mkdir(parents=True)
    state = {"model": {"w": torch.ones(1)}, "config": {}, "step": 5, "payload": _Payload(marker)}
    if writer == "torch":
        torch.save(state, evil)
    else:
        evil.write_bytes(pickle.dumps(state))

    with pytest.raises(CheckpointError, match=f"refused to load {evil}: it is not a weights-only checkpoint"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        train(config(synth_root, tmp_path, max_steps=6), tmp_path / "run", resume=True)
    assert main(["evaluate", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"alignlab: error: refused to load {evil}")
    assert not marker.exists()


def test_checkpoints_load_weights_only_including_older_ones_with_a_numpy_rng_state(tmp_path):
    import numpy as np

    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.ones(2)}, "rng": {"numpy": np.random.get_state()}}, legacy)
    assert load_checkpoint(legacy)["rng"]["numpy"][1].dtype == np.uint32
    torn = tmp_path / "torn.pt"
    torn.write_bytes(legacy.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {torn}.*torn"):
        load_checkpoint(torn)
