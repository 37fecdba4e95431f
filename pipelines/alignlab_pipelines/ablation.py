"""The ablation pipeline, built from an ablation spec (the same expansion `alignlab run` uses).

  open-tracking (the pipeline run's parent MLflow run; every arm x seed run nests under it)
  prepare-data (one task per distinct dataset, cached)
        │  (all of them)
        ▼
  prepare, prepare-2, ... (the spec's `prepare` steps in the listed order, each after the previous: synth,
        │         import, filter, teacher_train, teacher_cache (cached like prepare-data), train (train's resources))
        ▼
  runs: ParallelFor over arms x seeds ── train ──► evaluate      (a sub-pipeline returning
        │                                                        dsl.Collected(evaluate))
        ▼
  report (fan-in of every run's record) -> runs/<ablation>/report.{md,csv,json}
        │
        ▼
  gate (only for specs with a `gate`: the nightly suite) -> runs/<ablation>/gate/gate.{md,json}; fails on a
        regression
  close-tracking (after the report: ends the parent MLflow run)

The loop sits in its own sub-pipeline rather than next to `report` because kfp's local runner (2.16) runs a
DAG's plain tasks before its loops, so a task after a loop at the same level would run first; nested, the
root DAG is data -> runs -> report in plain dependency order on both runners.

Pipeline parameters (runtime): `workdir` (where the config's relative paths point; default: the settings'
workdir, the PVC's mount path, and any other value must lie on that volume) and `resume` (keep finished runs,
resume interrupted ones, as `alignlab run --resume`). On a cluster every step works on the shared PVC: data,
checkpoints and run folders pass between steps as paths there; the steps' JSON outputs carry those paths.
"""

# No `from __future__ import annotations`: kfp reads the pipeline functions' annotations as real types.
import json
import re
from pathlib import Path

from kfp import dsl, kubernetes

from alignlab.ablation import AblationSpec, RunPlan
from alignlab.config import config_to_dict
from alignlab.data.roots import resolve_data_root
from alignlab_components.components import build_components
from alignlab_pipelines.settings import PipelineSettings

SHM_VOLUME = "dshm"


def pipeline_name(spec: AblationSpec) -> str:
    """KFP pipeline name of an ablation: alignlab-<spec name>, lower case, [a-z0-9-] only."""
    return "alignlab-" + re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")


def run_items(plans: list[RunPlan]) -> list[dict]:
    """The ParallelFor items, one per arm x seed: arm, seed, run folder and the resolved, validated config as
    JSON (a string, because KFP constants cannot hold the config's nulls)."""
    return [{"arm": p.arm, "seed": p.seed, "run_dir": str(p.run_dir), "config_json": _json(p.config)}
            for p in plans]


def _json(config) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)


def dataset_configs(plans: list[RunPlan], spec: AblationSpec | None = None) -> dict[str, str]:
    """{data root: config JSON of its first run} per distinct dataset, in first-use order: the shared data
    steps. With `spec`, also the base config's dataset when a prepare step reads it through `{data_root}`."""
    by_root: dict[str, str] = {}
    for plan in plans:
        by_root.setdefault(str(resolve_data_root(plan.config.data)), _json(plan.config))
    if spec is not None and spec.prepare_data_config is not None:
        base = spec.prepare_data_config
        by_root.setdefault(str(resolve_data_root(base.data)), _json(base))
    return by_root


def prepare_tasks(spec: AblationSpec, ops: dict, settings: PipelineSettings, workdir, after: list) -> list:
    """One task per `prepare` entry of the spec, in the listed order: the first after every data task,
    each next one after the previous. Data steps are cached like prepare-data (`cache_data`); a `train` step
    gets train's compute settings (GPUs, resources, retries: a retry resumes its checkpoints) and caching."""
    tasks: list = []
    for index, entry in enumerate(spec.prepare):
        task = ops["prepare"](step_json=json.dumps(entry.to_dict(), sort_keys=True), ablation=spec.name,
                              workdir=workdir)
        task.set_display_name(f"prepare {index + 1} {entry.kind}")
        task.after(*(tasks[-1:] or after))
        _shared_step(task, settings)
        if entry.kind == "train":
            _compute_step(task, settings).set_caching_options(settings.cache_training)
        else:
            task.set_caching_options(settings.cache_data)
        tasks.append(task)
    return tasks


