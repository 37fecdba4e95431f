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


def square_grads(grad_i2t: torch.Tensor, grad_t2i: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                 row_weights: torch.Tensor | None = None):
    """Both directions' gradients in two matmuls when rows are the columns (sims[1] = sims[0]^T).

    With G0 = dloss/d(V T^T), G1 = dloss/d(T V^T) (rows scaled by `row_weights` when given) and
    M = G0 + G1^T: dloss/dV = M T, dloss/dT = M^T V, and sum_ik M_ik (V T^T)_ik = sum_i V_i . (M T)_i
    (the logit scale's gradient per unit of s). Four matmuls become two.
    """
    compute_dtype = grad_i2t.dtype
    if row_weights is not None:
        weights = row_weights[:, None].to(compute_dtype)
        grad_i2t, grad_t2i = grad_i2t * weights, grad_t2i * weights
    combined = (grad_i2t + grad_t2i.T).to(image.dtype)
    image_grad = combined @ text
    scale_grad = torch.dot(image.flatten().to(compute_dtype), image_grad.flatten().to(compute_dtype))
    return image_grad, combined.T @ image, scale_grad
