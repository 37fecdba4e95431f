"""CLIP-score filtering, the baseline CAT is compared against (docs/methods.md "CAT filtering"; DiHT Table 1 row
"CLIP").

The score of a pair is the cosine similarity of its image and caption embeddings under a pretrained
dual encoder; DiHT drops pairs scoring below 0.35 (LAION-400M's rule applied to LAION-2B).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image


@torch.no_grad()
def clip_scores(model, tokenizer: Callable, image_transform: Callable, images: Sequence[Image.Image],
                captions: Sequence[str], batch_size: int = 256, device="cpu") -> torch.Tensor:
    """[N] float32 cosine similarity between image i and caption i, computed in batches on `device`.

    `model` is any encoder with `encode_image(images)` / `encode_text(tokens)` (docs/data-formats.md); the
    features are L2-normalised again here so that the score is a cosine whatever the encoder returns.
    The model is put in eval mode for scoring and restored to its previous mode afterwards.
    """
    if len(images) != len(captions):
        raise ValueError(f"images and captions must pair up, got {len(images)} images and {len(captions)} captions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        scores = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([image_transform(image.convert("RGB")) for image in images[start:start + batch_size]])
            tokens = tokenizer(list(captions[start:start + batch_size]))
            image_features = F.normalize(model.encode_image(batch.to(device)).float(), dim=-1)
            text_features = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
            scores.append((image_features * text_features).sum(dim=-1).cpu())
    finally:
        if was_training:
            model.train()
    return torch.cat(scores) if scores else torch.zeros(0)


def keep_clip_score(score: float, threshold: float = 0.35) -> bool:
    """Keep a pair whose CLIP score is at least `threshold` (DiHT drops those below 0.35)."""
    return float(score) >= threshold
