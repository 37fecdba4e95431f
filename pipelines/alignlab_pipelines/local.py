"""`alignlab run --runner kfp-local`: the cluster's ablation pipeline, executed by kfp's local runner.

Every step runs as a subprocess of this Python (`SubprocessRunner(use_venv=False)`: no container, no
virtual environment, no package installs), in the current folder, so configs, data, runs and the MLflow
store are where the inline runner puts them. What kfp 2.16's local runner does with the pipeline:

- runs: lightweight Python components, parameter passing, `dsl.ParallelFor` over raw items (at most 2
  iterations at a time, in threads), `dsl.Collected` fan-in out of a sub-pipeline, output artifacts
  (written under `pipeline_root`);
- ignores: the image (steps use this interpreter), CPU / memory / accelerator requests, retries, caching
  (every step runs every time; SynthCaps generation itself reuses a finished dataset), env variables set
  on tasks, and the whole kfp-kubernetes platform spec (PVC, /dev/shm, node selectors, tolerations,
  secrets) -- so the settings need no local variant;
- does not support: `dsl.ExitHandler`, `dsl.OneOf`, containerized components (`target_image`), a task after
  a loop in the same DAG (hence the `runs` sub-pipeline), and a sub-pipeline holding a loop under a root
  without control flow: `kfp.local` picks its loop-capable orchestrator only when the root DAG itself has a
  loop or condition, so `run_pipeline_locally` calls that orchestrator directly.

Output: kfp echoes every executor's output and its own task logs to stdout; `local_output` sends them to
runs/<ablation>/logs/<task>.log and prints one line per task instead. After a failed task kfp still runs
the loop iterations it had queued (its thread pool's shutdown waits for them), then the pipeline fails.
"""

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from kfp import local

from alignlab.ablation import load_spec
from alignlab.console import TaskConsole, TaskFailed
from alignlab.ablation_runner import ablation_dir
from alignlab_components.steps import SERIAL_STEP_THREADS
from alignlab_pipelines.ablation import dataset_configs, pipeline_for_plans
from alignlab_pipelines.local_output import capture_task_output
from alignlab_pipelines.settings import PipelineSettings

# kfp's local runner runs at most this many loop iterations at a time (ParallelExecutor.conservative_max).
LOCAL_PARALLELISM = 2


def run_pipeline_locally(pipeline_func, arguments: dict) -> dict:
    """Run a compiled pipeline function on the runner set by `kfp.local.init`; returns its outputs.

    Same as calling `pipeline_func(**arguments)` after `kfp.local.init`, except that the root DAG always goes
    to kfp's control-flow orchestrator (module docstring). Raises RuntimeError naming the failed task."""
    from kfp.local import config, executor_input_utils, placeholder_utils, status, utils
    from kfp.local.orchestrator import enhanced_dag_orchestrator

    config.LocalExecutionConfig.validate()
    settings = config.LocalExecutionConfig.instance
    spec = pipeline_func.pipeline_spec
    executors = {name: utils.struct_to_executor_spec(executor)
                 for name, executor in spec.deployment_spec["executors"].items()}
    fail_stack: list[str] = []
    outputs, result = enhanced_dag_orchestrator.run_enhanced_dag(
        pipeline_resource_name=executor_input_utils.get_local_pipeline_resource_name(spec.pipeline_info.name),
        dag_component_spec=spec.root, executors=executors, components=dict(spec.components.items()),
        dag_arguments=arguments, pipeline_root=settings.pipeline_root, runner=settings.runner,
        unique_pipeline_id=placeholder_utils.make_random_id(), fail_stack=fail_stack)
    if result != status.Status.SUCCESS:
        failed = " inside ".join(fail_stack) or "a task"
        raise TaskFailed(f"pipeline {spec.pipeline_info.name} failed: {failed} exited with an error (the failed "
                         f"task's log is named above)")
    return outputs


def prepare_tracking_stores(plans) -> None:
    """Open each run's MLflow store once, here: parallel steps that each find a fresh SQLite store both try
    to create its tables, and one fails ("table ... already exists"). MLflow's INFO lines about creating
    the tables are held back: they are routine, and the terminal is for task lines."""
    from mlflow.tracking import MlflowClient

    from alignlab.tracking import resolve_tracking_uri

    uris = {resolve_tracking_uri(p.config.tracking.tracking_uri) for p in plans if p.config.tracking.enabled}
    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        for uri in sorted(uris):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    finally:
        logger.setLevel(level)


@contextmanager
def cpu_share_per_step():
    """Give each of the concurrent step processes its share of the CPU cores (OMP_NUM_THREADS), unless the
    caller set it: two torch processes that each start one thread per core spin against each other and train
    several times slower than one."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // LOCAL_PARALLELISM))
    # The prepare steps run one at a time, before the runs' loop: they may take every core.
    os.environ[SERIAL_STEP_THREADS] = str(os.cpu_count() or 1)
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"], os.environ[SERIAL_STEP_THREADS]


def planned_task_labels(spec, plans) -> list[str]:
    """The labels of every task the pipeline will run, in order (as `local_output.task_label` names them)."""
    labels = ["open-tracking"] + [f"data {Path(root).name}" for root in dataset_configs(plans, spec)]
    labels += [f"prepare {entry.kind}" for entry in spec.prepare]
    labels += [f"{step} {plan.arm}/seed-{plan.seed}" for plan in plans for step in ("train", "evaluate")]
    return labels + ["report"] + (["gate"] if spec.gate is not None else []) + ["close-tracking"]


def run_local(spec_path: str | Path, overrides: list[str] | None = None, *, resume: bool = False,
              verbose: bool = False, pipeline_root: str | Path | None = None, print_fn=print) -> Path:
    """Run an ablation spec as its KFP pipeline on the local runner; returns the report folder.

    One line per task state on the terminal; each task's output (kfp's executor logs) goes to
    runs/<ablation>/logs/<task>.log, shown when the task fails (`verbose`: live). `pipeline_root` (default
    runs/<ablation>/kfp-local) holds kfp's per-task outputs and artifacts."""
    spec, plans = load_spec(spec_path, overrides)
    out_dir = ablation_dir(plans)
    console = TaskConsole(out_dir / "logs", verbose=verbose)
    print_fn(f"alignlab run {spec.name}: {len(spec.arm_overrides())} arms x {len(spec.seeds)} seeds = {len(plans)} "
             f"runs, on kfp's local runner; task logs in {console.log_dir}/")
    # An arm with train.ranks > 1 trains as a TorchX job of processes on this machine.
    pipeline = pipeline_for_plans(spec, plans, PipelineSettings(torchx_scheduler="local_cwd"))
    prepare_tracking_stores(plans)
    root = Path(pipeline_root or out_dir / "kfp-local").resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    console.queued(planned_task_labels(spec, plans))
    with warnings.catch_warnings(), cpu_share_per_step(), capture_task_output(console):
        # The subprocess runner warns about any image without "python" in its name; it never uses the image.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        outputs = run_pipeline_locally(pipeline, {"workdir": str(Path.cwd()), "resume": resume})
    print_fn("\n" + outputs["Output"].rstrip())  # the report step's table, as the inline runner prints it
    return out_dir
