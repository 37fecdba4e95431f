"""The image VQ objective, thesis section 3.2.7, Eq 86-90 (docs/methods.md "Image VQ"): the decoder must rebuild
the frozen teacher's CLS vector c from one code of a cosine codebook and the few unmasked patches,

    L_I-VQ = 1 - cos(d, c) + || delta(c W_down) - sg delta(q_m) ||^2

d: the decoder's CLS output; c W_down: the projected teacher CLS (z); q_m: its nearest code by cosine;
delta: L2 normalisation; sg: stop-gradient (the codes move by EMA, not by gradient). The second term is the
commitment loss (beta 1, as BEiT v2's quantizer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def image_vq_loss(prediction: torch.Tensor, teacher_cls: torch.Tensor, z: torch.Tensor,
                  code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction 1 - cos(d, c), commitment ||delta(z) - sg delta(q)||^2), each a batch mean.

    prediction, teacher_cls: [B, D]; z: the projected CLS before quantisation [B, S]; code: its code [B, S]."""
    if prediction.shape != teacher_cls.shape or z.shape != code.shape:
        raise ValueError(f"image VQ: prediction {tuple(prediction.shape)} vs teacher CLS {tuple(teacher_cls.shape)}, "
                         f"z {tuple(z.shape)} vs code {tuple(code.shape)} must match")
    reconstruction = (1 - F.cosine_similarity(prediction.float(), teacher_cls.detach().float(), dim=-1)).mean()
    commitment = (F.normalize(z.float(), dim=-1) - F.normalize(code.detach().float(), dim=-1)).pow(2).sum(-1).mean()
    return reconstruction, commitment
