"""KFP v2 lightweight Python components, one per ablation step, built for a container image.

Each component is a thin typed function: it moves into the shared working folder (`workdir`: the caller's
folder locally, a shared volume on a cluster) so the config's relative paths (`data/`, `runs/`) mean the
same thing in every step, then calls the step in `alignlab_components.steps` and returns JSON. KFP
serialises only the function's own source, so every import sits inside the body; the image must have
alignlab (with the `orchestration` extra, for kfp's executor) installed, hence `packages_to_install=[]`
and no kfp install at start-up.

The image is a compile-time setting: `build_components(image)` wraps `STEP_FUNCTIONS` for that image. To
add a step (filter, teacher train, teacher cache): write its body in `steps.py`, a typed wrapper here, and
append the wrapper to `STEP_FUNCTIONS`. The spec's `prepare` steps share the `prepare` component: each task
carries its entry ({kind: fields}) and is named by kind in its display name.
"""

# No `from __future__ import annotations`: kfp reads the wrappers' annotations as real types.
from collections.abc import Callable

from kfp import dsl
from kfp.dsl import Markdown, Output

DEFAULT_IMAGE = "alignlab:latest"


def prepare_data(config_json: str, workdir: str) -> str:
    """Generate (or reuse) the SynthCaps dataset of one config; returns {"data_root", "dataset_hash"}."""
    import json
    import os

    os.chdir(workdir)
    from alignlab_components.steps import prepare_data_step

    return json.dumps(prepare_data_step(json.loads(config_json)))


def open_tracking(tracking_json: str, ablation: str, pipeline_run_id: str, workdir: str) -> str:
    """Create the pipeline run's parent MLflow run; returns its id ("" when tracking is off)."""
    import json
    import os

    os.chdir(workdir)
    from alignlab_components.steps import open_tracking_step

    return open_tracking_step(json.loads(tracking_json), ablation, pipeline_run_id)


def close_tracking(tracking_json: str, parent_run_id: str, workdir: str):
    """End the parent MLflow run FINISHED once the report is written."""
    import json
    import os

    os.chdir(workdir)
    from alignlab_components.steps import close_tracking_step

    close_tracking_step(json.loads(tracking_json), parent_run_id)


def train(run: dict, ablation: str, workdir: str, resume: bool, pipeline_run_id: str, launch_json: str = "{}",
          parent_run_id: str = "") -> str:
    """Train one arm x seed (`run`: {"arm", "seed", "run_dir", "config_json"}); writes final.pt, returns the
    hand-off for the evaluate step as JSON. A retry within the same pipeline run (`pipeline_run_id`, given
    dsl.PIPELINE_JOB_ID_PLACEHOLDER) resumes from the run's newest checkpoint. `launch_json`: the TorchX
    launch settings; more than one process in all trains through a TorchX dist.ddp job. `parent_run_id`: the
    pipeline run's MLflow run, under which this run nests ("" for none)."""
    import json
    import os

    os.chdir(workdir)
    from alignlab_components.steps import train_step

    return json.dumps(train_step(run, ablation, resume=resume, pipeline_run_id=pipeline_run_id,
                                 launch=json.loads(launch_json), parent_run_id=parent_run_id))


def evaluate(trained: str, workdir: str) -> str:
    """Evaluate the checkpoint named by the train step's JSON; writes results.json, returns the run's
    record {"arm", "seed", "run_dir", "metrics"} as JSON."""
    import json
    import os

    os.chdir(workdir)
    from alignlab_components.steps import evaluate_step

    return json.dumps(evaluate_step(json.loads(trained)))


def report(results: list, spec_json: str, workdir: str, report_md: Output[Markdown]) -> str:
    """Aggregate every run's record (`results`: the evaluate steps' JSON) into the ablation report
    runs/<ablation>/report.{md,csv,json}; returns the printed table, and report.md as the `report_md`
    artifact for the KFP UI."""
    import json
    import os
    import shutil

    os.chdir(workdir)
    from alignlab_components.steps import report_step

    report = report_step([json.loads(r) for r in results], json.loads(spec_json))
    shutil.copyfile(os.path.join(report["report_dir"], "report.md"), report_md.path)
    return report["printed"]


def gate(results: list, spec_json: str, rules_yaml: str, workdir: str, gate_md: Output[Markdown]) -> str:
    """The regression gate of a spec with a `gate` section (the nightly suite) over every run's record;
    writes runs/<ablation>/gate/gate.{md,json} (gate.md also as the `gate_md` artifact) and fails the step
    when the gate flags a regression. Returns the status: ok or insufficient_history."""
    import json
    import os
    import shutil

    os.chdir(workdir)
    from alignlab_components.steps import gate_step

    outcome = gate_step([json.loads(r) for r in results], json.loads(spec_json), rules_yaml)
    shutil.copyfile(os.path.join(outcome["gate_dir"], "gate.md"), gate_md.path)
    if outcome["status"] == "regression":
        raise RuntimeError(outcome["printed"] + "\nnightly gate: REGRESSION (a violation repeated; see gate.md)")
    return outcome["status"]


def prepare(step_json: str, ablation: str, workdir: str) -> str:
    """One of the spec's `prepare` steps (`step_json`: {kind: fields}; kind synth, import, filter,
    teacher_train, teacher_cache or train), skipped when its output is complete; returns the result JSON."""
    import json
    import os

    os.chdir(workdir)
    from alignlab_components.steps import prepare_step

    return json.dumps(prepare_step(json.loads(step_json), ablation))


STEP_FUNCTIONS: tuple[Callable, ...] = (open_tracking, prepare_data, prepare, train, evaluate, report, gate,
                                        close_tracking)


def make_component(func: Callable, image: str = DEFAULT_IMAGE):
    """One lightweight component running `func` in `image` (which already holds alignlab and kfp)."""
    if not image or any(c.isspace() for c in image):
        raise ValueError(f"image {image!r} is not a container image reference (e.g. registry/alignlab:1.0)")
    return dsl.component(func, base_image=image, packages_to_install=[], install_kfp_package=False)


def build_components(image: str = DEFAULT_IMAGE) -> dict:
    """{step name: component} for every step in `STEP_FUNCTIONS`, all running in `image`."""
    return {func.__name__: make_component(func, image) for func in STEP_FUNCTIONS}
