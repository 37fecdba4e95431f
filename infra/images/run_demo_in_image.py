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

import docker
from kfp import local

from alignlab.ablation import load_spec
from alignlab_pipelines.ablation import pipeline_for_plans
from alignlab_pipelines.local import prepare_tracking_stores, run_pipeline_locally
from alignlab_pipelines.settings import PipelineSettings

SPEC = Path(__file__).resolve().parents[2] / "ablations" / "demo.yaml"


def docker_client_with_long_timeout(timeout_s: int = 1800) -> None:
    """kfp calls `docker.from_env()` (a 60 s API timeout); podman on vfs storage copies the whole image
    (6.6 GiB) when it creates a container, which takes minutes here, so the create call needs longer."""
    from_env = docker.from_env
    docker.from_env = lambda **kwargs: from_env(**{"timeout": timeout_s, **kwargs})


def main(image: str, digest: str, workdir: str, overrides: list[str]) -> None:
    work = Path(workdir).resolve()
    spec, plans = load_spec(SPEC, overrides)
    pipeline = pipeline_for_plans(spec, plans, PipelineSettings(image=image))
    env = {"ALIGNLAB_IMAGE": image, "ALIGNLAB_IMAGE_DIGEST": digest, "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
    runner = local.DockerRunner(environment=env, network_mode="none", working_dir=str(work))
    os.chdir(work)
    docker_client_with_long_timeout()
    # The tasks run as the image's uid 10001: what this process creates here (kfp's task folders, the MLflow
    # store, whose file SQLite creates 0644 whatever the umask) must be writable by it.
    os.umask(0)
    prepare_tracking_stores(plans)
    for path in work.rglob("*"):
        path.chmod(0o777 if path.is_dir() else 0o666)
    local.init(runner=runner, pipeline_root=str(work), raise_on_error=True)
    outputs = run_pipeline_locally(pipeline, {"workdir": str(work), "resume": False})
    print(outputs["Output"].rstrip())
    check_image_tags(work, digest)


def check_image_tags(work: Path, digest: str) -> None:
    """Every MLflow run of the pipeline, its parent run included, names the image digest."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    wrong = [r.info.run_name for r in runs if r.data.tags.get("alignlab.image") != digest]
    if not parents or wrong:
        raise SystemExit(f"runs without alignlab.image={digest}: {wrong} ({len(parents)} parent runs)")
    print(f"{len(runs)} MLflow runs ({len(parents)} pipeline parent run) tagged alignlab.image={digest}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
