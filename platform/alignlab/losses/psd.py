"""PSD: progressive self-distillation loss (docs/methods.md "PSD"; PSD paper 001, Eq. 4 and the objective of 3.4.2)."""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from alignlab.losses.distributed import gather_column_values, gather_features, gather_row_values
from alignlab.losses.fused import compute_dtype, similarities, square_grads

PREDICTIONS = ("swapped", "forward")


def psd_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    alpha: float,
    aligned_mask: torch.Tensor,
    teacher_temperature: float = 0.1,
    prediction: str = "swapped",
    detach_targets: bool = True,
    distributed: str = "none",
) -> torch.Tensor:
    """PSD loss, docs/methods.md "PSD" (the two parts of `psd_loss_terms`, summed):

        L = alpha     * [ H(I_a, rho(s V_a T^T)) + H(I_a, rho(s T_a V^T)) ] / 2
          + (1-alpha) * [ H(A_v[u], rho(s V_u T^T)) + H(A_t[u], rho(s T_u V^T)) ] / 2

    With alpha = 1 and every row aligned this is `clip_loss`.
    """
    aligned, unaligned = psd_loss_terms(image_features, text_features, logit_scale, alpha, aligned_mask,
                                        teacher_temperature, prediction, detach_targets, distributed)
    return aligned + unaligned


