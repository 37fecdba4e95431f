"""A trained run's model back from its checkpoint: the config stored in the checkpoint rebuilds tokenizer and
model (as training built them), then the weights load. Used by `alignlab evaluate` and the CLIP-score filter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignlab.config import ExperimentConfig, apply_overrides, validate_config
from alignlab.training import builders, task_builders
from alignlab.data.roots import resolve_data_root
from alignlab.training.checkpoint import load_checkpoint
from alignlab.training.errors import CheckpointError


def load_run_model(checkpoint: str | Path, *, overrides: dict[str, Any] | None = None
                   ) -> tuple[ExperimentConfig, Any, Any]:
    """(config, model on the CPU, tokenizer) of a run's final.pt or checkpoints/step-*.pt. `overrides`
    (dotted keys, e.g. {"data.root": ...}) change the stored config before anything is built."""
    path = Path(checkpoint)
    state = load_checkpoint(path)  # weights-only: a checkpoint from elsewhere cannot run code
    if not isinstance(state, dict) or not {"config", "model"} <= state.keys():
        raise CheckpointError(f"{path} holds no alignlab model and config: give a run's final.pt or "
                              f"checkpoints/step-*.pt")
    cfg = validate_config(apply_overrides(state["config"], overrides or {}), source=f"config stored in {path}")
    tokenizer = builders.tokenizer_from_config(cfg.model, cfg.data, resolve_data_root(cfg.data))
    model = task_builders.task_model_from_config(cfg) or builders.model_from_config(cfg.model, tokenizer)
    model.load_state_dict(state["model"])
    return cfg, model, tokenizer
