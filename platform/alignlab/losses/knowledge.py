"""Losses of multimodal knowledge extraction from a frozen vision teacher (the thesis; docs/methods.md,
"Thesis methods"): SHRe's KL on teacher logits, S-SMKE's regression onto the teacher CLS, the contrastive
target loss (CTL) with an optional bank of past teacher vectors, and InfoNCE on several layers.

Teacher tensors never carry a gradient (the teacher is frozen). Everything is computed in float32 at least,
also under AMP. Equation numbers are those of the thesis draft (Cares 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from alignlab.losses.clip import clip_loss
from alignlab.losses.distributed import gather_features


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def shre_kd_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """SHRe knowledge distillation, thesis Eq 45-46 (temperature 1, batch mean):

        L_KD = 1/2 KL(softmax(p) || softmax(z_img)) + 1/2 KL(softmax(p) || softmax(z_txt))

    p: the teacher's logits for the image [n, C] (the caption gets the same target); z_img, z_txt: the
    student's head outputs h''' for the image and for its caption [n, C].
    """
    if not image_logits.shape == text_logits.shape == teacher_logits.shape:
        raise ValueError(f"SHRe KD needs image, text and teacher logits of one shape [n, classes], got "
                         f"{tuple(image_logits.shape)}, {tuple(text_logits.shape)}, {tuple(teacher_logits.shape)}")
    target = F.log_softmax(_float(teacher_logits.detach()), dim=-1)

    def kl(student: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(_float(student), dim=-1), target, log_target=True, reduction="batchmean")

    return (kl(image_logits) + kl(text_logits)) / 2


def ssmke_mse_loss(image_pred: torch.Tensor, text_pred: torch.Tensor, teacher_cls: torch.Tensor) -> torch.Tensor:
    """S-SMKE feature regression, thesis Eq 57 (MSE as its Eq 1: mean over the D dimensions, then the batch):

        L_KD = 1/2 MSE(h'''_img, c) + 1/2 MSE(h'''_txt, c)

    c: the teacher's CLS vector for the image [n, D]; h'''_img, h'''_txt: the regression head's outputs [n, D].
    """
    if not image_pred.shape == text_pred.shape == teacher_cls.shape:
        raise ValueError(f"S-SMKE needs image, text and teacher vectors of one shape [n, D], got "
                         f"{tuple(image_pred.shape)}, {tuple(text_pred.shape)}, {tuple(teacher_cls.shape)}")
    target = _float(teacher_cls.detach())
    return (F.mse_loss(_float(image_pred), target) + F.mse_loss(_float(text_pred), target)) / 2


def contrastive_target_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                            logit_scale: torch.Tensor | float, bank: torch.Tensor | None = None,
                            distributed: str = "none") -> torch.Tensor:
    """Contrastive target loss (CTL), thesis Eq 79-83, with the teacher memory bank of Eq 84-85:

        L = -1/n sum_i log( exp(s x_i . c_i) / sum_{j in batch + bank} exp(s x_i . c_j) )

    x: this rank's L2-normalised student features [n, D] (rows); c: the L2-normalised teacher features of the
    same images [n, D], gathered over ranks as the columns (every rank's current targets are negatives),
    followed by `bank` [M, D] (past teacher vectors, negatives only). One direction: student rows, teacher
    columns. s = logit_scale, the multiplier (1/0.07 in the thesis code; 1 for the literal Eq 83).
    distributed: "none" | "global" | "local", as `clip_loss` (local: mean over this rank's rows).
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"CTL student features {tuple(student_features.shape)} and teacher features "
                         f"{tuple(teacher_features.shape)} differ: project the student to the teacher's width")
    batch = gather_features(student_features, teacher_features.detach(), distributed)
    rows, columns = _float(batch.image_rows), _float(batch.text_cols)
    if bank is not None:
        if bank.ndim != 2 or bank.shape[1] != columns.shape[1]:
            raise ValueError(f"CTL bank must be [M, {columns.shape[1]}], got {tuple(bank.shape)}")
        columns = torch.cat([columns, bank.detach().to(columns)])
    logits = logit_scale * rows @ columns.T
    return F.cross_entropy(logits, batch.positive_columns())


def ctl_kd_loss(image_features: torch.Tensor, text_features: torch.Tensor, teacher_features: torch.Tensor,
                logit_scale: torch.Tensor | float, bank: torch.Tensor | None = None,
                distributed: str = "none") -> torch.Tensor:
    """The thesis' CTL objective, Eq 83: both student modalities against the teacher's image vectors,

        L_KD = 1/2 CTL(T_s, I_t) + 1/2 CTL(I_s, I_t)
    """
    return (contrastive_target_loss(text_features, teacher_features, logit_scale, bank, distributed)
            + contrastive_target_loss(image_features, teacher_features, logit_scale, bank, distributed)) / 2


def multi_layer_clip_loss(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], logit_scales: torch.Tensor,
                          distributed: str = "none") -> torch.Tensor:
    """InfoNCE on several layers, each with its own logit scale, thesis Eq 47 (MLP: h', h'', h''') and Eq 53
    (shared block: h', h''):

        L_CL = 1/L sum_l L_CLIP(V_l, T_l; s_l)

    layers: (image, text) L2-normalised features per layer; logit_scales: [L] multipliers (each learnable and
    clamped by its owner, as the single scale of `clip_loss`).
    """
    if len(layers) == 0 or logit_scales.shape != (len(layers),):
        raise ValueError(f"multi-layer InfoNCE needs one logit scale per layer: {len(layers)} layers, "
                         f"scales of shape {tuple(logit_scales.shape)}")
    return torch.stack([clip_loss(image, text, logit_scales[i], distributed)
                        for i, (image, text) in enumerate(layers)]).mean()
