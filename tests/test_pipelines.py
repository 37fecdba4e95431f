"""KFP components and the ablation pipeline: the steps against the inline runner, the compiled IR of every
shipped spec (tasks, dependencies, loop items, resources, retries, caching, kubernetes platform spec), the
CLI and submission through a stand-in client, and a two-arm spec end to end on kfp's local runner."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from conftest import SMALL_SYNTH, tiny_config_tree

from alignlab.ablation import load_spec
from alignlab.config import ConfigError, config_to_dict, validate_config
from alignlab.data.roots import resolve_data_root

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SPECS = sorted((REPO / "ablations").glob("*.yaml"))
SMALL_EVAL = {"enabled": True, "batch_size": 64, "zeroshot_tasks": ["shape"], "linear_probe_task": None,
              "shifts": [], "histogram": False}
CLUSTER = {"image": "registry.example/alignlab:1.2", "gpus": 2, "gpu_type": "nvidia.com/gpu", "cpu": "6",
           "memory": "24Gi", "node_selector": {"pool": "a100"},
           "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
           "shm_size": "4Gi", "secrets": [{"secret": "s3-creds", "env": {"key": "AWS_ACCESS_KEY_ID"}}],
           "env": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, "pvc": "work", "workdir": "/work",
           "retries": 3, "retry_backoff": "30s", "nproc_per_node": 2, "torchx_queue": "gpu-queue"}


def _ir(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes executors of the platform spec) of a compiled pipeline YAML."""
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 2, "expected the pipeline spec and the kubernetes platform spec"
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _executor(ir: dict, task: dict) -> str:
    return ir["components"][task["componentRef"]["name"]]["executorLabel"]


def _loop(ir: dict) -> tuple[dict, dict]:
    """(for-loop task in the `runs` sub-pipeline, the loop body's tasks)."""
    runs = ir["components"][ir["root"]["dag"]["tasks"]["runs"]["componentRef"]["name"]]["dag"]["tasks"]
    assert len(runs) == 1
    loop = next(iter(runs.values()))
    return loop, ir["components"][loop["componentRef"]["name"]]["dag"]["tasks"]


