"""Distributed training through TorchX `dist.ddp`: `alignlab train` under torchrun, locally or on Kubernetes.

One AppDef describes the job: a single role that runs

    torchrun --nnodes N --nproc_per_node P ... -m alignlab.cli train CONFIG [key=value ...] --run-dir RUN_DIR

on N replicas (one per node). `local_cwd` runs it as processes of this machine (in the current working
folder, hence absolute paths); `kubernetes` turns it into a Volcano `batch.volcano.sh/v1alpha1` Job with one
task per node (TorchX needs Volcano for gang scheduling). Before anything runs, the AppDef, the scheduler's
request (for kubernetes the Volcano Job, built offline: no cluster is contacted for a dry run) and the
equivalent `torchx run` command are written to `<run_dir>/torchx/` for inspection.

The trainer splits `train.batch_size` across the N x P ranks and DDP averages gradients, so the job follows
the single-process loss trajectory on the same global batch (see alignlab.losses.distributed).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from torchx.components.dist import ddp
from torchx.runner import get_runner
from torchx.specs import AppDef, AppDryRunInfo, AppState, AppStatus

# The cluster image is built in a later issue; until then pass `image=` explicitly for kubernetes.
DEFAULT_IMAGE = "alignlab:latest"
SCHEDULERS = ("local_cwd", "kubernetes")
# Env values whose names match this are written as "<redacted>" to the inspection files (never to the job).
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|_KEY", re.IGNORECASE)


class LaunchResult(NamedTuple):
    """`handle`: the TorchX app handle (e.g. `local_cwd://torchx/<app id>`), or the AppDryRunInfo of a dry
    run; `status`: the final AppStatus (None for a dry run); `spec_dir`: where the AppDef and request are."""

    handle: str | AppDryRunInfo
    status: AppStatus | None
    spec_dir: Path


def build_train_appdef(config_path: str | Path, overrides: list[str], run_dir: str | Path, nproc_per_node: int,
                       nnodes: int = 1, *, image: str = DEFAULT_IMAGE, cpu: int = 2, gpu: int = 0,
                       memMB: int = 4096, env: dict[str, str] | None = None, name: str | None = None,
                       mounts: list[str] | None = None, rdzv_port: int = 29500, max_retries: int = 0,
                       train_args: list[str] | None = None) -> AppDef:
    """The `dist.ddp` AppDef (`-j {nnodes}x{nproc_per_node}`) of `alignlab train CONFIG overrides --run-dir`.

    `cpu`, `gpu`, `memMB` are per node (replica). `config_path` and `run_dir` are paths as the job sees them
    (inside the image for kubernetes). `name` is `{experiment}/{run}` in TorchX's format; default:
    `alignlab/<parent folder>-<run folder>` of run_dir. `mounts` (kubernetes; local_cwd ignores them): TorchX
    mount strings, e.g. `type=volume,src=PVC,dst=/mnt/runs` (a PersistentVolumeClaim) or
    `type=bind,src=/host,dst=/job,readonly`. `train_args`: extra `alignlab train` flags (e.g. `--train-only`,
    `--mlflow-run-id ID`, `--resume`).
    """
    for field, value in (("nproc_per_node", nproc_per_node), ("nnodes", nnodes), ("cpu", cpu), ("memMB", memMB)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field} must be an int >= 1, got {value!r}")
    if not isinstance(gpu, int) or gpu < 0:
        raise ValueError(f"gpu must be an int >= 0, got {gpu!r}")
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ValueError(f"overrides must be key.path=value (e.g. train.lr=1e-4), got {bad}")
    if gpu and nproc_per_node > gpu:
        raise ValueError(f"nproc_per_node={nproc_per_node} exceeds gpu={gpu} per node: one process per GPU")
    run_name = name or _default_name(run_dir)
    args = ["train", str(config_path), *overrides, "--run-dir", str(run_dir), *(train_args or [])]
    # TorchX parses mounts from the comma-split words of its CLI flag.
    mount_words = [word for mount in mounts or [] for word in mount.split(",")] or None
    return ddp(*args, m="alignlab.cli", image=image, name=run_name, cpu=cpu, gpu=gpu, memMB=memMB,
               j=f"{nnodes}x{nproc_per_node}", env=dict(env or {}), mounts=mount_words, rdzv_port=rdzv_port,
               max_retries=max_retries)


def torchx_run_command(scheduler: str, scheduler_cfg: dict[str, str], config_path: str | Path,
                       overrides: list[str], run_dir: str | Path, nproc_per_node: int, nnodes: int = 1, *,
                       image: str = DEFAULT_IMAGE, cpu: int = 2, gpu: int = 0, memMB: int = 4096,
                       env: dict[str, str] | None = None, name: str | None = None,
                       mounts: list[str] | None = None, train_args: list[str] | None = None) -> str:
    """The `torchx run` command line that submits the same job as `launch_train` (env values redacted).

    `--workspace ""` stops the CLI from building a Docker image of the current folder."""
    cfg = ",".join(f"{k}={v}" for k, v in scheduler_cfg.items())
    words = ["torchx", "run", "--workspace", "", "-s", scheduler] + (["-cfg", cfg] if cfg else [])
    words += ["dist.ddp", "-j", f"{nnodes}x{nproc_per_node}", "--image", image, "--cpu", str(cpu),
              "--gpu", str(gpu), "--memMB", str(memMB),
              "--name", name or _default_name(run_dir)]
    if env:
        words += ["--env", ",".join(f"{k}={v}" for k, v in _redacted(env).items())]
    if mounts:
        words += ["--mounts", ",".join(mounts)]
    words += ["-m", "alignlab.cli", "train", str(config_path), *overrides, "--run-dir", str(run_dir),
              *(train_args or [])]
    return shlex.join(words)


def launch_train(config_path: str | Path, overrides: list[str], run_dir: str | Path, nproc_per_node: int,
                 nnodes: int = 1, *, scheduler: str = "local_cwd", scheduler_cfg: dict[str, str] | None = None,
                 dryrun: bool = False, image: str = DEFAULT_IMAGE, cpu: int = 2, gpu: int = 0, memMB: int = 4096,
                 env: dict[str, str] | None = None, name: str | None = None, mounts: list[str] | None = None,
                 spec_dir: str | Path | None = None, wait_interval: float = 1.0,
                 train_args: list[str] | None = None) -> LaunchResult:
    """Write the AppDef and the scheduler's dry-run request to `spec_dir` (default `<run_dir>/torchx`), then,
    unless `dryrun`, submit the job and wait for it.

    scheduler: `local_cwd` (processes here; `scheduler_cfg` may set `log_dir`, default `<spec_dir>/logs`) or
    `kubernetes` (`scheduler_cfg`: `queue` (Volcano queue, required), `namespace`, `service_account`,
    `priority_class`). Raises RuntimeError naming the logs when the job does not succeed.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    cfg = dict(scheduler_cfg or {})
    local = scheduler == "local_cwd"
    env = dict(env or {})
    if local:
        config_path, run_dir = _local_paths(config_path, run_dir, overrides, nproc_per_node * nnodes)
    elif "queue" not in cfg:
        raise ValueError("scheduler_cfg must name the Volcano queue for kubernetes, e.g. {'queue': 'default'}")
    spec_dir = Path(spec_dir) if spec_dir is not None else Path(run_dir) / "torchx"
    spec_dir.mkdir(parents=True, exist_ok=True)
    if local:
        cfg.setdefault("log_dir", str((spec_dir / "logs").resolve()))
    resources = {"image": image, "cpu": cpu, "gpu": gpu, "memMB": memMB, "env": env, "name": name, "mounts": mounts,
                 "train_args": train_args}
    app = build_train_appdef(config_path, overrides, run_dir, nproc_per_node, nnodes, **resources)
    if local:
        # torchrun must be the one beside this interpreter, even when the venv is not activated.
        app.roles[0].env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    command = torchx_run_command(scheduler, cfg, config_path, overrides, run_dir, nproc_per_node, nnodes,
                                 **resources)

    with get_runner() as runner:
        info = runner.dryrun(app, scheduler, cfg=cfg)
        write_launch_spec(spec_dir, app, info, scheduler, command)
        if dryrun:
            return LaunchResult(info, None, spec_dir)
        handle = runner.schedule(info)
        status = runner.wait(handle, wait_interval=wait_interval)
    if status is None or status.state != AppState.SUCCEEDED:
        raise RuntimeError(_failure_message(handle, status, scheduler, cfg))
    return LaunchResult(handle, status, spec_dir)


