"""What the trainer needs of a single-modality task model that carries its own frozen teacher (the thesis'
unimodal distillation and image VQ): the trainer protocol of `TowerPair` without towers to lock, and a state
dict without the teacher (its weights come from its own source, not from every checkpoint)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from alignlab.models.dual_encoder import TowerPair

TEACHER_PREFIX = "teacher."


def block_outputs(model: nn.Module, run, *, include_input: bool = False) -> tuple[object, list[torch.Tensor]]:
    """(what `run()` returns, the outputs of every block in `model.blocks`, in order): per-layer hidden states
    of a timm ViT-like model through forward hooks. include_input adds the first block's input (the
    embedding output) in front."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no transformer blocks (model.blocks): layer-averaged "
                         "targets need a ViT-like model")
    seen: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda _m, _i, out: seen.append(out)) for block in blocks]
    if include_input:
        handles.append(blocks[0].register_forward_pre_hook(lambda _m, args: seen.insert(0, args[0])))
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return result, seen


class FrozenTeacherTask(nn.Module):
    """Base of task models with a frozen `self.teacher`: the teacher stays in eval mode without gradients and
    is left out of `state_dict` (and not expected by `load_state_dict`)."""

    image_tower_locked = False

    def set_image_tower_locked(self, locked: bool) -> None:
        if locked:
            raise ValueError("a unimodal / VQ run trains its whole student: set model.image.mode=train")

    def clamp_logit_scale_(self) -> None:
        """No logit scale here (the trainer calls this after every step)."""

    def no_weight_decay_param_names(self) -> set[str]:
        return TowerPair.no_weight_decay_param_names(self)

    def train(self, mode: bool = True) -> "FrozenTeacherTask":
        super().train(mode)
        self.teacher.eval()
        return self

    def freeze_teacher(self) -> None:
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "") + TEACHER_PREFIX
        return OrderedDict((key, value) for key, value in state.items() if not key.startswith(prefix))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not key.startswith(TEACHER_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"{type(self).__name__}: missing keys {missing[:8]}, unexpected keys "
                               f"{result.unexpected_keys[:8]}")
        return result
