"""Target cross-modal late interaction (T-CMLI), thesis section 3.2.5.2, Eq 71-77 (docs/methods.md "T-CMLI"):
token-level targets from the frozen image teacher instead of its CLS vector alone.

    image:  L_v = 1/N sum_n || H'''_v,n - H^t_n ||^2 / D                  (patches only, no CLS)
    text:   m_z = argmax_n cos(g h'''_w,z, g h^t_n)                      (each kept text token z)
            L_w = 1/Z sum_z || g h'''_w,z - g h^t_{m_z} ||^2
    L_KD = (L_v + L_w) / 2

g: a learned linear map into a low-dimensional space (768 -> 32 in the thesis), shared by both sides. As
written, g can shrink to zero and make L_w vanish; the default (`form="normalized"`) therefore stops the
gradient on the teacher side and L2-normalises both sides in g-space (THESIS.md ambiguity 11);
`form="literal"` is the equations as printed. The sums of the equations are means here (over the patches
and channels, as the thesis' MSE of Eq 1; over the kept text tokens), so the loss does not grow with the
token count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TCMLI_FORMS = ("normalized", "literal")


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def tcmli_loss(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_keep: torch.Tensor,
               teacher_tokens: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
               form: str = "normalized") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_v, L_w) of Eq 71-77.

    image_tokens: the student's H''' for the image [B, 1 + N, D]; teacher_tokens: the teacher's final tokens
    for the same image [B, 1 + N, D] (row 0 is the CLS and left out on both); text_tokens: the student's H'''
    for the caption [B, L, D] with text_keep [B, L] bool, the tokens that take part (no CLS, end or pad);
    project: g, [..., D] -> [..., k]."""
    if form not in TCMLI_FORMS:
        raise ValueError(f"T-CMLI form={form!r} is not one of {TCMLI_FORMS}")
    if image_tokens.shape != teacher_tokens.shape or image_tokens.ndim != 3:
        raise ValueError(f"T-CMLI needs student and teacher image tokens of one shape [B, 1 + N, D], got "
                         f"{tuple(image_tokens.shape)} and {tuple(teacher_tokens.shape)}")
    if text_tokens.ndim != 3 or text_keep.shape != text_tokens.shape[:2] or text_tokens.shape[0] != image_tokens.shape[0]:
        raise ValueError(f"T-CMLI text tokens {tuple(text_tokens.shape)} and keep mask {tuple(text_keep.shape)} "
                         f"must be [B, L, D] and [B, L] for the image batch of {image_tokens.shape[0]}")
    teacher_patches = _float(teacher_tokens[:, 1:].detach())
    image_loss = F.mse_loss(_float(image_tokens[:, 1:]), teacher_patches)

    student = project(_float(text_tokens))  # [B, L, k]
    if form == "normalized":
        with torch.no_grad():
            teacher = F.normalize(project(teacher_patches), dim=-1)
        student = F.normalize(student, dim=-1)
    else:
        teacher = project(teacher_patches)  # [B, N, k], g trains from both sides
    with torch.no_grad():
        match = torch.einsum("blk,bnk->bln", F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)).argmax(-1)
    matched = torch.gather(teacher, 1, match.unsqueeze(-1).expand(-1, -1, teacher.shape[-1]))  # [B, L, k]
    per_token = (student - matched).pow(2).sum(dim=-1)
    keep = text_keep.to(per_token.dtype)
    text_loss = (per_token * keep).sum() / keep.sum().clamp(min=1.0)
    return image_loss, text_loss