def write_launch_spec(spec_dir: Path, app: AppDef, info: AppDryRunInfo, scheduler: str, command: str) -> list[Path]:
    """Write `appdef.json`, the request (`volcano-job.yaml` for kubernetes, else `dryrun-<scheduler>.json`)
    and `torchx-run.sh`; environment values with secret-looking names are redacted in these files."""
    appdef = _plain(dataclasses.asdict(app))
    for role in appdef["roles"]:
        role["env"] = _redacted(role["env"])
    written = [spec_dir / "appdef.json", spec_dir / "torchx-run.sh"]
    written[0].write_text(json.dumps(appdef, indent=2) + "\n")
    written[1].write_text(f"#!/usr/bin/env bash\n# equivalent TorchX CLI submission\n{command}\n")
    request = info.request
    if hasattr(request, "resource"):  # KubernetesJob: the Volcano Job manifest, as kubectl would take it
        from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

        job = sanitize_for_serialization(request.resource)
        for task in job["spec"]["tasks"]:
            for container in task["template"]["spec"]["containers"]:
                container["env"] = [{**e, "value": "<redacted>"} if _SECRET_NAME.search(e["name"]) else e
                                    for e in container.get("env", [])]
        path = spec_dir / "volcano-job.yaml"
        path.write_text(yaml.safe_dump(job, sort_keys=False))
    else:
        plain = _plain(dataclasses.asdict(request)) if dataclasses.is_dataclass(request) else {"request": str(info)}
        for params in plain.get("role_params", {}).values():
            for replica in params:
                replica["env"] = _redacted(replica["env"])
        path = spec_dir / f"dryrun-{scheduler}.json"
        path.write_text(json.dumps(plain, indent=2) + "\n")
    return written + [path]


