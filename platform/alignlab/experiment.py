"""One run: its dataset, training, evaluation and MLflow tracking (`alignlab train`, `alignlab evaluate`, the
pipeline's train and evaluate steps). A whole ablation is `alignlab.ablation_runner`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from alignlab.config import ConfigError, ExperimentConfig, config_to_dict
from alignlab.data.roots import local_eval_root, resolve_data_root
from alignlab.data.skips import SKIPS_FILE, load_skip_report, skip_metrics
from alignlab.data.writer import manifest_dataset_hash
from alignlab.training.resume import CONFIG_HISTORY_FILE

if TYPE_CHECKING:
    from alignlab.tracking import RunTracker

# torch, MLflow and the generator (PIL) are imported inside the functions that use them: every pipeline step
# and `alignlab --help` import this module, and most of them need none of those.


def ensure_dataset(cfg: ExperimentConfig) -> Path | str:
    """The shared data step: generate SynthCaps if the config asks for it (reused when already there)."""
    root = resolve_data_root(cfg.data)
    if cfg.data.synth is not None:
        from alignlab.data.synth import generate_synthcaps

        generate_synthcaps(root, cfg.data.synth, progress=True)
    elif not isinstance(root, str) and not root.exists():  # s3:// roots: checked when training opens the shards
        raise FileNotFoundError(f"data.root {root} does not exist: import a dataset there or set data.synth")
    return root


def dataset_hash(root: Path | str) -> str:
    """The dataset hash of a data root's manifest (local or s3://), "unknown" without one (an MLflow tag)."""
    return manifest_dataset_hash(root) or "unknown"


def evaluate_trained_model(cfg: ExperimentConfig, model, tokenizer, out_dir: Path) -> dict:
    """The evaluation suite (cfg.eval) on a trained model in memory; returns the flat metrics."""
    from alignlab.evaluate import evaluate_model
    from alignlab.training import builders

    _, eval_transform = builders.transforms_from_config(cfg.data)
    e = cfg.eval
    device = str(next(model.parameters()).device)
    data_root = local_eval_root(resolve_data_root(cfg.data))  # s3://: a local cached copy
    if cfg.unimodal is not None or cfg.vq is not None:  # one tower or the VQ: their own metrics
        from alignlab.evaluate.tasks import evaluate_task

        return evaluate_task(cfg, model, tokenizer, eval_transform, data_root, out_dir)
    metrics = evaluate_model(model, tokenizer, eval_transform, data_root, out_dir, batch_size=e.batch_size,
                             device=device, tasks=tuple(e.zeroshot_tasks), linear_probe_task=e.linear_probe_task,
                             shifts=tuple(e.shifts), histogram=e.histogram, linear_probe_cs=e.linear_probe_cs,
                             amr_folds=e.amr_folds)
    if e.few_shot:
        from alignlab.evaluate.fewshot import evaluate_few_shot

        metrics |= evaluate_few_shot(model, tokenizer, eval_transform, data_root, out_dir, task=e.few_shot_task,
                                     ks=tuple(e.few_shot_ks), seeds=tuple(e.few_shot_seeds),
                                     batch_size=e.batch_size, device=device)
    return metrics


def val_zero_shot_scorer(cfg: ExperimentConfig):
    """`train.select_by`'s score, a function of the model: zero-shot top-1 of that task on its val split
    (`alignlab.training.selection`). The tokenizer is built at the first call, on the rank that scores."""
    from alignlab.evaluate.suite import zero_shot_split
    from alignlab.training import builders

    task = cfg.train.select_by
    data_root = resolve_data_root(cfg.data)
    folder = local_eval_root(data_root) / "classification" / task
    if not (folder / "val").is_dir():
        raise ConfigError(f"train.select_by={task} scores each epoch on {folder / 'val'}, which does not exist: "
                          f"pick a task with a val split (SynthCaps: shape, color, shape_color) or unset it")
    _, transform = builders.transforms_from_config(cfg.data)
    built = []

    def score(model) -> float:
        if not built:
            built.append(builders.tokenizer_from_config(cfg.model, cfg.data, data_root))
        device = next(model.parameters()).device
        return zero_shot_split(model, built[0], transform, folder, cfg.eval.batch_size, device, split="val")["top1"]
    return score


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path, data_root: str | None = None,
                        few_shot: bool = False) -> dict:
    """Run the evaluation suite on a saved checkpoint (final.pt or checkpoints/step-*.pt), on a GPU if any.

    Same steps as `alignlab evaluate`: the config stored in the checkpoint rebuilds tokenizer and model;
    `data_root` evaluates on another dataset. Returns the suite's flat metrics (see `evaluate_model`)."""
    import torch

    from alignlab.training.run_model import load_run_model

    path = Path(checkpoint)
    wanted = "`alignlab evaluate` wants a run's final.pt or checkpoints/step-*.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist ({wanted}; did the train step finish?)")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path} is a config file, not a checkpoint: {wanted} (train it first: alignlab train "
                          f"{path})")
    overrides = {"data.root": data_root, "data.synth": None} if data_root else {}
    cfg, model, tokenizer = load_run_model(path, overrides=overrides | ({"eval.few_shot": True} if few_shot else {}))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate_trained_model(cfg, model, tokenizer, Path(out_dir))


