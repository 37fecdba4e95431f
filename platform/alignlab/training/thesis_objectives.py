"""The contrastive and matching terms of the thesis' variants that it tried and dropped (docs/methods.md,
"Thesis methods"): InfoNCE with a student memory bank or against a momentum encoder and its queues, and
image-text matching. Each reads the student's outputs (`ThesisStudent.forward`) and, after computing its
loss, pushes this batch's vectors into its queues (gathered over ranks, so every rank keeps the same ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignlab import losses
from alignlab.config import KnowledgeConfig
from alignlab.losses.itm import itm_loss, sample_itm_negatives
from alignlab.losses.memory_bank import FeatureQueue
from alignlab.losses.queued import momentum_clip_loss, student_bank_clip_loss
from alignlab.models.itm import ITMHeads
from alignlab.models.momentum import MomentumEncoder
from alignlab.models.thesis_student import TRAINING_MODULES

LAYER_ORDER = ("h1", "h2", "h3")  # the order of the student's `layers` (h1, h2, then h3 for the MLP)
MOMENTUM_LAYER = "h2"  # the thesis dropped h' with the momentum encoder (two queues instead of four)
ITM_LAYERS = ("h1", "h2")  # Eq 64-66: h' and h''


def attach_thesis_modules(student: nn.Module, k: KnowledgeConfig) -> None:
    """Give the student what the enabled variants keep: the momentum encoder (a copy of the student as it is
    now, so attach before training starts), the student memory banks, the ITM heads."""
    widths = student.layer_widths()
    if k.momentum.enabled:
        size, width = k.momentum.queue_size, widths[MOMENTUM_LAYER]
        queues = (FeatureQueue(size, width), FeatureQueue(size, width)) if size else None
        student.attach("momentum_encoder", MomentumEncoder(student, k.momentum.m, MOMENTUM_LAYER, queues,
                                                           drop=TRAINING_MODULES))
    if k.student_bank_size:
        student.attach("student_bank", nn.ModuleDict({
            f"{name}_{modality}": FeatureQueue(k.student_bank_size, widths[name])
            for name in student.layer_names for modality in ("image", "text")}))
    if k.itm.negatives != "off":
        student.attach("itm", ITMHeads({name: widths[name] for name in ITM_LAYERS}, k.itm.dim))


def contrastive_term(outputs: dict, mode: str) -> torch.Tensor:
    """L_CL of the thesis' student: multi-layer InfoNCE (Eq 47, 53), with the student memory bank's extra
    negatives per layer when it has one, or InfoNCE on h'' against the momentum encoder (then h' is dropped)."""
    layers, scales = outputs["layers"], outputs["logit_scales"]
    encoder, banks = outputs.get("momentum_encoder"), outputs.get("student_bank")
    if encoder is not None:
        index = LAYER_ORDER.index(encoder.layer)
        (image, text), (momentum_image, momentum_text) = layers[index], outputs["momentum"]
        queues = [None if q is None else q.negatives() for q in (encoder.image_queue, encoder.text_queue)]
        value = momentum_clip_loss(image, text, momentum_image, momentum_text, scales[index], *queues,
                                   distributed=mode)
        for queue, vectors in zip((encoder.image_queue, encoder.text_queue), outputs["momentum"]):
            if queue is not None:
                queue.push(vectors, distributed=mode)
        return value
    if banks is None:
        return losses.multi_layer_clip_loss(layers, scales, mode)
    values = []
    for (image, text), name, scale in zip(layers, LAYER_ORDER, scales):
        image_bank, text_bank = banks[f"{name}_image"], banks[f"{name}_text"]
        values.append(student_bank_clip_loss(image, text, scale, image_bank.negatives(), text_bank.negatives(),
                                             distributed=mode))
        image_bank.push(image.detach(), distributed=mode)
        text_bank.push(text.detach(), distributed=mode)
    return torch.stack(values).mean()


def itm_term(outputs: dict, negatives: str, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_ITM, accuracy in %, as the thesis' Fig. 22), Eq 66: the mean of the h' and h'' heads' losses on this rank's batch (B pairs, 2B
    non-pairs drawn from it); hard negatives follow that layer's ITC logits. The draws are a pure function of
    (seed, step), not of the global RNG (which a resume's new data-loader iterator advances), so a resumed
    run draws the same negatives."""
    values, accuracies = [], []
    for name, head in outputs["itm"].items():
        index = LAYER_ORDER.index(name)
        image, text = outputs["layers"][index]
        similarity = outputs["logit_scales"][index].detach() * image.detach() @ text.detach().T
        generator = torch.Generator(device=similarity.device).manual_seed((seed * 1_000_003 + step) * 4 + index)
        text_for_image, image_for_text = sample_itm_negatives(similarity, negatives, generator)
        raw_image, raw_text = outputs["raw_layers"][index]
        value, accuracy = itm_loss(head, raw_image, raw_text, text_for_image, image_for_text)
        values.append(value)
        accuracies.append(accuracy)
    return torch.stack(values).mean(), 100.0 * torch.stack(accuracies).mean()