def _local_paths(config_path, run_dir, overrides: list[str], world_size: int) -> tuple[Path, Path]:
    """Absolute paths (local_cwd runs in the current folder) and an early check of the config."""
    from alignlab.config import load_config

    config_path, run_dir = Path(config_path).resolve(), Path(run_dir).resolve()
    if not config_path.is_file():
        raise FileNotFoundError(f"config {config_path} does not exist; pass the path of a config YAML")
    cfg = load_config(config_path, overrides)  # a bad field fails here, before processes start
    if cfg.train.batch_size % world_size:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the {world_size} "
                         f"processes (nnodes x nproc_per_node): each rank takes an equal slice")
    return config_path, run_dir


def _failure_message(handle: str, status: AppStatus | None, scheduler: str, cfg: dict) -> str:
    state = status.state.name if status is not None else "UNKNOWN (the scheduler no longer knows the app)"
    if scheduler == "local_cwd":
        app_id = handle.rsplit("/", 1)[-1]
        logs = Path(cfg["log_dir"]) / "torchx" / app_id
        tails = [f"--- {p} (last lines)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                 for p in sorted(logs.glob("*/*/stderr.log")) if p.stat().st_size]
        where = f"logs per replica in {logs}/<role>/<replica>/{{stdout,stderr}}.log"
        return f"TorchX job {handle} ended {state}; {where}\n" + "\n".join(tails)
    return (f"TorchX job {handle} ended {state}; read its logs with `torchx log {handle}` "
            f"(or `kubectl logs -n {cfg.get('namespace', 'default')} -l app.kubernetes.io/instance=...`)")


def _redacted(env: dict[str, str]) -> dict[str, str]:
    return {k: ("<redacted>" if _SECRET_NAME.search(k) else v) for k, v in env.items()}


def _plain(value: Any) -> Any:
    """JSON-ready copy: enums by name, other unknown objects as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _default_name(run_dir: str | Path) -> str:
    """`alignlab/<arm>-<seed folder>`: TorchX's {experiment}/{run} from the run folder's last two parts."""
    path = Path(run_dir)
    return f"alignlab/{_k8s_name(f'{path.parent.name}-{path.name}')}"


def _k8s_name(text: str) -> str:
    """A Kubernetes-safe job name from a folder name (lower-case alphanumerics and '-')."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40] or "train"