TAG_FAILURE = "alignlab.failure"  # why a run ended FAILED / KILLED, one line
TAG_CONFIG_CHANGED = "alignlab.config_changed"  # a resume continued with a changed config (what, from which step)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside: SIGTERM (a job or pod being stopped) raises KeyboardInterrupt in the main thread, so a run's
    error path ends its MLflow run KILLED and flushes its records instead of the process dying mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def start_run_tracking(cfg: ExperimentConfig, run_dir: Path, data_root: Path, *, ablation: str | None = None,
                       arm: str | None = None, world_size: int = 1,
                       parent_run_id: str | None = None) -> RunTracker | None:
    """The MLflow run of one arm x seed (None when tracking is off): standard tags, flattened params, nested
    under `parent_run_id` (default: $ALIGNLAB_PARENT_RUN_ID, set by a pipeline's parent run)."""
    if not cfg.tracking.enabled:
        return None
    from alignlab.tracking import RunTracker, flatten_params, git_commit

    tags = {"alignlab.ablation": ablation or cfg.name, "alignlab.arm": arm or cfg.name,
            "alignlab.seed": str(cfg.seed), "alignlab.git_commit": git_commit(),
            "alignlab.dataset_hash": dataset_hash(data_root), "alignlab.run_dir": str(Path(run_dir).resolve()),
            "alignlab.world_size": str(world_size)}
    tracker = RunTracker.start(cfg.tracking.tracking_uri, cfg.tracking.experiment or ablation or "alignlab",
                               run_name=f"{arm}/seed-{cfg.seed}" if arm else cfg.name, tags=tags,
                               params=flatten_params(config_to_dict(cfg)),
                               parent_run_id=parent_run_id or os.environ.get("ALIGNLAB_PARENT_RUN_ID"),
                               spool_dir=run_dir, flush_timeout_s=cfg.tracking.flush_timeout_s)
    return tracker  # it wrote run_dir/mlflow_run_id.txt ("pending:..." until the store answers)


@dataclass
class TrainOutcome:
    """What training hands to `finish_run`: the trained model (rank 0, same process) or its checkpoint."""

    steps: int
    metrics: dict  # final_/best_ summaries of the step history, and train_seconds
    final_checkpoint: Path | None
    model: object = None


