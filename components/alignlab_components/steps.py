"""The ablation steps as plain functions: what each KFP component runs, callable without KFP.

The steps are the core's own pieces of `alignlab.experiment.run_experiment` (ensure_dataset, start_run_tracking,
train_run, finish_run), split at the checkpoint, so they keep the inline runner's run-folder layout (README
"Where results go") and `alignlab report` and the inline runner read their output:

  open_tracking_step the pipeline run's parent MLflow run (closed by close_tracking_step after the report)
  prepare_data_step  SynthCaps generated once into data/synthcaps-<hash> (reused when already there)
  prepare_step       one of the spec's `prepare` steps (synth, import, filter, teacher_train, teacher_cache,
                     train), through `alignlab.prepare.run_prepare_step`; skipped when its output is complete
  train_step         config.yaml, metrics.jsonl, checkpoints/, final.pt; creates the MLflow run; with more
                     than one process, a TorchX dist.ddp job does the training
  evaluate_step      evaluates final.pt, writes eval/ and results.json; completes and ends the same MLflow run
  report_step        report.{md,csv,json} over the evaluate steps' records (the fan-in)
  gate_step          (specs with a `gate`, e.g. the nightly suite) regression gate against earlier MLflow runs

Train and evaluate run in separate processes (pods on a cluster): train hands evaluate a small dict with the
checkpoint path and the MLflow run id, and evaluate re-opens that run by id. Each step runs in a fresh
process, so each imports only what it needs (torch alone takes seconds to import).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from alignlab.config import ExperimentConfig, load_yaml, validate_config

RESULTS_FILE = "results.json"
PIPELINE_RUN_FILE = "pipeline-run.txt"  # id of the pipeline run that last trained into a run folder
# Set by a runner whose steps share the machine (kfp's local runner: OMP_NUM_THREADS is each concurrent
# step's share of the cores): the threads a step that runs alone may use (all the cores).
SERIAL_STEP_THREADS = "ALIGNLAB_SERIAL_STEP_THREADS"


def prepare_data_step(config: dict) -> dict:
    """Generate (or reuse) the dataset a config trains on; returns its root folder and dataset hash."""
    from alignlab.experiment import dataset_hash, ensure_dataset

    cfg = validate_config(config, source="prepare-data config")
    root = ensure_dataset(cfg)
    return {"data_root": str(root), "dataset_hash": dataset_hash(root)}


def prepare_step(entry: dict, ablation: str) -> dict:
    """Run one `prepare` entry of an ablation spec ({kind: fields}, placeholders already filled by
    `load_spec` at compile time) in the working folder; returns `run_prepare_step`'s result
    ({"kind", "out", "status": "done" | "skipped", ...})."""
    from alignlab.prepare import run_prepare_step

    with serial_step_threads():
        return run_prepare_step(entry, {"ablation": ablation})


@contextmanager
def serial_step_threads():
    """For a step that runs alone (the prepare steps run one at a time, before the runs' loop): the thread
    count SERIAL_STEP_THREADS names, in torch and in OMP_NUM_THREADS (which a prepare `train` step's trainer
    reads), instead of the share of the cores that the runner gave every step; restored afterwards. Without
    SERIAL_STEP_THREADS (a cluster pod, or OMP_NUM_THREADS set by the user), nothing changes."""
    threads = os.environ.get(SERIAL_STEP_THREADS, "")
    if not threads.isdigit() or int(threads) < 1:
        yield
        return
    import torch

    before_torch, before_omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads))
    os.environ["OMP_NUM_THREADS"] = threads
    try:
        yield
    finally:
        torch.set_num_threads(before_torch)
        if before_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_omp


def _run_config(run: dict) -> ExperimentConfig:
    missing = [key for key in ("arm", "seed", "run_dir", "config_json") if key not in run]
    if missing:
        raise ValueError(f"run item is missing {missing}; expected keys arm, seed, run_dir, config_json "
                         f"(one ParallelFor item of the ablation pipeline)")
    return validate_config(json.loads(run["config_json"]),
                           source=f"config of arm {run['arm']!r} seed {run['seed']}")


def open_tracking_step(tracking: dict, ablation: str, pipeline_run_id: str) -> str:
    """The pipeline run's parent MLflow run (every arm x seed run nests under it); "" when tracking is off.

    `tracking`: {"enabled", "tracking_uri", "experiment"} of the ablation's configs. The parent is tagged
    `alignlab.pipeline` (not `alignlab.ablation`), so reports and the gate, which select runs by ablation and
    arm, never mistake it for a run."""
    from alignlab.tracking import RunTracker

    if not tracking.get("enabled"):
        return ""
    parent = RunTracker.start(tracking.get("tracking_uri"), tracking["experiment"], run_name=f"pipeline {ablation}",
                              tags={"alignlab.pipeline": ablation, "alignlab.pipeline_run_id": pipeline_run_id},
                              params={})
    return parent.run_id


def close_tracking_step(tracking: dict, parent_run_id: str, status: str = "FINISHED") -> None:
    """End the parent MLflow run `open_tracking_step` created (nothing when tracking is off)."""
    from alignlab.tracking import RunTracker

    if parent_run_id:
        RunTracker.attach(tracking.get("tracking_uri"), parent_run_id).end(status)


def train_step(run: dict, ablation: str, *, resume: bool = False, pipeline_run_id: str | None = None,
               launch: dict | None = None, parent_run_id: str | None = None) -> dict:
    """Train one arm x seed into `run["run_dir"]`; returns what the evaluate step needs.

    `run` is one ParallelFor item: {"arm", "seed", "run_dir", "config_json": the resolved config}. With `resume`,
    a run that already has results.json is kept (`finished`: True) and an interrupted one continues from its
    newest checkpoint, as `alignlab run --resume` does inline. A retry within the same pipeline run (the run
    folder records `pipeline_run_id`) always continues from its newest checkpoint.

    `launch` (the pipeline settings' TorchX part): {"nproc_per_node", "nnodes", "scheduler", "scheduler_cfg",
    "image", "cpu", "gpu", "memMB", "mounts"}; the arm's `train.ranks`, when set, replaces nproc_per_node x
    nnodes (`launch_for_run`). With more than one process in all, this step creates the MLflow
    run, then runs `alignlab train --train-only --mlflow-run-id ...` as a TorchX `dist.ddp` job (`local_cwd`:
    processes here; `kubernetes`: a Volcano job) and waits for it; otherwise it trains in this process.
    """
    from alignlab.data.roots import resolve_data_root
    from alignlab.experiment import end_tracking_on_error, start_run_tracking, train_run
    from alignlab.tracking import resolve_tracking_uri

    cfg = _run_config(run)
    arm, run_dir = run["arm"], Path(run["run_dir"])
    handoff = {"ablation": ablation, "arm": arm, "seed": cfg.seed, "run_dir": str(run_dir),
               "checkpoint": str(run_dir / "final.pt"), "evaluate": cfg.eval.enabled, "finished": False,
               "steps": 0, "train_metrics": {}, "tracking_uri": None, "mlflow_run_id": None}
    if resume and (run_dir / RESULTS_FILE).is_file():
        return handoff | {"finished": True}
    data_root = resolve_data_root(cfg.data)
    if isinstance(data_root, Path) and not data_root.exists():  # an s3:// root (a str) is checked when indexed
        raise FileNotFoundError(f"dataset {data_root} for arm {arm!r} does not exist: the prepare-data step "
                                f"must run first (in the same working folder / shared volume)")
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / PIPELINE_RUN_FILE
    if pipeline_run_id:
        resume = resume or (marker.is_file() and marker.read_text() == pipeline_run_id)
        marker.write_text(pipeline_run_id)
    launch = launch_for_run(cfg, dict(launch or {}), arm)
    world_size = int(launch.get("nproc_per_node", 1)) * int(launch.get("nnodes", 1))
    tracker = start_run_tracking(cfg, run_dir, data_root, ablation=ablation, arm=arm, world_size=world_size,
                                 parent_run_id=parent_run_id or None)
    try:
        if world_size > 1:
            trained = _train_with_torchx(cfg, run_dir, launch, resume=resume, tracker=tracker)
        else:
            trained = train_run(cfg, run_dir, tracker=tracker, resume=resume)
    except BaseException as err:
        end_tracking_on_error(tracker, err)
        raise
    # The MLflow run stays open on success: the evaluate step adds its metrics and ends it.
    return handoff | {"steps": trained.steps, "train_metrics": trained.metrics,
                      "tracking_uri": resolve_tracking_uri(cfg.tracking.tracking_uri) if tracker else None,
                      "mlflow_run_id": tracker.run_id if tracker else None}


def launch_for_run(cfg: ExperimentConfig, launch: dict, arm: str) -> dict:
    """The pipeline's launch settings, with the arm's `train.ranks` (when set) in place of nproc_per_node x
    nnodes: 1 trains in the step's process, more split evenly over the settings' nodes."""
    ranks = cfg.train.ranks
    if ranks is None:
        return launch
    if ranks == 1:
        return launch | {"nproc_per_node": 1, "nnodes": 1}
    nnodes = int(launch.get("nnodes", 1))
    if ranks % nnodes:
        raise ValueError(f"arm {arm!r}: train.ranks={ranks} does not split evenly over the pipeline's nnodes={nnodes}: "
                         f"set train.ranks to a multiple of {nnodes} or change the pipeline settings' nnodes")
    return launch | {"nproc_per_node": ranks // nnodes}


def _train_with_torchx(cfg: ExperimentConfig, run_dir: Path, launch: dict, *, resume: bool, tracker):
    """`alignlab train --train-only` as a TorchX dist.ddp job; rank 0 logs into this step's MLflow run."""
    from alignlab.config import config_to_dict
    from alignlab.experiment import load_train_outcome
    from alignlab.yaml12 import dump_yaml
    from alignlab_components.torchx_launch import launch_train

    # Not run_dir/config.yaml: that is the config the checkpoints were trained with, which the job itself
    # rewrites only once its resume check passed.
    config_path = run_dir / "torchx" / "launch-config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(dump_yaml(config_to_dict(cfg)))  # the job needs the real values, credentials too
    train_args = ["--train-only"] + (["--resume"] if resume else [])
    if tracker:
        train_args += ["--mlflow-run-id", tracker.run_id]
    options = {k: launch[k] for k in ("image", "cpu", "gpu", "memMB", "mounts", "env") if launch.get(k) is not None}
    launch_train(config_path, [], run_dir, int(launch.get("nproc_per_node", 1)), int(launch.get("nnodes", 1)),
                 scheduler=launch.get("scheduler", "local_cwd"), scheduler_cfg=launch.get("scheduler_cfg"),
                 train_args=train_args, **options)
    return load_train_outcome(run_dir)


def evaluate_step(trained: dict) -> dict:
    """Evaluate the train step's checkpoint, write results.json and finish the run's MLflow run.

    Returns {"arm", "seed", "run_dir", "metrics"}: one record of the ablation report."""
    from alignlab.experiment import TrainOutcome, end_tracking_on_error, finish_run
    from alignlab.tracking import RunTracker

    run_dir = Path(trained["run_dir"])
    record = {"arm": trained["arm"], "seed": trained["seed"], "run_dir": str(run_dir)}
    results = run_dir / RESULTS_FILE
    if trained["finished"] and results.is_file():
        return record | {"metrics": json.loads(results.read_text())}
    cfg = _stored_config(run_dir)
    tracker = RunTracker.attach(trained["tracking_uri"], trained["mlflow_run_id"], spool_dir=run_dir,
                                flush_timeout_s=cfg.tracking.flush_timeout_s) if trained.get("mlflow_run_id") else None
    outcome = TrainOutcome(int(trained["steps"]), dict(trained["train_metrics"]), Path(trained["checkpoint"]))
    try:
        metrics = finish_run(cfg, run_dir, outcome, tracker=tracker)
    except BaseException as err:
        end_tracking_on_error(tracker, err)
        raise
    return record | {"metrics": metrics}


def report_step(results: list[dict], spec: dict) -> dict:
    """The ablation report of the evaluate steps' records (the fan-in), written by the inline runner's own
    `report_ablation` into runs/<ablation>/report.{md,csv,json}; returns {"report_dir", "printed": the text it
    prints (the table of the spec's `report_metrics` and where the files are)}.

    `spec` is the AblationSpec as a dict; each run's config is the config.yaml the train step wrote."""
    from alignlab.ablation import AblationSpec, RunPlan
    from alignlab.ablation_runner import report_ablation

    if not results:
        raise ValueError("no run results reached the report step; the pipeline planned no arm x seed")
    ablation = AblationSpec.model_validate(spec)
    plans = [RunPlan(ablation=ablation.name, arm=r["arm"], seed=r["seed"], config=_stored_config(Path(r["run_dir"])))
             for r in results]
    printed: list[str] = []
    out_dir = report_ablation(ablation, plans, print_fn=printed.append)
    return {"report_dir": str(out_dir), "printed": "\n".join(printed)}


def gate_step(results: list[dict], spec: dict, rules_yaml: str) -> dict:
    """The nightly gate after the report: the core's `gate_ablation` over the evaluate steps' runs, with the
    rules given as YAML text (embedded at compile time: the compiling machine's path means nothing in a pod).
    Writes runs/<ablation>/gate/gate.{md,json} (and the spec's Prometheus exports); returns {"status",
    "gate_dir", "printed"}. The component fails on status "regression", so the KFP run shows it."""
    from alignlab.ablation import AblationSpec, RunPlan
    from alignlab.ablation_runner import ablation_dir, gate_ablation

    ablation = AblationSpec.model_validate(spec)
    plans = [RunPlan(ablation=ablation.name, arm=r["arm"], seed=r["seed"], config=_stored_config(Path(r["run_dir"])))
             for r in results]
    rules = ablation_dir(plans) / "gate" / "rules.yaml"
    rules.parent.mkdir(parents=True, exist_ok=True)
    rules.write_text(rules_yaml)
    gate = ablation.gate.model_copy(update={"rules": str(rules)}) if ablation.gate else None
    if gate is None:
        raise ValueError(f"ablation {ablation.name} has no `gate` section; the gate step needs one")
    printed: list[str] = []
    result = gate_ablation(ablation.model_copy(update={"gate": gate}), plans, print_fn=printed.append)
    return {"status": result.status, "gate_dir": str(rules.parent), "printed": "\n".join(printed)}


def _stored_config(run_dir: Path) -> ExperimentConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the report reads each run's config from its run folder "
                                f"(shared between steps: the working folder or the pipeline's volume)")
    return validate_config(load_yaml(path), source=str(path))