@pytest.mark.parametrize("spec_path", SHIPPED_SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_compiles_to_the_expected_ir(spec_path, tmp_path):
    from kfp.client.client import _extract_pipeline_yaml
    from kfp.components import load_component_from_file

    from alignlab_pipelines.compile import compile_spec
    from alignlab_pipelines.settings import PipelineSettings

    settings = PipelineSettings(**CLUSTER)
    out = compile_spec(spec_path, tmp_path / "pipeline.yaml", settings)
    _extract_pipeline_yaml(str(out))  # what `kfp run create -f` parses (strict protobuf parsing of both documents)
    ir, k8s = _ir(out)
    spec, plans = load_spec(spec_path)
    expected_name = "alignlab-" + spec.name.lower().replace("_", "-").replace(".", "-")
    assert load_component_from_file(str(out)).name == ir["pipelineInfo"]["name"] == expected_name
    root = ir["root"]["dag"]["tasks"]
    assert set(ir["root"]["inputDefinitions"]["parameters"]) == {"workdir", "resume"}
    assert ir["root"]["inputDefinitions"]["parameters"]["workdir"]["defaultValue"] == "/work"

    # shared data: one task per distinct dataset (and the base config's, read by prepare steps through
    # {data_root}), cached, first in the graph
    data = {name: task for name, task in root.items() if name.startswith("prepare-data")}
    roots = {str(resolve_data_root(p.config.data)) for p in plans}
    if spec.prepare_data_config is not None:
        roots.add(str(resolve_data_root(spec.prepare_data_config.data)))
    assert len(data) == len(roots)
    assert {resolve_data_root(validate_config(json.loads(t["inputs"]["parameters"]["config_json"]["runtimeValue"]
                                                          ["constant"])).data).as_posix()
            for t in data.values()} == {Path(r).as_posix() for r in roots}
    assert all(t["cachingOptions"] == {"enableCache": True} and "dependentTasks" not in t for t in data.values())
    # data -> prepare steps in the listed order (cat, diht) -> runs (train -> evaluate per arm x seed) -> report
    # (-> gate, for specs with a gate: nightly)
    prepare = [name for name in root if re.fullmatch(r"prepare(-\d+)?", name)]
    assert sorted(prepare) == sorted(["prepare"] + [f"prepare-{i}" for i in range(2, len(spec.prepare) + 1)]
                                     if spec.prepare else [])
    prepare.sort(key=lambda name: int(root[name]["taskInfo"]["name"].split()[1]))
    assert [root[name]["taskInfo"]["name"] for name in prepare] == \
        [f"prepare {i} {entry.kind}" for i, entry in enumerate(spec.prepare, 1)]
    for i, name in enumerate(prepare):
        assert sorted(root[name]["dependentTasks"]) == (sorted(data) if i == 0 else [prepare[i - 1]])
        assert json.loads(root[name]["inputs"]["parameters"]["step_json"]["runtimeValue"]["constant"]) == \
            spec.prepare[i].to_dict()
    assert set(root) == set(data) | set(prepare) | {"open-tracking", "runs", "report", "close-tracking"} | \
        ({"gate"} if spec.gate else set())
    assert root["runs"]["inputs"]["parameters"]["parent_run_id"]["taskOutputParameter"] == \
        {"outputParameterKey": "Output", "producerTask": "open-tracking"}
    assert sorted(root["close-tracking"]["dependentTasks"]) == ["open-tracking", "report"]
    if spec.gate:
        gate = root["gate"]
        assert gate["dependentTasks"] == ["report", "runs"] and gate["cachingOptions"] == {}
        assert gate["inputs"]["parameters"]["rules_yaml"]["runtimeValue"]["constant"] == \
            Path(spec.gate.rules).read_text()  # embedded: the compiling machine's path means nothing in a pod
    assert sorted(root["runs"]["dependentTasks"]) == sorted([*data, *prepare[-1:], "open-tracking"])
    assert root["report"]["dependentTasks"] == ["runs"] and root["report"]["cachingOptions"] == {}
    report_in = root["report"]["inputs"]["parameters"]
    assert report_in["results"]["taskOutputParameter"] == {"outputParameterKey": "Output", "producerTask": "runs"}
    assert json.loads(report_in["spec_json"]["runtimeValue"]["constant"]) == spec.model_dump(mode="json")

    loop, body = _loop(ir)
    items = json.loads(loop["parameterIterator"]["items"]["raw"])
    assert [(i["arm"], i["seed"]) for i in items] == [(a, s) for a in spec.arm_overrides() for s in spec.seeds]
    assert [(i["run_dir"], json.loads(i["config_json"])) for i in items] == \
        [(str(p.run_dir), config_to_dict(p.config)) for p in plans]
    assert set(body) == {"train", "evaluate"}
    assert body["train"]["inputs"]["parameters"]["pipeline_run_id"]["runtimeValue"]["constant"] == \
        "{{$.pipeline_job_uuid}}"  # a retry of train resumes the checkpoints of its own pipeline run
    launch = json.loads(body["train"]["inputs"]["parameters"]["launch_json"]["runtimeValue"]["constant"])
    assert launch == {"nproc_per_node": 2, "nnodes": 1, "scheduler": "kubernetes", "image": "registry.example/alignlab:1.2",
                      "gpu": 2, "scheduler_cfg": {"queue": "gpu-queue"}, "mounts": ["type=volume,src=work,dst=/work"]}
    assert body["evaluate"]["dependentTasks"] == ["train"]
    assert body["evaluate"]["inputs"]["parameters"]["trained"]["taskOutputParameter"]["producerTask"] == "train"
    for name in ("train", "evaluate"):
        task = body[name]
        assert task["cachingOptions"] == {}  # training is not cached unless asked
        assert task["retryPolicy"]["maxRetryCount"] == 3 and task["retryPolicy"]["backoffDuration"] == "30s"
        resources = ir["deploymentSpec"]["executors"][_executor(ir, task)]["container"]["resources"]
        assert resources["accelerator"]["resourceCount"] == "2"
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["resourceCpuRequest"] == "6" and resources["resourceMemoryRequest"] == "24Gi"
        pod = k8s[_executor(ir, task)]
        assert pod["nodeSelector"] == {"labels": {"pool": "a100"}}
        assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "4Gi",
                                          "volumeName": "dshm"}]
    plain = ["report", "open-tracking", "close-tracking"] + (["gate"] if spec.gate else [])
    plain += [name for name, entry in zip(prepare, spec.prepare) if entry.kind != "train"]
    for name, entry in zip(prepare, spec.prepare):  # data steps cached like prepare-data; train like train
        assert root[name]["cachingOptions"] == ({} if entry.kind == "train" else {"enableCache": True})
        if entry.kind == "train":
            assert root[name]["retryPolicy"]["maxRetryCount"] == 3
    for name, task in [*data.items(), *((n, root[n]) for n in plain)]:
        assert "retryPolicy" not in task
        executor = ir["deploymentSpec"]["executors"][_executor(ir, task)]["container"]
        assert "accelerator" not in executor.get("resources", {})
        assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(k8s[_executor(ir, task)])
    for label, executor in ir["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == "registry.example/alignlab:1.2"
        assert not any("pip install" in part for part in container["command"])  # the image has everything
        assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in container["env"]
        assert k8s[label]["pvcMount"][0]["mountPath"] == "/work"
        assert k8s[label]["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "work"
        assert k8s[label]["secretAsEnv"][0]["keyToEnv"] == [{"envVar": "AWS_ACCESS_KEY_ID", "secretKey": "key"}]


def _write_spec(folder: Path, tracking_uri: str | None = None) -> Path:
    """A two-arm x one-seed spec on a tiny SynthCaps dataset and a tiny model, with relative paths."""
    base = tiny_config_tree("data", "runs")
    base["data"]["synth"] = dict(SMALL_SYNTH)
    base["eval"] = dict(SMALL_EVAL)
    base["tracking"] = {"enabled": tracking_uri is not None, "tracking_uri": tracking_uri}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "two-arms", "base": "base.yaml", "arms": {"fast": {"train.lr": 2e-3}, "slow": {"train.lr": 1e-4}},
            "seeds": [0], "baseline": "fast", "report_metrics": ["retrieval/mean_R@1", "final_loss"]}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


def test_defaults_run_on_cpu_cache_data_only_and_settings_are_validated(tmp_path):
    from alignlab_pipelines.compile import compile_spec
    from alignlab_pipelines.settings import PipelineSettings, load_settings

    spec = _write_spec(tmp_path)
    ir, k8s = _ir(compile_spec(spec, tmp_path / "p.yaml"))
    _, body = _loop(ir)
    train = ir["deploymentSpec"]["executors"][_executor(ir, body["train"])]["container"]
    assert train["image"] == "alignlab:latest" and "accelerator" not in train["resources"]
    assert k8s[_executor(ir, body["train"])]["emptyDirMounts"][0]["medium"] == "Memory"
    ir, _ = _ir(compile_spec(spec, tmp_path / "q.yaml", PipelineSettings(cache_training=True, retries=0)))
    _, body = _loop(ir)
    assert body["train"]["cachingOptions"] == {"enableCache": True} and "retryPolicy" not in body["train"]

    (tmp_path / "settings.yaml").write_text("gpus: 1\nmemory: lots\ncolour: red\n")
    with pytest.raises(ConfigError, match=r"(?s)memory: String should match.*colour: Extra inputs"):
        load_settings(tmp_path / "settings.yaml")
    assert load_settings(None, gpus=4, image=None).gpus == 4
    with pytest.raises(ValueError, match="must end in .yaml"):
        compile_spec(spec, tmp_path / "p.json")


def test_cli_compile_and_submit_through_a_stand_in_client(tmp_path, monkeypatch):
    """`kfp.Client` cannot be reached here (no KFP API server): a stand-in records what submit sends."""
    import kfp
    from kfp.client.client import _extract_pipeline_yaml

    from alignlab_pipelines.cli import register

    spec = _write_spec(tmp_path)
    parser = argparse.ArgumentParser(prog="alignlab")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compile", str(spec), "train.epochs=2", "-o", str(tmp_path / "p.yaml"), "--gpus", "1",
                              "--gpu-type", "nvidia.com/mig-1g.10gb", "--image", "me/alignlab:dev"])
    assert args.func(args) == 0
    ir, _ = _ir(tmp_path / "p.yaml")
    loop, body = _loop(ir)
    train = ir["deploymentSpec"]["executors"][_executor(ir, body["train"])]["container"]
    assert train["resources"]["accelerator"]["resourceCount"] == "1"
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/mig-1g.10gb"
    assert train["image"] == "me/alignlab:dev"
    items = json.loads(loop["parameterIterator"]["items"]["raw"])
    assert {json.loads(i["config_json"])["train"]["epochs"] for i in items} == {2}

    calls = []

    class StandInClient:
        def __init__(self, host):
            calls.append({"host": host})

        def create_run_from_pipeline_package(self, pipeline_file, arguments=None, run_name=None,
                                             experiment_name=None, **unused):
            package = _extract_pipeline_yaml(pipeline_file)  # the file exists and parses while submitting
            calls[-1] |= {"pipeline": package.pipeline_spec.pipeline_info.name, "arguments": arguments,
                          "run_name": run_name, "experiment": experiment_name}
            return type("Result", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", StandInClient)
    args = parser.parse_args(["submit", str(spec), "--host", "http://kfp:8080", "--experiment", "nightly",
                              "--workdir", "/mnt/w", "--resume"])
    assert args.func(args) == 0
    assert calls == [{"host": "http://kfp:8080", "pipeline": "alignlab-two-arms", "run_name": "two-arms",
                      "experiment": "nightly", "arguments": {"resume": True, "workdir": "/mnt/w"}}]

    from alignlab_pipelines.compile import submit_spec

    result = submit_spec(spec, "http://other", client=StandInClient("given"))
    assert result.run_id == "run-123" and calls[-1]["experiment"] == "two-arms" and calls[-1]["arguments"] == {}


def test_train_and_evaluate_steps_reproduce_the_inline_run(synth_root, tmp_path, capsys):
    """Split at the checkpoint and passed through JSON (as between two processes), the steps give the same
    results.json as `run_experiment`; with resume, a finished run is kept, not trained again; a retry in the
    same pipeline run resumes from the checkpoints, a new pipeline run starts over."""
    from alignlab.experiment import run_experiment
    from alignlab_components.steps import evaluate_step, train_step

    tree = tiny_config_tree(synth_root, tmp_path / "runs")
    tree["eval"] = dict(SMALL_EVAL)
    cfg = validate_config(tree)
    inline = run_experiment(cfg, tmp_path / "inline", ablation="t", arm="a")
    run = {"arm": "a", "seed": cfg.seed, "run_dir": str(tmp_path / "steps"),
           "config_json": json.dumps(config_to_dict(cfg))}
    trained = json.loads(json.dumps(train_step(run, "t", pipeline_run_id="run-1")))
    record = json.loads(json.dumps(evaluate_step(trained)))
    assert record["arm"] == "a" and record["seed"] == cfg.seed
    assert json.loads((tmp_path / "steps" / "results.json").read_text()) == record["metrics"]
    assert set(record["metrics"]) == set(inline) and "retrieval/mean_R@1" in inline
    timing = {k for k in inline if "step_time" in k or "time/" in k or k == "train_seconds"}
    for key in set(inline) - timing:
        assert math.isclose(record["metrics"][key], inline[key], rel_tol=1e-5, abs_tol=1e-6), key

    final = tmp_path / "steps" / "final.pt"
    stamp = final.stat().st_mtime_ns
    again = train_step(run, "t", resume=True)
    assert again["finished"] and evaluate_step(again)["metrics"] == record["metrics"]
    assert final.stat().st_mtime_ns == stamp
    capsys.readouterr()
    retry = train_step(run, "t", pipeline_run_id="run-1")
    assert "resumed from" in capsys.readouterr().out and retry["steps"] == trained["steps"]
    assert retry["train_metrics"]["final_loss"] == trained["train_metrics"]["final_loss"]
    train_step(run, "t", pipeline_run_id="run-2")
    assert "resumed from" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="missing.*config_json"):
        train_step({"arm": "a", "seed": 0, "run_dir": "x"}, "t")


