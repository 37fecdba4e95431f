"""DiHT concept heads (docs/methods.md, "DiHT concept distillation"): linear "objects" and "attributes" heads on frozen teacher features, trained
on concepts parsed from the captions.

- Concepts of a caption: the semantic parser's objects (nouns) and attributes (adjectives, numerals, noun
  modifiers), lower-cased words (`alignlab.data.text.semantic_parser`).
- Vocabulary: the concepts occurring in at least `min_count` training captions (DiHT: >= 250 on 4 B pairs).
- Target of a caption with K in-vocabulary concepts: 1/K on each. A caption with none gives no target for
  that head; it is left out of that head's training and counted (`skipped`).
- Inverse-square-root resampling: sample i is drawn with probability proportional to max over its concepts c
  of count(c)^-1/2, so rare concepts are seen more often than their frequency.
- SGD, momentum 0.9, weight decay 1e-4, lr = base_lr * batch_size / 256 (DiHT), soft-target cross entropy.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.teachers.settings import ConceptSettings

# DiHT's SGD settings of concept-head training (not exposed: the paper fixes them)
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


def caption_concepts(captions: Sequence[str], batch_size: int = 256) -> dict[str, list[list[str]]]:
    """{"objects": [...], "attributes": [...]}: per caption, its distinct parsed concepts in order of appearance."""
    from alignlab.data.text.semantic_parser import parse_captions

    graphs = parse_captions(list(captions), batch_size=batch_size)
    return {"objects": [list(dict.fromkeys(g.objects)) for g in graphs],
            "attributes": [list(dict.fromkeys(word for _, word in g.attributes)) for g in graphs]}


def build_vocabulary(concepts: Sequence[Sequence[str]], min_count: int) -> tuple[list[str], Counter]:
    """Concepts occurring in >= min_count captions (each caption counts a concept once), sorted by count
    (descending) then name; and the full counts."""
    counts = Counter(c for caption in concepts for c in set(caption))
    vocab = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))
    return vocab, counts


def concept_targets(concepts: Sequence[Sequence[str]], vocab: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [N, len(vocab)] with 1/K on each of the K in-vocabulary concepts, has_target [N] bool)."""
    index = {c: i for i, c in enumerate(vocab)}
    targets = torch.zeros(len(concepts), len(vocab))
    for row, caption in enumerate(concepts):
        ids = sorted({index[c] for c in caption if c in index})
        if ids:
            targets[row, ids] = 1.0 / len(ids)
    return targets, targets.sum(dim=1) > 0


def resampling_weights(concepts: Sequence[Sequence[str]], vocab: Sequence[str], counts: Counter) -> torch.Tensor:
    """Per caption: max over its in-vocabulary concepts of count^-1/2 (0 when it has none)."""
    known = set(vocab)
    return torch.tensor([max((counts[c] ** -0.5 for c in caption if c in known), default=0.0)
                         for caption in concepts], dtype=torch.float64)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j target_j log softmax(logits)_j."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def train_concept_head(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
                       config: ConceptSettings, seed: int = 0) -> tuple[nn.Linear, dict]:
    """A linear head trained on fixed `features` [N, D] against soft `targets` [N, K] (rows with a target
    only). `weights` [N] drives resampling (None or all-equal: a plain shuffle). Returns the head and
    {"loss_first_epoch", "loss_last_epoch", "steps", "lr"}."""
    if len(features) == 0:
        raise ValueError("no caption has an in-vocabulary concept for this head: lower min_count or use more data")
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(features.shape[1], targets.shape[1])
    with torch.no_grad():  # deterministic init from the seed
        bound = 1 / math.sqrt(features.shape[1])
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    n, losses, steps = len(features), [], 0
    for _ in range(config.epochs):
        if weights is not None and config.resample == "inv_sqrt":
            order = torch.multinomial(weights.float(), n, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, config.batch_size):
            rows = order[start:start + config.batch_size]
            loss = soft_cross_entropy(head(features[rows]), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
            steps += 1
        losses.append(total / n)
    return head, {"loss_first_epoch": losses[0], "loss_last_epoch": losses[-1], "steps": steps, "lr": config.lr}


def top1_in_concepts(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is one of the row's target concepts."""
    if len(logits) == 0:
        return float("nan")
    return float((targets.gather(1, logits.argmax(dim=1, keepdim=True)) > 0).float().mean())
