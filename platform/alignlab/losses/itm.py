"""Image-text matching (ITM) with feature fusion, thesis section 3.2.4.2 (Eq 64-68; docs/methods.md, "Thesis
methods"): a binary classifier on the sum of linear projections of an image vector and a text vector, trained
on the batch's B pairs and 2B sampled non-pairs. The thesis stopped it after one epoch: the accuracy stayed at
2/3 (every pair called "no match").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVES = ("random", "hard")


@torch.no_grad()
def sample_itm_negatives(similarity: torch.Tensor, negatives: str = "random",
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(text index for each image, image index for each text), never the pair itself.

    similarity: [B, B] image-to-text scores (the layer's ITC logits). "random": uniform over the other B-1;
    "hard" (VLMo, ALBEF): drawn with probability softmax(row) with the pair's own entry set to 0 (THESIS.md
    ambiguity 12), so similar captions are likelier. Texts sample images from the columns."""
    if negatives not in NEGATIVES:
        raise ValueError(f"ITM negatives={negatives!r} is not one of {NEGATIVES}")
    n = similarity.shape[0]
    if similarity.shape != (n, n) or n < 2:
        raise ValueError(f"ITM needs a square similarity of at least 2 pairs, got {tuple(similarity.shape)}")
    own = torch.eye(n, dtype=torch.bool, device=similarity.device)

    def draw(scores: torch.Tensor) -> torch.Tensor:
        weights = (torch.ones_like(scores, dtype=torch.float) if negatives == "random"
                   else F.softmax(scores.float(), dim=1))
        weights = weights.masked_fill(own, 0.0)
        if negatives == "hard":  # a row whose other entries underflowed to 0: fall back to uniform
            weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, (~own).float())
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    return draw(similarity), draw(similarity.T)


def itm_loss(head: torch.nn.Module, image: torch.Tensor, text: torch.Tensor, text_for_image: torch.Tensor,
             image_for_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) of one ITM head, Eq 66-67: 2-way cross entropy over 3B fused pairs,

        B positives (v_i, w_i) -> 1,  B (v_i, w_{text_for_image[i]}) -> 0,  B (v_{image_for_text[i]}, w_i) -> 0

    head(image [N, D], text [N, D]) -> logits [N, 2] (`alignlab.models.itm.ITMHead`); accuracy: the fraction
    of the 3B pairs whose argmax is right (2/3 for a head that always says "no match")."""
    images = torch.cat([image, image, image[image_for_text]])
    texts = torch.cat([text, text[text_for_image], text])
    n = image.shape[0]
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)]).to(image.device)
    logits = head(images, texts)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()
