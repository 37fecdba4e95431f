"""`make image-test`, last part: the demo ablation as its KFP pipeline with every task in the image.

kfp's own DockerRunner starts each task's container through the Docker API, which `podman system service`
serves here (DOCKER_HOST=unix://...). The working folder is kfp's pipeline root, bind-mounted at the same path,
so the tasks' `workdir` parameter means the same folder inside and outside. kfp's local runner ignores the
env the settings put on tasks, so the image variables go in as the runner's container environment.

usage: python infra/images/run_demo_in_image.py IMAGE DIGEST WORKDIR [key=value ...]
"""

import os
import sys
from pathlib import Path

from kfp import local

from alignlab.ablation import load_spec
from alignlab_pipelines.ablation import pipeline_for_plans
from alignlab_pipelines.local import prepare_tracking_stores, run_pipeline_locally
from alignlab_pipelines.settings import PipelineSettings

SPEC = Path(__file__).resolve().parents[2] / "ablations" / "demo.yaml"


def main(image: str, digest: str, workdir: str, overrides: list[str]) -> None:
    work = Path(workdir).resolve()
    spec, plans = load_spec(SPEC, overrides)
    pipeline = pipeline_for_plans(spec, plans, PipelineSettings(image=image))
    env = {"ALIGNLAB_IMAGE": image, "ALIGNLAB_IMAGE_DIGEST": digest, "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
    runner = local.DockerRunner(environment=env, network_mode="none", working_dir=str(work))
    os.chdir(work)
    os.umask(0)  # what this process creates here (the MLflow store, kfp's task folders) the image's uid 10001 writes
    prepare_tracking_stores(plans)
    local.init(runner=runner, pipeline_root=str(work), raise_on_error=True)
    outputs = run_pipeline_locally(pipeline, {"workdir": str(work), "resume": False})
    print(outputs["Output"].rstrip())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