def train_run(cfg: ExperimentConfig, run_dir: Path, *, tracker: RunTracker | None = None, resume: bool = False,
              allow_config_change: bool = False, dist=None) -> TrainOutcome:
    """Train one config into `run_dir` (config.yaml, metrics.jsonl, checkpoints, final.pt), log its per-step
    metrics and summaries; the MLflow run stays open for `finish_run`. Under torchrun every rank calls this;
    only rank 0 writes and tracks. A resume with a changed config (`allow_config_change`) is tagged
    `alignlab.config_changed` in MLflow (the details are in the run folder's config_history.jsonl)."""
    from alignlab.tracking import summarise_history
    from alignlab.tracking.summary import cost_figures
    from alignlab.training.distributed import init_distributed
    from alignlab.training.trainer import train

    run_dir = Path(run_dir)
    dist = dist or init_distributed()
    if dist.is_main and not resume:  # a fresh run: an earlier run's results must not pass for this one's
        (run_dir / "results.json").unlink(missing_ok=True)

    def tag_config_change(step: int, changes: list) -> None:
        tracker.set_tags({TAG_CONFIG_CHANGED: f"step {step}: " + ", ".join(str(c) for c in changes)})
        tracker.log_artifact(run_dir / CONFIG_HISTORY_FILE)

    score_epoch = val_zero_shot_scorer(cfg) if cfg.train.select_by and dist.is_main else None  # rank 0 scores
    tic = time.perf_counter()
    result = train(cfg, run_dir, resume=resume, allow_config_change=allow_config_change,
                   on_metrics=tracker.log_metrics if tracker else None,
                   on_config_change=tag_config_change if tracker else None, dist_info=dist,
                   score_epoch=score_epoch)
    metrics = summarise_history([{k: v for k, v in h.items() if k not in ("step", "epoch")} for h in result.history])
    metrics["train_seconds"] = time.perf_counter() - tic
    metrics.update(cost_figures([h["step_time"] for h in result.history if "step_time" in h], metrics["train_seconds"],
                                dist.world_size, cfg.train.usd_per_device_hour))
    skips = load_skip_report(run_dir)
    if skips is not None:
        metrics["data_skipped"] = skips["skipped"]
    if tracker:
        tracker.log_summary(metrics)
        tracker.log_artifact(run_dir / "config.yaml")
        if skips is not None:
            tracker.log_metrics(skip_metrics(skips), step=result.steps)
            tracker.log_artifact(run_dir / SKIPS_FILE)
        if result.final_checkpoint:
            tracker.log_artifact(result.final_checkpoint, artifact_path="checkpoint")
    return TrainOutcome(result.steps, metrics, result.final_checkpoint, result.model)


