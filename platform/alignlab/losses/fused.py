"""Helpers shared by the fused (forward computes the gradient) PSD and HN-NCE autograd functions."""

from __future__ import annotations

import torch


def similarities(image_rows, text_cols, text_rows, image_cols, dtype) -> torch.Tensor:
    """[2, n, N]: V T^T (image -> text) and T V^T (text -> image; the transpose of the first unless in local
    mode, where rows are this rank's and columns the global batch), multiplied into one buffer in the
    features' precision (out= matmuls are not autocast), then in `dtype`."""
    sims = image_rows.new_empty((2, image_rows.shape[0], text_cols.shape[0]))
    torch.mm(image_rows, text_cols.T, out=sims[0])
    if text_rows is text_cols and image_rows is image_cols:
        sims[1].copy_(sims[0].T)  # rows are the columns: T V^T is (V T^T)^T, no second matmul
    else:
        torch.mm(text_rows, image_cols.T, out=sims[1])
    return sims.to(dtype)


def compute_dtype(features: torch.Tensor) -> torch.dtype:
    """float32 for half / bfloat16 features: their exponentials, softmaxes and sums are taken in float32."""
    return torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
