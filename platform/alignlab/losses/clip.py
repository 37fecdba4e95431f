"""CLIP contrastive loss (InfoNCE), docs/methods.md "CLIP"."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignlab.losses.distributed import gather_features


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    distributed: str = "none",
) -> torch.Tensor:
    """Averaged two-direction InfoNCE, docs/methods.md "CLIP":

        L = 1/2 [ H(I, rho(s V T^T)) + H(I, rho(s T V^T)) ]

    V, T: this rank's L2-normalised image / text features [n, d] (row i of each is pair i), as
    `DualEncoder` returns them; s = logit_scale, the multiplier 1/tau (already exponentiated).
    PSD writes the sum of the two terms; the platform averages them so every other loss reduces to this one.
    distributed: "none" | "global" | "local" (see `alignlab.losses.distributed`). In local mode the value is
    the mean over this rank's rows; the mean over ranks equals the single-process value on the global batch.
    """
    batch = gather_features(image_features, text_features, distributed)
    labels = batch.positive_columns()
    logits_image_to_text = logit_scale * batch.image_rows @ batch.text_cols.T
    # One matmul when rows are the columns: T V^T is then (V T^T)^T.
    logits_text_to_image = logits_image_to_text.T if batch.square else logit_scale * batch.text_rows @ batch.image_cols.T
    return (F.cross_entropy(logits_image_to_text, labels) + F.cross_entropy(logits_text_to_image, labels)) / 2
