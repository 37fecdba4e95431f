"""InfoNCE with extra negatives from a FIFO queue: the thesis' two ways of getting more negatives than the
batch holds (section 3.2.4.3; docs/methods.md, "Thesis methods"), both dropped in the thesis.

- Student memory bank (Tables 20-21): the columns continue with past *student* vectors of the other
  modality, per layer. Old vectors come from older weights, so they are inconsistent with the current ones;
  the thesis' run collapsed.
- Momentum encoder + queue (Eq 70, Table 22; MoCo / ALBEF): the columns are the *momentum* encoder's vectors
  of the batch (the positive: the momentum vector of the pair) followed by a queue of its past vectors.

Both are computed in float32 at least. Queued vectors never carry a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignlab.losses.distributed import gather_features


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def queued_infonce(rows: torch.Tensor, columns: torch.Tensor, logit_scale: torch.Tensor | float,
                   queue: torch.Tensor | None = None, distributed: str = "none") -> torch.Tensor:
    """One direction of InfoNCE with queued negatives:

        L = -1/n sum_i log( exp(s r_i . c_i) / sum_{j in batch + queue} exp(s r_i . c_j) )

    rows: this rank's L2-normalised vectors [n, D]; columns: the L2-normalised vectors of the other side of
    the same pairs [n, D], gathered over ranks (with their gradient, if they have one); queue [M, D]: past
    vectors of the columns' kind, negatives only. distributed: "none" | "global" | "local", as `clip_loss`.
    """
    if rows.shape != columns.shape:
        raise ValueError(f"queued InfoNCE rows {tuple(rows.shape)} and columns {tuple(columns.shape)} differ")
    batch = gather_features(rows, columns, distributed)
    all_columns = _float(batch.text_cols)
    if queue is not None:
        if queue.ndim != 2 or queue.shape[1] != all_columns.shape[1]:
            raise ValueError(f"queue must be [M, {all_columns.shape[1]}], got {tuple(queue.shape)}")
        all_columns = torch.cat([all_columns, queue.detach().to(all_columns)])
    logits = logit_scale * _float(batch.image_rows) @ all_columns.T
    return F.cross_entropy(logits, batch.positive_columns())


def student_bank_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                           logit_scale: torch.Tensor | float, image_bank: torch.Tensor | None = None,
                           text_bank: torch.Tensor | None = None, distributed: str = "none") -> torch.Tensor:
    """InfoNCE of one layer with a student memory bank, thesis section 3.2.4.3 (Table 20: one bank per
    modality and layer, each the negatives of the other modality):

        L = 1/2 [ H(V -> [T ; Q_T]) + H(T -> [V ; Q_V]) ]

    With empty banks this is `clip_loss`. The batch's columns carry their gradient, the banks do not."""
    return (queued_infonce(image_features, text_features, logit_scale, text_bank, distributed)
            + queued_infonce(text_features, image_features, logit_scale, image_bank, distributed)) / 2


def momentum_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, momentum_image: torch.Tensor,
                       momentum_text: torch.Tensor, logit_scale: torch.Tensor | float,
                       image_queue: torch.Tensor | None = None, text_queue: torch.Tensor | None = None,
                       distributed: str = "none") -> torch.Tensor:
    """InfoNCE against a momentum encoder and its queues, thesis section 3.2.4.3.2-3 (MoCo, ALBEF's ITC):

        L = 1/2 [ H(V -> [T_m ; Q_T]) + H(T -> [V_m ; Q_V]) ]

    V, T: the student's L2-normalised h'' of the batch (rows, with gradient); V_m, T_m: the momentum
    encoder's of the same pairs (the positives, and the batch's negatives, no gradient); Q_V, Q_T: queues of
    the momentum encoder's past vectors."""
    return (queued_infonce(image_features, momentum_text.detach(), logit_scale, text_queue, distributed)
            + queued_infonce(text_features, momentum_image.detach(), logit_scale, image_queue, distributed)) / 2
