"""HN-NCE: hard-negative noise-contrastive loss (docs/methods.md "HN-NCE"; DiHT paper 003, section 3.3 and footnote
4)."""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from alignlab.losses.distributed import gather_features
from alignlab.losses.fused import compute_dtype, similarities, square_grads


def hn_nce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    alpha: float = 1.0,
    beta: float = 0.0,
    detach_weights: bool = False,
    distributed: str = "none",
) -> torch.Tensor:
    """HN-NCE, docs/methods.md "HN-NCE". Image -> text, with logits l_ij = s v_i . t_j over the n columns of the
    (global) batch and the positive of row i at column i:

        w_ij  = (n-1) exp(beta l_ij) / sum_{k != i} exp(beta l_ik)                       (j != i)
        L_i2t = -1/n sum_i log( exp(l_ii) / (alpha exp(l_ii) + sum_{j != i} w_ij exp(l_ij)) )

    Text -> image is the same on the rows of s T V^T: for text i the weights are normalised over the
    images k != i, sum_{k != i} exp(beta l_ki) (DiHT's w^{t->i}, whose sum runs over x_k; its printed
    numerator x_j . t_i is read as the positive x_i . t_i, the only reading with which alpha = 1, beta = 0
    is InfoNCE as the paper states). Returns (L_i2t + L_t2i) / 2; the paper sums (docs/methods.md "CLIP").
    alpha = 1, beta = 0 is `clip_loss`.

    alpha in (0, 1] (DiHT: 1.0 on LAION, 0.999 on PMD); beta >= 0 (0.25 LAION, 0.5 PMD). detach_weights:
    no gradient through w (the paper's formula has one, the default keeps it). n >= 2 pairs.
    distributed: "none" | "global" | "local" as in `clip_loss`; n is then the global batch.

    Computed in log space, so that it stays finite at s = 100 where exp((1 + beta) l) overflows even float32:
    log w_ij = log(n-1) + beta l_ij - logsumexp_{k != i}(beta l_ik), and the log-denominator is
    logsumexp(log alpha + l_ii, {log w_ij + l_ij}_{j != i}), each logsumexp shifted by the row's largest
    negative logit. fp16 / bf16 features: the similarity matmul runs in their precision, the exponentials and
    sums in float32 (the loss is float32). The gradient w.r.t. the logits is computed in the forward pass
    (`_FusedHNNCE`), which keeps time and memory at `clip_loss`'s. Not twice differentiable.
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must both be [n, d] with the same shape")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1] (the weight of the positive in the denominator)")
    if not beta >= 0:
        raise ValueError(f"beta={beta} must be >= 0 (the concentration of the hard-negative weights)")
    batch = gather_features(image_features, text_features, distributed)
    if batch.image_cols.shape[0] < 2:
        raise ValueError(f"hn_nce_loss needs a batch of at least 2 pairs (it has negatives weighted by 1/(n-1)); "
                         f"got n={batch.image_cols.shape[0]}")
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), dtype=compute_dtype(image_features),
                                   device=image_features.device)
    return _FusedHNNCE.apply(batch.image_rows, batch.text_cols, batch.text_rows, batch.image_cols, logit_scale,
                             batch.positive_columns(), math.log(alpha), beta, detach_weights)


class _FusedHNNCE(torch.autograd.Function):
    """Both directions of HN-NCE, with the gradient w.r.t. the logits computed in the forward pass.

    Per row, with p = softmax of the log-denominator terms and q_ij = softmax_{j != i}(beta l_ij):
    dloss/dl_ij = (1 + beta) p_ij - beta (1 - p_ii) q_ij for j != i, and p_ii - 1 at the positive (with
    detached weights: p_ij for j != i). Both directions share one [2, n, N] similarity buffer, which is
    turned into that gradient in place and saved, so the backward is four matmuls, as for PSD.
    """

    @staticmethod
    def forward(ctx, image_rows, text_cols, text_rows, image_cols, scale, positives, log_alpha, beta,
                detach_weights):
        dtype = compute_dtype(image_rows)
        s = scale.detach().to(dtype).reshape(())
        sims = similarities(image_rows, text_cols, text_rows, image_cols, dtype)
        # The mean over this rank's rows and the two directions (local mode: the mean over ranks is then the
        # mean over the global batch, as in clip_loss).
        row_weight = 1 / (2 * image_rows.shape[0])
        positives = positives.view(1, -1, 1).expand(2, -1, 1)
        positive_logits = s * sims.gather(2, positives)
        sims.scatter_(2, positives, -math.inf)  # negatives only from here on: exp(-inf) = 0
        negative_max = sims.amax(2, keepdim=True)
        shifted = sims.sub_(negative_max)  # <= 0, so every exp below is <= 1 and the largest is exactly 1
        # log sum_{j != i} w_ij exp(l_ij) = s m + log(n-1) - log sum_k exp(beta (l_ik - s m))
        #                                                 + log sum_j exp((1 + beta)(l_ij - s m))
        log_negatives = s * negative_max
        if beta > 0:
            hardness = torch.mul(shifted, beta * s).exp_()
            hardness_totals = hardness.sum(2, keepdim=True)
            log_negatives = log_negatives + (math.log(sims.shape[2] - 1) - hardness_totals.log())
        weighted = shifted.mul_((1 + beta) * s).exp_()
        weighted_totals = weighted.sum(2, keepdim=True)
        log_negatives = log_negatives + weighted_totals.log()
        log_denominators = torch.logaddexp(log_alpha + positive_logits, log_negatives)
        negative_shares = (log_negatives - log_denominators).exp_()  # sum_{j != i} p_ij = 1 - p_ii
        negative_factors = negative_shares * row_weight / weighted_totals
        grads = weighted.mul_(negative_factors if detach_weights else (1 + beta) * negative_factors)
        if beta > 0 and not detach_weights:
            grads.sub_(hardness.mul_(beta * row_weight * negative_shares / hardness_totals))
        positive_probs = (log_alpha + positive_logits - log_denominators).exp_()
        grads.scatter_(2, positives, positive_probs.sub_(1).mul_(row_weight))
        ctx.save_for_backward(image_rows, text_cols, text_rows, image_cols, scale, grads)
        ctx.square = image_rows is image_cols and text_rows is text_cols
        return (log_denominators - positive_logits).sum() * row_weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        image_rows, text_cols, text_rows, image_cols, scale, grads = ctx.saved_tensors
        # dloss/dsim = grad_output s dloss/dL, with L = s sim.
        factor = grad_output * scale.detach().to(grads.dtype).reshape(())
        if ctx.square:  # one tensor is both rows and columns: its gradient goes to one slot, in two matmuls
            image_grad, text_grad, scale_sum = square_grads(grads[0], grads[1], image_rows, text_rows)
            image_rows_grad, text_rows_grad = image_grad.mul_(factor.to(image_grad.dtype)), text_grad.mul_(
                factor.to(text_grad.dtype))
            text_cols_grad = image_cols_grad = None
        else:
            image_rows_grad, text_cols_grad, scale_it = _direction_grads(grads[0], image_rows, text_cols, factor)
            text_rows_grad, image_cols_grad, scale_ti = _direction_grads(grads[1], text_rows, image_cols, factor)
            scale_sum = scale_it + scale_ti
        scale_grad = None
        if ctx.needs_input_grad[4]:
            scale_grad = (grad_output * scale_sum).to(scale.dtype).reshape(scale.shape)
        return image_rows_grad, text_cols_grad, text_rows_grad, image_cols_grad, scale_grad, None, None, None, None


def _direction_grads(logit_grad, rows, cols, factor):
    """Gradients of rows and cols for dloss/dsim = factor logit_grad (sim = rows cols^T), and
    sum_ik logit_grad_ik sim_ik, the s-gradient per unit of upstream gradient."""
    compute_dtype = logit_grad.dtype
    logit_grad, factor = logit_grad.to(rows.dtype), factor.to(rows.dtype)
    grad_times_cols = logit_grad @ cols
    # sum_ik G_ik sim_ik = sum_i rows_i . (G cols)_i
    scale_grad = torch.dot(rows.flatten().to(compute_dtype), grad_times_cols.flatten().to(compute_dtype))
    return grad_times_cols.mul_(factor), (logit_grad.T @ rows).mul_(factor), scale_grad