@pytest.mark.slow
def test_two_arm_spec_end_to_end_on_the_kfp_local_runner(tmp_path, monkeypatch, capsys):
    """`alignlab run` on kfp's local runner: the runs, the report and MLflow; on the terminal one line per
    task and the report table (the executors' output is in runs/<ablation>/logs/)."""
    from alignlab.cli import main
    from alignlab.tracking import find_runs
    from alignlab_pipelines.local import planned_task_labels

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(_write_spec(tmp_path, tracking_uri=uri)), "train.max_steps=4"]) == 0
    out = Path("runs/two-arms")
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert len(lines) < 40, printed
    labels = planned_task_labels(*load_spec(tmp_path / "spec.yaml", ["train.max_steps=4"]))
    assert len(labels) == 8 and "train slow/seed-0" in labels and "evaluate fast/seed-0" in labels
    for label in labels:  # exactly one done line per task, and its log
        assert sum(re.search(rf"\] done +{re.escape(label)} +([\d.]+ s|\d+m\d\ds)$", line) is not None
                   for line in lines) == 1
        assert (out / "logs" / f"{label.replace(' ', '-').replace('/', '-')}.log").stat().st_size > 0
    assert "KFP Executor" not in printed and "executor_input" not in printed and "parameterValues" not in printed
    assert "KFP Executor" in (out / "logs" / "train-fast-seed-0.log").read_text()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| metric") and len(table) == 1 + 2 * 2  # header, 2 metrics x 2 arms ("|---" rule)
    assert any("| fast (baseline)" in line for line in table) and "**Preliminary**" in printed
    # the store is mlflow.db in the working folder: the command names it as such
    assert lines[-1].strip().startswith("MLflow")
    assert lines[-1].endswith("mlflow ui --backend-store-uri sqlite:///mlflow.db")
    report = json.loads((tmp_path / out / "report.json").read_text())
    assert report["arms"] == ["fast", "slow"] and report["baseline"] == "fast"
    assert (tmp_path / out / "report.md").read_text().count("|") > 0
    pipeline_runs = set()
    for arm in ("fast", "slow"):
        run_dir = tmp_path / out / arm / "seed-0"
        pipeline_runs.add((run_dir / "pipeline-run.txt").read_text())
        results = json.loads((run_dir / "results.json").read_text())
        assert "retrieval/mean_R@1" in results and "zeroshot/shape/top1" in results
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4 and (run_dir / "final.pt").is_file()
    assert len(pipeline_runs) == 1 and "{{" not in pipeline_runs.pop()  # kfp filled in its run id
    runs = find_runs(uri, "two-arms")
    parent = [r for r in runs if r["tags"].get("alignlab.pipeline") == "two-arms"]
    assert len(parent) == 1 and parent[0]["status"] == "FINISHED"  # the pipeline run's parent, closed at the end
    runs = [r for r in runs if r not in parent]
    assert sorted(r["run_name"] for r in runs) == ["fast/seed-0", "slow/seed-0"]
    assert all(r["status"] == "FINISHED" and "retrieval/mean_R@1" in r["metrics"] for r in runs)
    assert all(r["tags"]["mlflow.parentRunId"] == parent[0]["run_id"] for r in runs)  # nested under it


