"""The feature-fusion head of image-text matching, thesis Eq 64-65 (section 3.2.4.2; docs/methods.md, "Thesis
methods"): one per layer the ITM loss reads (h' and h'').

    z = (h_v W_I + h_w W_T) W_cls + b     (z in R^2: "no match", "match")

The projections have no bias (Eq 64); the thesis does not give their width (its +1.1 M parameters for h'
(3072) and h'' (768) fit about 140): `dim` sets it.
"""

from __future__ import annotations

import torch
from torch import nn


class ITMHead(nn.Module):
    """(image [N, D_l], text [N, D_l]) -> logits [N, 2]."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        if width < 1 or dim < 1:
            raise ValueError(f"ITM head width and dim must be >= 1, got width={width}, dim={dim}")
        self.image_proj = nn.Linear(width, dim, bias=False)
        self.text_proj = nn.Linear(width, dim, bias=False)
        self.classifier = nn.Linear(dim, 2)
        for linear in (self.image_proj, self.text_proj, self.classifier):
            nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.image_proj(image) + self.text_proj(text))


class ITMHeads(nn.ModuleDict):
    """One `ITMHead` per layer name ("h1", "h2"), held by the student so checkpoints and the optimizer see it."""

    def __init__(self, widths: dict[str, int], dim: int):
        super().__init__({name: ITMHead(width, dim) for name, width in widths.items()})
