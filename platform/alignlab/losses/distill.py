"""Distillation from a frozen vision teacher (docs/methods.md "DiHT concept distillation"): concept distillation (CD)
and the two
baselines it is compared with, embedding distillation (ED) and distribution distillation (DD).

Teacher-side tensors (targets, embeddings) never carry a gradient: the teacher is frozen and its
predictions are labels. Everything is computed in float32, also under AMP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignlab.losses.distributed import gather_column_values, gather_features, gather_row_values


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Concept distillation, docs/methods.md "DiHT concept distillation" (DiHT eq. for L_CE-obj / L_CE-attr): `H(P,
    softmax(z))`,

        L = -1/n sum_i sum_c P_ic log softmax(z_i)_c

    z: head logits [n, K] (`f_obj` or `f_attr` on the student image embedding); P: the teacher's top-k
    distributions [n, K] (renormalised, zeros outside the top-k), rows summing to 1.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"concept head logits {tuple(logits.shape)} and teacher targets {tuple(targets.shape)} "
                         "differ: the head must have one output per teacher class")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(targets.detach().float() * log_probs).sum(dim=-1).mean()


def embedding_distill_loss(student_projected: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Embedding distillation (ED), docs/methods.md "DiHT concept distillation" (SimSiam-style negative cosine):

        L = -1/n sum_i cos(g(v_i), e_i)

    g(v_i): a learned projection of student image embedding i into the teacher's space [n, D];
    e_i: the teacher's embedding of the same image [n, D] (stop-gradient). Ranges over [-1, 1].
    """
    if student_projected.shape != teacher_embedding.shape:
        raise ValueError(f"ED projection output {tuple(student_projected.shape)} and teacher embedding "
                         f"{tuple(teacher_embedding.shape)} differ")
    cosine = F.cosine_similarity(student_projected.float(), teacher_embedding.detach().float(), dim=-1)
    return -cosine.mean()


def distribution_distill_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    teacher_image_features: torch.Tensor,
    lam: float,
    temperature: float,
    distributed: str = "none",
) -> torch.Tensor:
    """Distribution distillation (DD), docs/methods.md "DiHT concept distillation" (ALBEF-style soft labels in
    InfoNCE). With V, T the
    student's image / text features, U the teacher's image embeddings in the same space (all L2-normalised):

        Q_i2t = rho(U T^T; temperature),   Q_t2i = rho(T U^T; temperature)          (stop-gradient)
        L = 1/2 [ H((1-lam) I + lam Q_i2t, rho(s V T^T)) + H((1-lam) I + lam Q_t2i, rho(s T V^T)) ]

    The cross entropy is linear in its targets, so each direction is computed as
    (1-lam) H(I, .) + lam H(Q, .): lam = 0 is `clip_loss` exactly, bit for bit.
    distributed: "none" | "global" | "local" as in `clip_loss`; U is gathered like V (without gradient).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"DD mixing weight lam={lam} must lie in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"DD temperature={temperature} must be positive")
    batch = gather_features(image_features, text_features, distributed)
    teacher = teacher_image_features.detach()
    teacher_rows = gather_row_values(teacher, distributed)
    teacher_cols = gather_column_values(teacher, distributed)
    labels = batch.positive_columns()
    logits_i2t = logit_scale * batch.image_rows @ batch.text_cols.T
    logits_t2i = logits_i2t.T if batch.square else logit_scale * batch.text_rows @ batch.image_cols.T
    with torch.no_grad():
        soft_i2t = F.softmax(teacher_rows.float() @ batch.text_cols.float().T / temperature, dim=-1)
        soft_t2i = F.softmax(batch.text_rows.float() @ teacher_cols.float().T / temperature, dim=-1)

    def mixed(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(logits, labels)
        return (1.0 - lam) * hard + lam * soft_target_cross_entropy(logits, soft)

    return (mixed(logits_i2t, soft_i2t) + mixed(logits_t2i, soft_t2i)) / 2


def keep_top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """A distribution [n, K] kept on its k largest entries and renormalised (zeros elsewhere): DiHT's stored
    pseudo-labels, and how a cache of top-k' (k' > k) targets is cut down to top-k."""
    k = min(k, probs.shape[-1])
    values, columns = probs.float().topk(k, dim=-1)
    out = torch.zeros_like(probs, dtype=torch.float32).scatter_(-1, columns, values)
    return out / out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def topk_distribution(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher's softmax kept on its top-k classes and renormalised: dense [n, K] float32 with zeros
    outside the top-k, the form `TeacherCache.lookup` returns."""
    return keep_top_k(F.softmax(logits.float(), dim=-1), k)
