"""Cross-rank gathering of embeddings for contrastive losses (docs/methods.md "CLIP", "Distributed").

Two modes make every loss see the global batch:
  - "global" (PSD): every rank all-gathers all features and computes the loss on the whole global batch.
  - "local" (DiHT, open_clip `local_loss`): each rank's rows are its own pairs, its columns the global batch;
    the loss is the mean over local rows, so the mean over ranks equals the single-process loss.
Both gather WITH gradient (`torch.distributed.nn.functional.all_gather`, whose backward sums each column's
gradient from all ranks into the rank that owns it). So the gradient of a rank's features is W x the
single-process gradient of that shard (W = world size): in global mode because all W ranks back-propagate
the same full loss, in local mode because the W per-rank means sum to W x the global mean. DDP divides the
summed parameter gradients by W, which makes both modes exactly the single-process update. A no-grad gather
(local slice re-attached) would drop the terms in which a rank's features are other ranks' negatives.
All ranks must hold the same number of pairs (drop_last batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

MODES = ("none", "global", "local")


@dataclass
class LossBatch:
    """Rows and columns of the similarity matrices one rank computes; the positive of row i is column
    `row_offset + i`. Columns are always the whole (global) batch."""

    image_rows: torch.Tensor
    text_rows: torch.Tensor
    image_cols: torch.Tensor
    text_cols: torch.Tensor
    row_offset: int

    @property
    def square(self) -> bool:
        """Rows are the columns (no distribution, or global mode): T V^T is then the transpose of V T^T and
        needs no matmul of its own."""
        return self.image_rows is self.image_cols and self.text_rows is self.text_cols

    def positive_columns(self) -> torch.Tensor:
        """Column index of each row's positive pair, as InfoNCE labels."""
        return torch.arange(self.image_rows.shape[0], device=self.image_rows.device) + self.row_offset


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, mode: str = "none") -> LossBatch:
    """Arrange this rank's [n, d] features into the rows/columns of the loss for `mode` in MODES.

    "none", or a run without an initialised process group of world size > 1: rows = columns = inputs.
    """
    _check_mode(mode)
    if mode == "none" or _world_size() == 1:
        return LossBatch(image_features, text_features, image_features, text_features, row_offset=0)
    image_cols = torch.cat(dist_fn.all_gather(image_features), dim=0)
    text_cols = torch.cat(dist_fn.all_gather(text_features), dim=0)
    if mode == "global":
        return LossBatch(image_cols, text_cols, image_cols, text_cols, row_offset=0)
    # The gathered local slice carries the same gradient as the local tensor, so rows can be the inputs.
    offset = dist.get_rank() * image_features.shape[0]
    return LossBatch(image_features, text_features, image_cols, text_cols, row_offset=offset)


def gather_row_values(values: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """A per-pair tensor of this rank (e.g. PSD's aligned-row mask), aligned with `LossBatch` rows.

    Gathered without gradient: meant for masks, ids and targets, not for features.
    """
    _check_mode(mode)
    if mode == "global":
        return gather_column_values(values, mode)
    return values


def gather_column_values(values: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """A per-pair tensor of this rank aligned with `LossBatch` columns (the global batch), without gradient."""
    _check_mode(mode)
    if mode == "none" or _world_size() == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(_world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts, dim=0)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"distributed loss mode={mode!r} is not one of {MODES}")