def pipeline_for_plans(spec: AblationSpec, plans: list[RunPlan], settings: PipelineSettings):
    """The pipeline of an already expanded spec (module docstring); `settings` apply per step as described
    in `alignlab_pipelines.settings`."""
    ops = build_components(settings.image)
    items = run_items(plans)
    tracking = plans[0].config.tracking
    tracking_json = json.dumps({"enabled": tracking.enabled, "tracking_uri": tracking.tracking_uri,
                                "experiment": tracking.experiment or spec.name})

    @dsl.pipeline(name="runs", description="train -> evaluate for every arm x seed")
    def runs(workdir: str, resume: bool, parent_run_id: str) -> list:
        with dsl.ParallelFor(items, parallelism=settings.parallelism or None) as run:
            trained = ops["train"](run=run, ablation=spec.name, workdir=workdir, resume=resume,
                                   pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                   launch_json=json.dumps(torchx_launch(settings)), parent_run_id=parent_run_id)
            evaluated = ops["evaluate"](trained=trained.output, workdir=workdir)
            for task in (trained, evaluated):
                _compute_step(task, settings).set_caching_options(settings.cache_training)
                _shared_step(task, settings)
        return dsl.Collected(evaluated.output)

    @dsl.pipeline(name=pipeline_name(spec), description=spec.description or f"ablation {spec.name}")
    def ablation_pipeline(workdir: str = settings.workdir, resume: bool = False) -> str:
        tracking = ops["open_tracking"](tracking_json=tracking_json, ablation=spec.name, workdir=workdir,
                                        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        _shared_step(tracking, settings).set_caching_options(False)
        data = []
        for root, config in dataset_configs(plans, spec).items():
            task = ops["prepare_data"](config_json=config, workdir=workdir)
            task.set_display_name(f"data {Path(root).name}")
            data.append(_shared_step(task, settings).set_caching_options(settings.cache_data))
        prepared = prepare_tasks(spec, ops, settings, workdir, after=data)
        trained = runs(workdir=workdir, resume=resume, parent_run_id=tracking.output).after(*data, *prepared[-1:]) \
            .set_caching_options(settings.cache_training)
        summary = ops["report"](results=trained.output, spec_json=spec.model_dump_json(), workdir=workdir)
        _shared_step(summary, settings).set_caching_options(False)
        if spec.gate is not None:
            gate = ops["gate"](results=trained.output, spec_json=spec.model_dump_json(),
                               rules_yaml=Path(spec.gate.rules).read_text(), workdir=workdir).after(summary)
            _shared_step(gate, settings).set_caching_options(False)
        close = ops["close_tracking"](tracking_json=tracking_json, parent_run_id=tracking.output, workdir=workdir)
        _shared_step(close.after(summary), settings).set_caching_options(False)
        return summary.outputs["Output"]

    return ablation_pipeline


def torchx_launch(settings: PipelineSettings) -> dict:
    """The train step's TorchX launch settings (`alignlab_components.steps.train_step`): one process per GPU
    (`nproc_per_node`) on `nnodes` nodes; the job mounts the pipeline's volume at the same path."""
    launch = {"nproc_per_node": settings.nproc_per_node, "nnodes": settings.nnodes,
              "scheduler": settings.torchx_scheduler, "image": settings.image, "gpu": settings.gpus}
    if settings.torchx_scheduler == "kubernetes":
        launch["scheduler_cfg"] = {"queue": settings.torchx_queue}
        if settings.pvc:
            launch["mounts"] = [f"type=volume,src={settings.pvc},dst={settings.workdir}"]
    return launch


def _shared_step(task, settings: PipelineSettings):
    """What every step gets: the shared volume, plain env variables and secrets as env variables."""
    if settings.pvc:
        kubernetes.mount_pvc(task, pvc_name=settings.pvc, mount_path=settings.workdir)
    for name, value in settings.env.items():
        task.set_env_variable(name, value)
    for secret in settings.secrets:
        kubernetes.use_secret_as_env(task, secret_name=secret.secret, secret_key_to_env=secret.env)
    return task


def _compute_step(task, settings: PipelineSettings):
    """Train / evaluate: accelerators, CPU and memory, placement, /dev/shm and retries."""
    if settings.gpus:
        task.set_accelerator_type(settings.gpu_type).set_accelerator_limit(settings.gpus)
    if settings.cpu:
        task.set_cpu_request(settings.cpu)
    if settings.memory:
        task.set_memory_request(settings.memory)
    if settings.cpu_limit:
        task.set_cpu_limit(settings.cpu_limit)
    if settings.memory_limit:
        task.set_memory_limit(settings.memory_limit)
    for key, value in settings.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in settings.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                                  toleration_seconds=t.toleration_seconds)
    if settings.shm_size:
        kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory",
                                   size_limit=settings.shm_size)
    if settings.retries:
        task.set_retry(num_retries=settings.retries, backoff_duration=settings.retry_backoff)
    return task