def finish_run(cfg: ExperimentConfig, run_dir: Path, trained: TrainOutcome, *,
               tracker: RunTracker | None = None) -> dict:
    """Evaluate (the model in memory, else the final checkpoint), write `run_dir/results.json` and end the
    MLflow run FINISHED; returns the flat metrics (training summaries + evaluation)."""
    run_dir = Path(run_dir)
    evaluation = {}
    if cfg.eval.enabled:
        if trained.model is not None:
            from alignlab.training.builders import tokenizer_from_config

            data_root = resolve_data_root(cfg.data)
            tokenizer = tokenizer_from_config(cfg.model, cfg.data, data_root)
            suite = evaluate_trained_model(cfg, trained.model, tokenizer, run_dir / "eval")
        elif trained.final_checkpoint is not None:
            suite = evaluate_checkpoint(trained.final_checkpoint, run_dir / "eval")
        else:
            raise FileNotFoundError(f"nothing to evaluate in {run_dir}: training left no final.pt "
                                    f"(did the train step finish?)")
        evaluation = {k: v for k, v in suite.items() if isinstance(v, (int, float))}
        evaluation |= _selected_evaluation(cfg, run_dir)
    metrics = trained.metrics | evaluation
    (run_dir / "results.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if tracker:
        tracker.log_metrics(evaluation, step=trained.steps)
        tracker.log_artifact(run_dir / "results.json")
        if (run_dir / "eval").is_dir():
            tracker.log_artifact(run_dir / "eval", artifact_path="eval")
        tracker.end("FINISHED")
    return metrics


def _selected_evaluation(cfg: ExperimentConfig, run_dir: Path) -> dict:
    """`train.select_by`: the suite on the selected epoch's weights, as `selected/<metric>` next to the last
    epoch's own keys, and `selected/epoch` ({} without a selection)."""
    from alignlab.training.selection import selected_checkpoint

    path = selected_checkpoint(run_dir) if cfg.train.select_by else None
    if path is None:
        return {}
    suite = evaluate_checkpoint(path, run_dir / "eval-selected")
    epoch = int(path.stem.removeprefix("epoch-"))
    return {f"selected/{k}": v for k, v in suite.items() if isinstance(v, (int, float))} | {"selected/epoch": epoch}


def failure_reason(err: BaseException) -> str:
    """One line for the `alignlab.failure` tag: the error type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:5000]


def end_tracking_on_error(tracker: RunTracker | None, err: BaseException) -> None:
    """End an open run KILLED (Ctrl-C) or FAILED with the reason in the `alignlab.failure` tag (a reason an
    earlier step already recorded, e.g. a training job's own, is kept); the caller re-raises."""
    if not tracker:
        return
    try:
        if TAG_FAILURE not in tracker.client.get_run(tracker.run_id).data.tags:
            tracker.set_tags({TAG_FAILURE: failure_reason(err)})
    except Exception as tag_error:  # noqa: BLE001 - the training error is the one to surface
        print(f"[alignlab] could not tag the MLflow run with the failure reason: {tag_error}")
    tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")


TRAIN_OUTCOME_FILE = "train_outcome.json"


def train_only(cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False, allow_config_change: bool = False,
               mlflow_run_id: str | None = None) -> TrainOutcome | None:
    """A pipeline's train step, possibly as one of several torchrun ranks: prepare data, train, and on rank 0
    write `train_outcome.json` (steps, metrics, final checkpoint) for the evaluate step. With
    `mlflow_run_id` the metrics go to that open run (the step that launched this job created it), which
    stays open (on failure it gets the `alignlab.failure` tag; the launching step ends it); without it nothing
    is tracked here."""
    from alignlab.tracking import RunTracker
    from alignlab.training.distributed import barrier, init_distributed

    run_dir = Path(run_dir)
    dist = init_distributed()
    if dist.is_main:
        ensure_dataset(cfg)
    barrier()
    tracker = None
    if mlflow_run_id and dist.is_main:
        tracker = RunTracker.attach(cfg.tracking.tracking_uri, mlflow_run_id, spool_dir=run_dir,
                                    flush_timeout_s=cfg.tracking.flush_timeout_s)
    try:
        trained = train_run(cfg, run_dir, tracker=tracker, resume=resume, allow_config_change=allow_config_change,
                            dist=dist)
    except Exception as err:
        if tracker:
            tracker.set_tags({TAG_FAILURE: failure_reason(err)})
            tracker.flush()  # the run stays open, but this process may end now: deliver the reason first
        raise
    if not dist.is_main:
        return None
    if tracker:
        tracker.flush()  # delivered before the evaluate step (another process) reads and ends the run
    outcome = {"steps": trained.steps, "metrics": trained.metrics,
               "final_checkpoint": str(trained.final_checkpoint) if trained.final_checkpoint else None}
    (run_dir / TRAIN_OUTCOME_FILE).write_text(json.dumps(outcome, indent=2, sort_keys=True))
    return trained


def load_train_outcome(run_dir: Path) -> TrainOutcome:
    """The `train_outcome.json` a `train_only` job left in `run_dir` (no model: evaluate from the checkpoint)."""
    path = Path(run_dir) / TRAIN_OUTCOME_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the training job did not finish (see its logs)")
    data = json.loads(path.read_text())
    checkpoint = Path(data["final_checkpoint"]) if data.get("final_checkpoint") else None
    return TrainOutcome(int(data["steps"]), dict(data["metrics"]), checkpoint)


def run_experiment(cfg: ExperimentConfig, run_dir: Path, *, ablation: str | None = None, arm: str | None = None,
                   resume: bool = False, allow_config_change: bool = False, parent_run_id: str | None = None) -> dict:
    """Train, evaluate and track one config; returns the flat metrics written to `run_dir/results.json`.

    `parent_run_id` (default: $ALIGNLAB_PARENT_RUN_ID) nests the MLflow run under a pipeline's run."""
    from alignlab.training.distributed import barrier, init_distributed

    run_dir = Path(run_dir)
    dist = init_distributed()
    if dist.is_main:  # under torchrun only rank 0 prepares data, tracks, evaluates and writes results
        ensure_dataset(cfg)
    barrier()
    tracker = None
    if dist.is_main:
        tracker = start_run_tracking(cfg, run_dir, resolve_data_root(cfg.data), ablation=ablation, arm=arm,
                                     world_size=dist.world_size, parent_run_id=parent_run_id)
    try:
        with sigterm_as_interrupt():  # Ctrl-C and SIGTERM end the run KILLED, exceptions FAILED, never RUNNING
            trained = train_run(cfg, run_dir, tracker=tracker, resume=resume,
                                allow_config_change=allow_config_change, dist=dist)
            return finish_run(cfg, run_dir, trained, tracker=tracker) if dist.is_main else {}
    except BaseException as err:
        end_tracking_on_error(tracker, err)
        raise
