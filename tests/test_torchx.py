"""TorchX launching (components/alignlab_components/torchx_launch.py).

The 2-process test is the issue's acceptance check: `dist.ddp` on `local_cwd` with gloo on CPU must follow
the single-process loss trajectory on the same global batch, for both feature-gathering modes. The
Kubernetes test builds the Volcano Job offline and checks it field by field and against the `torchx run`
CLI's own dry run of the command the launcher writes out.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_config_tree

pytest.importorskip("torchx")

from alignlab_components.torchx_launch import launch_train  # noqa: E402

STEPS = 4
GLOBAL_BATCH = 32


@pytest.fixture(scope="module")
def tiny_config(synth_root, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("torchx")
    tree = tiny_config_tree(Path(synth_root).resolve(), folder / "out", batch_size=GLOBAL_BATCH, max_steps=STEPS,
                            checkpoint_every=100)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def single_process_losses(tiny_config, tmp_path_factory) -> list[float]:
    """The reference: one process, no process group, the whole global batch per step (in this process)."""
    from alignlab.config import load_config
    from alignlab.training.trainer import train

    result = train(load_config(tiny_config, []), tmp_path_factory.mktemp("single"))
    return [h["loss"] for h in result.history]


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


@pytest.mark.parametrize("mode", ["global", "local"])
def test_two_processes_follow_single_process_losses(mode, tiny_config, single_process_losses, tmp_path):
    run_dir = tmp_path / f"ddp-{mode}"
    result = launch_train(tiny_config, [f"loss.distributed={mode}"], run_dir, nproc_per_node=2)

    assert result.status.state.name == "SUCCEEDED"
    losses = _losses(run_dir)
    worst = np.max(np.abs(np.subtract(losses, single_process_losses)) / single_process_losses)
    print(f"\nloss.distributed={mode}\n  1 process  : {np.round(single_process_losses, 6).tolist()}"
          f"\n  2 processes: {np.round(losses, 6).tolist()}"
          f"\n  max relative difference: {worst:.2e}")
    np.testing.assert_allclose(losses, single_process_losses, rtol=1e-4)
    # Both ranks really ran: torchrun prefixes each worker's lines with its local rank.
    combined = next((result.spec_dir / "logs").rglob("cli/0/combined.log")).read_text()
    assert "[0]:" in combined and "[1]:" in combined
    request = json.loads((result.spec_dir / "dryrun-local_cwd.json").read_text())
    command = request["role_params"]["cli"][0]["args"][-1]
    assert "--nnodes 1 --nproc_per_node 2" in command
    assert f"-m alignlab.cli train {tiny_config} loss.distributed={mode} --run-dir {run_dir}" in command
    assert (run_dir / "final.pt").is_file()


def test_failed_job_names_its_logs(tiny_config, tmp_path):
    # An invalid PYTHONHASHSEED makes torchrun's interpreter exit at start-up: a real, instant job failure.
    with pytest.raises(RuntimeError) as err:
        launch_train(tiny_config, [], tmp_path / "run", nproc_per_node=1, env={"PYTHONHASHSEED": "not-a-number"})
    message = str(err.value)
    assert "ended FAILED" in message
    assert str(tmp_path / "run" / "torchx" / "logs" / "torchx") in message
    assert "PYTHONHASHSEED" in message.split("(last lines)", 1)[1]


def test_bad_launch_arguments_fail_before_anything_runs(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        launch_train(tiny_config, [], tmp_path / "a", nproc_per_node=3)
    with pytest.raises(ValueError, match="Volcano queue"):
        launch_train(tiny_config, [], tmp_path / "b", nproc_per_node=2, scheduler="kubernetes", dryrun=True)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        launch_train(tmp_path / "missing.yaml", [], tmp_path / "c", nproc_per_node=2)
    with pytest.raises(ValueError, match="key.path=value"):
        launch_train(tiny_config, ["train.lr"], tmp_path / "d", nproc_per_node=2, scheduler="kubernetes",
                     scheduler_cfg={"queue": "q"}, dryrun=True)
    assert not (tmp_path / "a").exists()


def test_kubernetes_dryrun_writes_the_volcano_job(tmp_path):
    image, run_dir = "registry.example.org/alignlab:0.1", "/mnt/runs/clip/seed-0"
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.alignlab:5000", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
    result = launch_train("configs/tiny_synthcaps.yaml", ["train.lr=1e-4"], run_dir, nproc_per_node=4, nnodes=2,
                          scheduler="kubernetes", scheduler_cfg={"queue": "research", "namespace": "alignlab"},
                          dryrun=True, image=image, cpu=16, gpu=4, memMB=64000, env=env, spec_dir=tmp_path)

    assert result.status is None
    job = yaml.safe_load((tmp_path / "volcano-job.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    assert job["spec"]["schedulerName"] == "volcano" and job["spec"]["queue"] == "research"
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["cli-0", "cli-1"] and all(t["replicas"] == 1 for t in tasks)
    app_id = job["metadata"]["name"]
    for i, task in enumerate(tasks):
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == image
        assert container["command"][:2] == ["bash", "-c"]
        rank0 = "${TORCHX_RANK0_HOST:=localhost}" if i == 0 else "${VC_CLI_0_HOSTS:=localhost}"
        assert container["command"][2] == (
            f"torchrun --rdzv_backend c10d --rdzv_endpoint {rank0}:29500 --rdzv_id '{app_id}' --nnodes 2 "
            f"--nproc_per_node 4 --tee 3 --role '' -m alignlab.cli train configs/tiny_synthcaps.yaml "
            f"train.lr=1e-4 --run-dir {run_dir}")
        assert container["resources"]["limits"] == {"cpu": "16000m", "memory": "64000M", "nvidia.com/gpu": "4"}
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
        env_out = {e["name"]: e["value"] for e in container["env"]}
        assert env_out["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]
        assert env_out["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
        assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]
    # The job itself keeps the real value; only the inspection files are redacted.
    real_env = result.handle.request.resource["spec"]["tasks"][0]["template"].spec.containers[0].env
    assert {e.name: e.value for e in real_env}["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"
    for name in ("volcano-job.yaml", "appdef.json", "torchx-run.sh"):
        assert "s3cr3t-value" not in (tmp_path / name).read_text()
    assert json.loads((tmp_path / "appdef.json").read_text())["roles"][0]["num_replicas"] == 2


def test_written_torchx_command_builds_the_same_job(tmp_path):
    """`torchx-run.sh` is the exact CLI equivalent: its dry run yields the same Volcano Job (up to the
    random app id)."""
    result = launch_train("configs/tiny_synthcaps.yaml", ["train.epochs=2"], "/runs/a", nproc_per_node=2,
                          scheduler="kubernetes", scheduler_cfg={"queue": "default", "namespace": "ml"}, dryrun=True,
                          image="img:1", cpu=4, gpu=2, memMB=8000, env={"MLFLOW_TRACKING_URI": "http://m:5000"},
                          mounts=["type=volume,src=alignlab-runs,dst=/runs", "type=bind,src=/data,dst=/data,readonly"],
                          spec_dir=tmp_path)
    command = shlex.split((tmp_path / "torchx-run.sh").read_text().splitlines()[-1])
    assert command[:2] == ["torchx", "run"]
    torchx = str(Path(sys.executable).parent / "torchx")
    out = subprocess.run([torchx, "run", "--dryrun", *command[2:]], capture_output=True, text=True, check=True,
                         cwd=tmp_path, timeout=120).stdout
    cli_job = yaml.safe_load(out.split("=== SCHEDULER REQUEST ===", 1)[1])
    ours = (tmp_path / "volcano-job.yaml").read_text()
    theirs = yaml.safe_dump(cli_job, sort_keys=False)
    ours = re.sub(re.escape(result.handle.request.resource["metadata"]["name"]), "APP", ours)
    theirs = re.sub(re.escape(cli_job["metadata"]["name"]), "APP", theirs)
    assert yaml.safe_load(ours) == yaml.safe_load(theirs)
    pod = yaml.safe_load(ours)["spec"]["tasks"][0]["template"]["spec"]
    assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "alignlab-runs"}} in pod["volumes"]
    assert {"mountPath": "/data", "name": "mount-1", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def test_pipeline_train_step_launches_torchx_and_evaluate_step_finishes_its_mlflow_run(
        tiny_config, single_process_losses, tmp_path, monkeypatch):
    """The KFP train step with 2 processes: it creates the MLflow run, TorchX trains (`--train-only`, rank 0
    logging into that run), and the evaluate step re-attaches, writes results.json and ends the run."""
    from mlflow.tracking import MlflowClient

    from alignlab_components.steps import evaluate_step, train_step

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tree = yaml.safe_load(tiny_config.read_text()) | {"tracking": {"enabled": True, "tracking_uri": uri}}
    run = {"arm": "ddp", "seed": tree["seed"], "run_dir": str(tmp_path / "runs" / "ddp" / "seed-3"),
           "config_json": json.dumps(tree)}
    trained = train_step(run, "torchx-step", launch={"nproc_per_node": 2, "scheduler": "local_cwd"})

    run_dir = Path(run["run_dir"])
    assert (run_dir / "torchx" / "appdef.json").is_file() and trained["steps"] == STEPS
    np.testing.assert_allclose(_losses(run_dir), single_process_losses, rtol=1e-4)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(trained["mlflow_run_id"]).info.status == "RUNNING"  # open until evaluate ends it
    record = evaluate_step(trained)
    mlflow_run = client.get_run(trained["mlflow_run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["alignlab.world_size"] == "2"
    history = [m.value for m in client.get_metric_history(mlflow_run.info.run_id, "loss")]
    np.testing.assert_allclose(history, single_process_losses, rtol=1e-4)
    assert record["metrics"]["final_loss"] == pytest.approx(single_process_losses[-1], rel=1e-4)
    assert json.loads((run_dir / "results.json").read_text()) == record["metrics"]
