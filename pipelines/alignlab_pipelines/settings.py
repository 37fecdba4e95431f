"""Per-pipeline cluster settings: image, resources, scheduling, volumes, secrets, retries and caching.

They are compile-time settings of the KFP pipeline (`alignlab compile --settings pipeline.yaml`). kfp's local
runner ignores all of them except the image name (see `alignlab_pipelines.local`), so the same definition runs
on a laptop and on a cluster. Which step gets what:

  every step           image, pvc (mounted at workdir), env, secrets
  train and evaluate   gpus / gpu_type, cpu / memory (requests and limits), node_selector, tolerations,
                       shm_size (a memory-backed /dev/shm for DataLoader workers), retries
  train (distributed)  nproc_per_node x nnodes > 1: the train step launches TorchX dist.ddp on
                       torchx_scheduler (kubernetes: Volcano queue torchx_queue, the PVC mounted at workdir)
  prepare steps        the spec's `prepare:` tasks: data-like steps as prepare-data; a `train` prepare step
                       gets train's compute settings
  caching              prepare-data: cache_data (deterministic: same config -> same dataset);
                       train and evaluate: cache_training (off: a re-submitted run trains again);
                       report: off (it reads what the runs wrote)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignlab.config import ConfigError

_CPU = r"^[0-9]+(\.[0-9]+)?m?$"
_BYTES = r"^[0-9]+(\.[0-9]+)?(E|P|T|G|M|K|Ei|Pi|Ti|Gi|Mi|Ki)?$"
_DURATION = r"^[0-9]+(\.[0-9]+)?s$"


class Toleration(BaseModel):
    """A Kubernetes toleration (e.g. for a tainted GPU node pool)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoExecute", "NoSchedule", "PreferNoSchedule"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class SecretEnv(BaseModel):
    """Environment variables from one Kubernetes Secret: {secret data key: variable name}."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    secret: str = Field(min_length=1, description="Name of the Secret in the pipeline's namespace.")
    env: dict[str, str] = Field(min_length=1, description="e.g. {AWS_ACCESS_KEY_ID: AWS_ACCESS_KEY_ID}")


class PipelineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: str = Field("alignlab:latest", min_length=1, description="Image with alignlab[orchestration] installed.")
    gpus: int = Field(0, ge=0, description="GPUs per train / evaluate step (0: CPU only).")
    gpu_type: str = Field("nvidia.com/gpu", min_length=1, description="Accelerator resource name.")
    cpu: str | None = Field("4", pattern=_CPU, description="CPU request of train / evaluate (e.g. 4, 500m).")
    memory: str | None = Field("16Gi", pattern=_BYTES, description="Memory request of train / evaluate.")
    cpu_limit: str | None = Field(None, pattern=_CPU)
    memory_limit: str | None = Field(None, pattern=_BYTES)
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels for train / evaluate.")
    tolerations: list[Toleration] = Field(default_factory=list)
    shm_size: str | None = Field("8Gi", pattern=_BYTES, description="Memory-backed /dev/shm size; None: none.")
    secrets: list[SecretEnv] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="Plain variables, e.g. MLFLOW_TRACKING_URI.")
    pvc: str | None = Field("alignlab-workspace", description="PersistentVolumeClaim shared by all steps.")
    workdir: str = Field("/workspace", description="Where the steps work (the PVC's mount path on a cluster).")
    retries: int = Field(2, ge=0, description="Retries of train and evaluate (train resumes its checkpoints).")
    retry_backoff: str = Field("60s", pattern=_DURATION)
    parallelism: int = Field(0, ge=0, description="Runs at the same time on a cluster (0: no limit).")
    nproc_per_node: int = Field(1, ge=1, description="Training processes per node (one per GPU); > 1 in all "
                                "launches a TorchX dist.ddp job from the train step.")
    nnodes: int = Field(1, ge=1, description="Nodes of the TorchX training job.")
    torchx_scheduler: Literal["kubernetes", "local_cwd"] = Field(
        "kubernetes", description="kubernetes: a Volcano job beside the pipeline; local_cwd: processes in the step.")
    torchx_queue: str = Field("default", min_length=1, description="Volcano queue of the TorchX job.")
    cache_data: bool = True
    cache_training: bool = False


def load_settings(path: str | Path | None = None, **overrides) -> PipelineSettings:
    """Settings from a YAML file (or the defaults), then `overrides` whose value is not None (CLI flags)."""
    tree = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"pipeline settings file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of pipeline settings, got {type(tree).__name__}")
    tree |= {key: value for key, value in overrides.items() if value is not None}
    try:
        return PipelineSettings.model_validate(tree)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid pipeline settings{f' in {path}' if path else ''}:\n" + "\n".join(lines)) from None
