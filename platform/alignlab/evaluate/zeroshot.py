"""Zero-shot classification with prompt-ensembled text prototypes (CLIP's protocol, docs/methods.md
"CLIP").

Prompt notes (PSD supplement, 000 section 2.3): each template's `{}` is replaced by the class name and the
article right before it is corrected, a -> an, when the class name starts with a vowel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.data.prompts import format_prompt


@torch.no_grad()
def zero_shot_classifier(encode_text: Callable[[Tensor], Tensor], tokenizer: Callable[[list[str]], Tensor],
                         classnames: Sequence[str], templates: Sequence[str], device="cpu") -> Tensor:
    """[C, d] class prototypes: w_c = normalize(mean_t normalize(encode_text(template_t(class_c)))).

    mean of the normalised text embeddings of all templates, renormalised. Embeddings are
    normalised here even if encode_text already does so, so the average weighs every template equally.
    Tokens are moved to `device` (where the text tower lives); the result is on the same device.
    """
    if not classnames:
        raise ValueError("classnames is empty; zero-shot classification needs at least one class")
    if not templates:
        raise ValueError("templates is empty; give at least one prompt template such as 'a photo of a {}.'")
    prototypes = []
    for classname in classnames:
        tokens = tokenizer([format_prompt(template, classname) for template in templates])
        embeddings = F.normalize(encode_text(tokens.to(device)).float(), dim=-1)
        prototypes.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(prototypes)


def zero_shot_metrics(image_features, classifier, labels) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall (percent) of argmax-cosine predictions.

    top5 is top-min(5, C). Mean per-class recall averages the recall of the classes present in `labels`
    (a class with no test image has no recall and is left out).
    """
    image_features = torch.as_tensor(image_features).float()
    classifier = torch.as_tensor(classifier).float().to(image_features.device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=image_features.device).reshape(-1)
    if image_features.ndim != 2 or classifier.ndim != 2 or image_features.shape[1] != classifier.shape[1]:
        raise ValueError(f"image_features {tuple(image_features.shape)} and classifier {tuple(classifier.shape)} "
                         "must be [N, d] and [C, d] with the same d")
    if labels.numel() != image_features.shape[0] or labels.numel() == 0:
        raise ValueError(f"labels has {labels.numel()} entries for {image_features.shape[0]} images; "
                         "need one label per image and at least one image")
    num_classes = classifier.shape[0]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) (the classifier's classes)")

    logits = image_features @ classifier.T
    top = logits.topk(min(5, num_classes), dim=1).indices
    correct_top1 = top[:, 0] == labels
    correct_top5 = (top == labels[:, None]).any(1)
    recalls = [correct_top1[labels == c].double().mean() for c in labels.unique()]
    return {
        "top1": 100.0 * float(correct_top1.double().mean()),
        "top5": 100.0 * float(correct_top5.double().mean()),
        "mean_per_class_recall": 100.0 * float(torch.stack(recalls).mean()),
    }