def psd_loss_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    alpha: float,
    aligned_mask: torch.Tensor,
    teacher_temperature: float = 0.1,
    prediction: str = "swapped",
    detach_targets: bool = True,
    distributed: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The aligned part `alpha * [...] / 2` and the unaligned part `(1-alpha) * [...] / 2` of the PSD loss.

    image_features, text_features: this rank's L2-normalised [n, d] features V, T (row i of each is pair i);
    logit_scale: s = 1/tau, already exponentiated; aligned_mask: bool [n], True for this rank's aligned
    pairs (the caller draws the partition: N_a = floor(alpha N) rows for the dynamic one, docs/methods.md "PSD").

    Definitions:
      - Rows are restricted to the aligned set a or the unaligned set u; columns always span the whole
        (global) batch, so every pair is a negative for every row. H is averaged over the rows of its set.
      - Targets (teacher = the same embeddings, temperature tau_t = teacher_temperature, no logit scale):
        prediction="swapped" (the method): A_v = rho(T V^T; tau_t), A_t = rho(V T^T; tau_t), i.e.
        A_v[i, k] = softmax_k(t_i . v_k / tau_t), how strongly caption i prefers image k;
        prediction="forward" (bootstrapping ablation): A_v = rho(V T^T; tau_t), A_t = rho(T V^T; tau_t).
      - detach_targets=True (default): no gradient through A; False back-propagates through it as well.
      - An empty aligned (unaligned) set makes its part 0 instead of dividing by zero: with alpha = 0.3 and
        every row aligned the loss is 0.3 x `clip_loss`.
      - distributed (see `alignlab.losses.distributed`): the means run over the GLOBAL aligned / unaligned
        sets (the mask is gathered). "local": rank r sums its rows only and returns W x its share of each
        global mean (W = world size), so the mean over ranks equals the single-process value.

    Cost: one fused pass (`_FusedPSD`) that reuses the student similarity matrices for the targets and
    weights rows instead of splitting the batch; it saves one N x N gradient per direction, as much as
    `clip_loss` saves. Not twice differentiable.
    """
    _check_arguments(image_features, text_features, alpha, aligned_mask, teacher_temperature, prediction)
    aligned_mask = aligned_mask.to(image_features.device)
    batch = gather_features(image_features, text_features, distributed)
    row_aligned = gather_row_values(aligned_mask, distributed)
    dtype = compute_dtype(image_features)
    n_aligned = gather_column_values(aligned_mask, distributed).sum().to(dtype)
    n_unaligned = batch.image_cols.shape[0] - n_aligned
    # Columns / rows is W in local mode (each rank holds 1/W of the rows) and 1 otherwise; / 2 directions.
    row_share = (batch.image_cols.shape[0] // batch.image_rows.shape[0]) / 2
    # clamp: an empty set has no rows to weight, the clamp only keeps the division finite.
    aligned_weights = row_aligned * (alpha * row_share / n_aligned.clamp(min=1))
    unaligned_weights = ~row_aligned * ((1 - alpha) * row_share / n_unaligned.clamp(min=1))
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), dtype=dtype, device=image_features.device)
    return _FusedPSD.apply(
        batch.image_rows, batch.text_cols, batch.text_rows, batch.image_cols, logit_scale, row_aligned,
        aligned_weights, unaligned_weights, batch.positive_columns(), 1 / teacher_temperature,
        prediction == "swapped", alpha < 1, detach_targets,
    )


@torch.no_grad()
def psd_target_diagnostics(image_features: torch.Tensor, text_features: torch.Tensor, aligned_mask: torch.Tensor,
                           teacher_temperature: float = 0.1, prediction: str = "swapped") -> dict[str, torch.Tensor]:
    """How informative PSD's self-distilled targets are, on this rank's unaligned rows against this rank's
    columns (a diagnostic, not the loss): `psd/target_diag_mass`, the mean probability the targets A_v, A_t give
    a row's own pair (1/n for uniform targets, 1 for the hard label), and `psd/target_entropy`, their mean
    entropy over ln n (1: uniform, 0: one-hot). Targets near uniform early in training turn the unaligned part
    into a pull towards indifference, which is where PSD from a random initialisation can lose to CLIP.
    With no unaligned row every target is a hard label: mass 1, entropy 0."""
    sims = image_features.float() @ text_features.float().T  # V T^T; T V^T is its transpose
    first, second = (sims.T, sims) if prediction == "swapped" else (sims, sims.T)
    unaligned = ~aligned_mask.cpu()  # the partition is drawn on the host: no device sync to test it
    n = sims.shape[0]
    if not bool(unaligned.any()) or n < 2:
        return {"psd/target_diag_mass": sims.new_tensor(1.0), "psd/target_entropy": sims.new_tensor(0.0)}
    rows = unaligned.to(sims.device)
    targets = torch.stack([first[rows], second[rows]]).div(teacher_temperature).softmax(dim=-1)  # [2, u, n]
    own = torch.arange(n, device=sims.device)[rows]
    diag = targets.gather(-1, own.view(1, -1, 1).expand(2, -1, 1))
    entropy = -(targets * targets.clamp_min(1e-30).log()).sum(-1) / math.log(n)
    return {"psd/target_diag_mass": diag.mean(), "psd/target_entropy": entropy.mean()}


class _FusedPSD(torch.autograd.Function):
    """Both directions of the PSD loss, with their gradients w.r.t. the logits computed in the forward pass.

    Row i has weight w_a (aligned) or w_u (unaligned), P = rho(L) and target one-hot e_pos or A:
    dloss/dL_i = (w_a + w_u) P_i - w_a e_pos - w_u A_i. Both directions share one [2, n, N] similarity
    buffer (one op per step for both), which is turned into that gradient in place and saved instead of
    log-probabilities plus targets: PSD's time and memory stay at CLIP's (docs/methods.md "PSD": "same time per
    iteration and same memory"; benchmarks/loss_cost.py), and the backward is four matmuls.
    """

    @staticmethod
    def forward(ctx, image_rows, text_cols, text_rows, image_cols, scale, row_aligned, aligned_weights,
                unaligned_weights, positives, inverse_teacher_temperature, swapped, use_targets, detach_targets):
        dtype = compute_dtype(image_rows)
        s = scale.detach().to(dtype).reshape(())
        sims = similarities(image_rows, text_cols, text_rows, image_cols, dtype)
        maxima = sims.amax(2, keepdim=True)
        positives = positives.view(1, -1, 1).expand(2, -1, 1)
        positive_sims = sims.gather(2, positives).sum(0)[:, 0]  # v_i . t_i + t_i . v_i
        aligned_w, unaligned_w = aligned_weights.view(1, -1, 1), unaligned_weights.view(1, -1, 1)
        # The target of direction d comes from sims[teacher_of[d]] (docs/methods.md "PSD": swapped or forward).
        teacher_of = (1, 0) if swapped else (0, 1)
        targets = teacher_grads = None
        corrections = torch.zeros_like(sims[:, :, 0])
        unaligned_value = torch.zeros((), dtype=dtype, device=sims.device)
        if use_targets:
            # First, while the similarities are intact: targets[k] = w_u rho(sims[k]; tau_t), a new buffer.
            targets = torch.sub(sims, maxima).mul_(inverse_teacher_temperature).exp_()
            target_totals = targets.sum(2, keepdim=True)
            if not detach_targets:
                students = sims[list(teacher_of)]  # students[k] uses targets[k] (teacher_of is an involution)
                teacher_grads = _teacher_grads(targets, target_totals, students, inverse_teacher_temperature,
                                               unaligned_w)
                # Their part of sum_k G_ik sim_ik, which the backward must not pass on to s.
                corrections = (teacher_grads * sims).sum(2)
            targets.mul_(unaligned_w / target_totals)
            for direction, teacher in enumerate(teacher_of):
                # The -A . L part of H(A, rho(L)) = lse(L) - A . L, summed over the weighted rows.
                unaligned_value -= s * torch.dot(targets[teacher].flatten(), sims[direction].flatten())
        # Then the similarities become dloss/dL, in place.
        probs = sims.sub_(maxima).mul_(s).exp_()
        totals = probs.sum(2, keepdim=True)
        log_partitions = (totals.log() + s * maxima).sum(0)[:, 0]  # lse of both directions, per row
        grads = probs.mul_((aligned_w + unaligned_w) / totals)
        grads.scatter_add_(2, positives, (-aligned_w).expand(2, -1, 1))
        if targets is not None:
            for direction, teacher in enumerate(teacher_of):
                grads[direction].sub_(targets[teacher])
        if teacher_grads is not None:
            grads.add_(teacher_grads)
        # sum_i w_i H_i over both directions: H_i = lse_i - L_i,pos (aligned) or lse_i - A_i . L_i (unaligned).
        aligned_value = torch.dot(aligned_weights, log_partitions - s * positive_sims)
        unaligned_value += torch.dot(unaligned_weights, log_partitions)
        ctx.save_for_backward(image_rows, text_cols, text_rows, image_cols, scale, row_aligned, grads,
                              corrections)
        ctx.square = image_rows is image_cols and text_rows is text_cols
        return aligned_value, unaligned_value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_aligned, grad_unaligned):
        image_rows, text_cols, text_rows, image_cols, scale, row_aligned, grads, corrections = ctx.saved_tensors
        row_grad = torch.where(row_aligned, grad_aligned, grad_unaligned).to(grads.dtype)
        s = scale.detach().to(grads.dtype).reshape(())
        if ctx.square:  # one tensor is both rows and columns: its gradient goes to one slot, in two matmuls
            image_grad, text_grad, scale_sum = square_grads(grads[0], grads[1], image_rows, text_rows, row_grad)
            image_rows_grad = image_grad.mul_(s.to(image_grad.dtype))
            text_rows_grad = text_grad.mul_(s.to(text_grad.dtype))
            text_cols_grad = image_cols_grad = None
        else:
            image_rows_grad, text_cols_grad, scale_it = _direction_grads(grads[0], image_rows, text_cols, row_grad, s)
            text_rows_grad, image_cols_grad, scale_ti = _direction_grads(grads[1], text_rows, image_cols, row_grad, s)
            scale_sum = scale_it + scale_ti
        scale_grad = None
        if ctx.needs_input_grad[4]:
            scale_grad = scale_sum - torch.dot(row_grad, corrections.sum(0))
            scale_grad = scale_grad.to(scale.dtype).reshape(scale.shape)
        return (image_rows_grad, text_cols_grad, text_rows_grad, image_cols_grad, scale_grad,
                None, None, None, None, None, None, None, None)


def _direction_grads(logit_grad, rows, cols, row_grad, s):
    """Gradients of rows, cols and s for L = s rows cols^T, given dloss/dL = diag(row_grad) logit_grad."""
    compute_dtype = logit_grad.dtype
    logit_grad = logit_grad.to(rows.dtype)
    weighted_rows = rows * row_grad[:, None].to(rows.dtype)
    grad_times_cols = logit_grad @ cols
    # dloss/ds = sum_ik row_grad_i G_ik sim_ik = sum_i (row_grad_i rows_i) . (G cols)_i
    scale_grad = torch.dot(weighted_rows.flatten().to(compute_dtype), grad_times_cols.flatten().to(compute_dtype))
    rows_grad = grad_times_cols.mul_((row_grad * s)[:, None].to(rows.dtype))
    cols_grad = (logit_grad.T @ weighted_rows).mul_(s.to(rows.dtype))
    return rows_grad, cols_grad, scale_grad


def _teacher_grads(targets, totals, students, inverse_temperature, unaligned_w):
    """Gradient of -sum_i w_u,i A_i . log rho(L_i) w.r.t. the teacher similarities, with A = rho(sim; tau_t)
    (`targets` unnormalised, row sums `totals`) and L = s `students`, in logit units (the backward
    multiplies by s): d/dZ of -w_u A . log p with A = rho(Z) is -w_u A (L - A . L), and Z = sim / tau_t."""
    expected = (targets * students).sum(2, keepdim=True) / totals
    return (students - expected).mul_(targets).mul_(-unaligned_w * inverse_temperature / totals)


def _check_arguments(image_features, text_features, alpha, aligned_mask, teacher_temperature, prediction):
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must both be [n, d] with the same shape")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (the weight of the aligned part, docs/methods.md 'PSD')")
    if not isinstance(aligned_mask, torch.Tensor) or aligned_mask.dtype != torch.bool \
            or aligned_mask.shape != image_features.shape[:1]:
        got = f"{aligned_mask.dtype} {tuple(aligned_mask.shape)}" if isinstance(aligned_mask, torch.Tensor) \
            else type(aligned_mask).__name__
        raise ValueError(f"aligned_mask must be a bool tensor of shape ({image_features.shape[0]},), one flag "
                         f"per pair of this rank; got {got}")
    if not teacher_temperature > 0:
        raise ValueError(f"teacher_temperature={teacher_temperature} must be > 0 (PSD uses 0.1)")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is not one of {PREDICTIONS}")
