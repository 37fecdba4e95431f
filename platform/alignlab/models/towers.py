"""Image and text towers built from existing libraries (docs/methods.md "CLIP": the dual encoder; "S-SMKE": the BERT
text tower).

`ImageTower` wraps any timm model as a pooled-feature extractor; `HFTextTower` wraps a Hugging Face
transformers encoder (e.g. BERT). Both expose `num_features` and `set_grad_checkpointing` so that
`DualEncoder` treats them like the in-house `TextTransformer`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from alignlab.models import data2vec2  # noqa: F401  (registers data2vec2_vit_base_patch16 with timm)

TEXT_POOLS = ("first", "mean")
LAYER_SELECTIONS = ("first", "every_other")


def kept_layers(total: int, keep: int, selection: str) -> list[int]:
    """Indices of the `keep` layers of a `total`-layer model a student starts from (the thesis, section
    3.1.1.1: the first k, or every second one, i.e. layers 2, 4, ... counted from 1)."""
    if selection not in LAYER_SELECTIONS:
        raise ValueError(f"layer selection {selection!r} is not one of {LAYER_SELECTIONS}")
    wanted = list(range(keep)) if selection == "first" else list(range(1, 2 * keep, 2))
    if not 1 <= keep or wanted[-1] >= total:
        raise ValueError(f"cannot keep {keep} layers ({selection}) of a {total}-layer checkpoint")
    return wanted


def select_blocks(state_dict: dict, keep: list[int], prefix: str = "blocks.") -> dict:
    """A checkpoint with only blocks `keep` (renumbered 0, 1, ...) and every non-block entry."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) in keep:
                out[f"{prefix}{keep.index(int(index))}.{rest}"] = value
        else:
            out[key] = value
    return out


class ImageTower(nn.Module):
    """`timm.create_model(name, num_classes=0, **kwargs)`: images [B, 3, H, W] -> pooled features [B, F].

    pretrained: False (random init), True (timm's default weights from the hub; needs network), or the
    path of a local checkpoint (a state dict, or a dict holding one under "state_dict"/"model"). A local
    checkpoint goes through timm's own filter for the architecture (e.g. ViT position embeddings are
    resampled to `img_size`), its classifier head is dropped, and every other key must match exactly.
    """

    def __init__(self, name: str, pretrained: bool | str | os.PathLike = False, blocks: int | None = None,
                 block_selection: str = "first", **kwargs: Any):
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(
                f"image tower name={name!r} is not a timm model; list candidates with timm.list_models('*vit*')"
            )
        local_path = None if isinstance(pretrained, bool) else Path(pretrained)
        if blocks is not None and pretrained is True:
            raise ValueError("image tower blocks=N starts from a local checkpoint's blocks: give its path as "
                             "pretrained (hub weights are not downloaded at run time)")
        if blocks is not None:
            kwargs = {**kwargs, "depth": blocks}
        self.model = timm.create_model(name, pretrained=pretrained is True, num_classes=0, **kwargs)
        if local_path is not None:
            load_timm_checkpoint(self.model, local_path, blocks=blocks, block_selection=block_selection)

    @property
    def num_features(self) -> int:
        """Width of the pooled output: timm's `head_hidden_size` where a model has a pre-logits stage after
        pooling (MobileNetV3, some ConvNeXts), else `num_features`."""
        return getattr(self.model, "head_hidden_size", None) or self.model.num_features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def load_timm_checkpoint(model: nn.Module, path: Path, blocks: int | None = None,
                         block_selection: str = "first") -> None:
    """Load a local checkpoint into a headless timm model; raise ValueError naming any key mismatch.
    With `blocks`, only the first (or every other) `blocks` of the checkpoint's transformer blocks are kept."""
    if not path.is_file():
        raise FileNotFoundError(f"image tower checkpoint {path} does not exist; pass pretrained=False or a file")
    state_dict = timm.models.load_state_dict(str(path))
    if blocks is not None:
        total = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
        state_dict = select_blocks(state_dict, kept_layers(total, blocks, block_selection))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    classifiers = model.pretrained_cfg.get("classifier") or ()
    for classifier in (classifiers,) if isinstance(classifiers, str) else classifiers:
        state_dict.pop(f"{classifier}.weight", None)
        state_dict.pop(f"{classifier}.bias", None)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(
            f"checkpoint {path} does not fit the image tower (was it saved with the same name and kwargs?): {error}"
        ) from error
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not match the image tower: missing keys {result.missing_keys[:8]}, "
            f"unexpected keys {result.unexpected_keys[:8]}; save it from a model built with the same name and kwargs"
        )


class HFTextTower(nn.Module):
    """A transformers encoder: tokens [B, L] -> pooled features [B, hidden_size].

    source: a config dict (`AutoConfig.for_model(model_type, **fields)`, model_type defaulting to "bert",
    so a BertConfig's fields build a randomly initialised BERT), a local directory written by
    `save_pretrained`, or a hub name (needs network). pool: "first" (the [CLS] token) or "mean" over the
    non-pad tokens. Attention ignores pad tokens (`tokens == config.pad_token_id`).
    """

    def __init__(self, source: dict[str, Any] | str | os.PathLike, pool: str = "first", layers: int | None = None,
                 layer_selection: str = "first"):
        super().__init__()
        if pool not in TEXT_POOLS:
            raise ValueError(f"hf text pool={pool!r} is not one of {TEXT_POOLS}")
        self.pool = pool
        self.model = _load_hf_model(source)
        if layers is not None:  # the thesis' student: the first (or every other) k layers of a pretrained BERT
            encoder = self.model.encoder.layer
            self.model.encoder.layer = nn.ModuleList(encoder[i] for i in kept_layers(len(encoder), layers,
                                                                                      layer_selection))
            self.model.config.num_hidden_layers = layers
        # The pooler (BERT's tanh head for next-sentence prediction) is not used by either pooling; left in,
        # its parameters would get no gradient and DDP would stop on them.
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        pad_id = self.model.config.pad_token_id
        self.pad_id = 0 if pad_id is None else pad_id

    @property
    def num_features(self) -> int:
        return self.model.config.hidden_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.activation_checkpointing_enable()
        else:
            self.model.activation_checkpointing_disable()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = tokens != self.pad_id
        hidden = self.model(input_ids=tokens, attention_mask=keep.long()).last_hidden_state
        if self.pool == "first":
            return hidden[:, 0]
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _load_hf_model(source: dict[str, Any] | str | os.PathLike) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if isinstance(source, dict):
        fields = dict(source)
        config = AutoConfig.for_model(fields.pop("model_type", "bert"), **fields)
        return AutoModel.from_config(config)
    path = Path(source)
    if path.is_dir():
        return AutoModel.from_pretrained(path)
    if path.is_absolute() or str(source).startswith((".", "~")):
        raise FileNotFoundError(f"hf text tower directory {source} does not exist; write it with save_pretrained")
    try:
        return AutoModel.from_pretrained(str(source))
    except OSError as error:
        raise ValueError(
            f"hf text tower source={source!r} is neither a local directory nor a reachable hub model: {error}"
        ) from error