def test_thesis_ddp_arms_set_their_own_ranks():
    """`ablations/thesis_ddp.yaml`: each arm carries its number of ranks in its config (the loop item), at
    the same per-rank batch; the train step launches that many in place of the settings' nproc_per_node."""
    from alignlab_components.steps import launch_for_run

    spec, plans = load_spec(REPO / "ablations" / "thesis_ddp.yaml")
    by_arm = {p.arm: p.config.train for p in plans}
    assert {arm: (t.ranks, t.batch_size // t.ranks) for arm, t in by_arm.items()} == \
        {"1-rank": (1, 128), "2-ranks": (2, 128)}
    cluster = {"nproc_per_node": 2, "nnodes": 1, "scheduler": "kubernetes"}
    one, two = (next(p.config for p in plans if p.arm == arm) for arm in ("1-rank", "2-ranks"))
    assert launch_for_run(one, cluster, "1-rank") == cluster | {"nproc_per_node": 1}
    assert launch_for_run(two, cluster | {"nproc_per_node": 8}, "2-ranks") == cluster
    assert launch_for_run(two, cluster | {"nnodes": 2}, "2-ranks")["nproc_per_node"] == 1
    three = two.model_copy(update={"train": two.train.model_copy(update={"ranks": 3, "batch_size": 384})})
    with pytest.raises(ValueError, match="arm '2-ranks': train.ranks=3 does not split evenly over .*nnodes=2"):
        launch_for_run(three, cluster | {"nnodes": 2}, "2-ranks")
    with pytest.raises(ConfigError, match="train: .*batch_size=129 is the global batch, split evenly over ranks=2"):
        validate_config(tiny_config_tree("data", "runs", ranks=2, batch_size=129))
    from alignlab.training.trainer import train

    with pytest.raises(ConfigError, match="train.ranks=2 but this run has 1 process.*torchrun --nproc_per_node 2"):
        train(validate_config(tiny_config_tree("data", "runs", ranks=2)), "runs/x")  # refused before any work


@pytest.mark.slow
def test_a_two_rank_arm_runs_two_ranks_on_the_kfp_local_runner(tmp_path, monkeypatch, capsys):
    """The 2-rank arm of `ablations/thesis_ddp.yaml` (at test size) through `alignlab run`: it trains as a TorchX
    job of two processes (both ranks log, MLflow records world size 2, device hours count both ranks); the
    inline runner refuses the spec before any work. (The 1-rank arm trains in the step's process, as every
    other spec's runs: `launch_for_run` above.)"""
    from alignlab.cli import main
    from alignlab.tracking import find_runs

    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((REPO / "ablations" / "thesis_ddp.yaml").read_text())
    base = tiny_config_tree("data", "runs", max_steps=2, checkpoint_every=100)
    base["data"]["synth"] = dict(SMALL_SYNTH)
    base["eval"] = dict(SMALL_EVAL)
    base["tracking"] = {"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    arm = shipped["arms"]["2-ranks"] | {"train.batch_size": 32}  # 16 per rank
    spec = {"name": "ddp", "base": "base.yaml", "arms": {"2-ranks": arm}, "seeds": [0],
            "report_metrics": ["retrieval/mean_R@1"]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))

    assert main(["run", "spec.yaml", "--runner", "inline"]) == 2  # the CLI's one line for a config error
    assert re.search(r"runs \['2-ranks/seed-0'\] set train.ranks > 1.*--runner kfp-local", capsys.readouterr().err)
    assert not Path("runs").exists()
    assert main(["run", "spec.yaml"]) == 0
    runs = [r for r in find_runs(base["tracking"]["tracking_uri"], "ddp") if "alignlab.arm" in r["tags"]]
    assert [(r["run_name"], r["status"], r["tags"]["alignlab.world_size"]) for r in runs] == \
        [("2-ranks/seed-0", "FINISHED", "2")]
    run_dir = Path("runs/ddp/2-ranks/seed-0")
    logs = "".join(p.read_text() for p in (run_dir / "torchx" / "logs").rglob("stderr.log"))
    assert re.search(r"^\[?0\]?:", logs, re.M) and re.search(r"^\[?1\]?:", logs, re.M)  # torchrun's rank prefixes
    results = json.loads((run_dir / "results.json").read_text())
    assert results["time/device_hours"] == pytest.approx(2 * results["train_seconds"] / 3600, rel=0.05)
