"""Dual encoder (docs/methods.md "CLIP"): image tower + text tower, each linearly projected to a shared space.

Features are L2-normalised by default; the learnable logit scale s = 1/tau lives in log space
(initialised to log(1/0.07)) and is capped at 100, as in CLIP, PSD and DiHT.

Distillation heads (docs/methods.md "DiHT concept distillation": the concept heads `f_obj`, `f_attr`, the ED
projection) are linear layers on
the image embedding, added only when a run distils; they are saved with the model and ignored by
`encode_image` / `encode_text`, so evaluation never sees them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TowerPair(nn.Module):
    """What the trainer needs of any model made of an `image_tower` and a `text_tower` (the dual encoder, the
    thesis' student): LiT locking, gradient checkpointing, and which parameters take no weight decay."""

    image_tower_locked = False

    def set_image_tower_locked(self, locked: bool) -> None:
        """Lock (LiT) or unlock the image tower: no gradient, and eval mode (norms, dropout) while locked."""
        self.image_tower_locked = locked
        self.image_tower.requires_grad_(not locked)
        self.image_tower.train(self.training and not locked)

    def train(self, mode: bool = True) -> "TowerPair":
        super().train(mode)
        if self.image_tower_locked:
            self.image_tower.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_tower.set_grad_checkpointing(enable)
        self.text_tower.set_grad_checkpointing(enable)

    def no_weight_decay_param_names(self) -> set[str]:
        """Names of parameters that take no weight decay: biases, norm scales and the logit scale (every
        parameter with ndim <= 1), `nn.Embedding` tables, and what a submodule lists in `no_weight_decay()`
        (timm convention: ViT pos_embed / cls_token, the text transformer's positional_embedding)."""
        names = {name for name, param in self.named_parameters() if param.ndim <= 1}
        for prefix, module in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            if isinstance(module, nn.Embedding):
                names.add(f"{dot}weight")
            if callable(getattr(module, "no_weight_decay", None)):
                names.update(f"{dot}{name}" for name in module.no_weight_decay())
        return names & {name for name, _ in self.named_parameters()}


class DualEncoder(TowerPair):
    """`model(images, tokens) -> {"image_features", "text_features", "logit_scale"}` (docs/data-formats.md).

    Each tower is any module with `num_features` and `forward(x) -> [B, num_features]`. The projections have
    no bias (CLIP). The trainer calls `clamp_logit_scale_()` after each optimizer step (open_clip), and the
    forward pass caps the returned multiplier as well, so it never exceeds `max_logit_scale`.
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        embed_dim: int,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        projection: str = "linear",
    ):
        super().__init__()
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ValueError(
                f"init_logit_scale={init_logit_scale} must be in (0, max_logit_scale={max_logit_scale}]"
            )
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.max_logit_scale = max_logit_scale
        if projection == "identity":  # the towers' own vectors, compared by cosine (the unaligned control)
            if image_tower.num_features != text_tower.num_features:
                raise ValueError(f"model.projection=identity compares the towers' own vectors, but their widths "
                                 f"differ (image {image_tower.num_features}, text {text_tower.num_features}): "
                                 f"give both towers one width or use model.projection=linear")
            embed_dim = image_tower.num_features
            self.image_proj, self.text_proj = nn.Identity(), nn.Identity()
        elif projection == "linear":
            self.image_proj = nn.Linear(image_tower.num_features, embed_dim, bias=False)
            self.text_proj = nn.Linear(text_tower.num_features, embed_dim, bias=False)
            # CLIP's projection init: std = input width^-0.5, so projected features start at unit scale.
            nn.init.normal_(self.image_proj.weight, std=image_tower.num_features**-0.5)
            nn.init.normal_(self.text_proj.weight, std=text_tower.num_features**-0.5)
        else:
            raise ValueError(f"projection={projection!r} is not one of ('linear', 'identity')")
        self.embed_dim = embed_dim
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.heads = nn.ModuleDict()

    def add_heads(self, sizes: dict[str, int]) -> None:
        """Add a linear head `image embedding [B, embed_dim] -> [B, size]` per name (once per name)."""
        for name, size in sizes.items():
            if name in self.heads:
                raise ValueError(f"the model already has a head named {name!r}")
            self.heads[name] = nn.Linear(self.embed_dim, size)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.image_proj(self.image_tower(images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text_proj(self.text_tower(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def project_image_features(self, tower_features: torch.Tensor) -> torch.Tensor:
        """Map image-tower-width features (e.g. a teacher's of the same width) into the shared space."""
        return F.normalize(self.image_proj(tower_features), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features and logit scale; each distillation head adds `head/<name>` (its outputs on the image
        embedding), computed here so that DDP sees every parameter used in its forward."""
        image_features = self.encode_image(images)
        outputs = {
            "image_features": image_features,
            "text_features": self.encode_text(tokens),
            "logit_scale": self.logit_scale.exp().clamp(max=self.max_logit_scale),
        }
        return outputs | {f"head/{name}": head(image_features) for name, head in self.heads.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As `nn.Module.load_state_dict`; heads saved in `state_dict` that this model lacks (e.g. a model
        rebuilt for evaluation from the config alone) are first created from their saved shapes."""
        sizes = {key.split(".")[1]: value.shape[0] for key, value in state_dict.items()
                 if key.startswith("heads.") and key.endswith(".weight") and key.split(".")[1] not in self.heads}
        self.add_heads(sizes)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the log-space parameter to [0, log(max_logit_scale)] in place (open_clip's 0 <= log s)."""
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))
