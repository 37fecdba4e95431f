"""Unimodal layer-averaged distillation, thesis section 3.1.1.1 (Eq 36-41; docs/methods.md "Unimodal
layer-averaged distillation"): the student regresses a target built from every layer of the teacher,

    Y = LN( 1/L sum_l IN_T(H_l) )

IN_T: instance norm of each layer over the tokens (per sample and channel, no affine, eps 1e-5); LN: a
parameter-free LayerNorm over the channels. The student's prediction is the same function of its own
layers (fewer of them), and the loss is the MSE over every token, CLS included.

The text variant of the released code differs in two options, not in the default: no final LN
(`final_ln=False`) and BERT's embedding output counted as a layer (the caller passes it first); its pad
tokens take part in the instance norm but not in the loss (`keep`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-5


def layer_averaged_target(hidden_states: Sequence[torch.Tensor], final_ln: bool = True,
                          eps: float = EPS) -> torch.Tensor:
    """LN(mean_l IN_T(H_l)) of `hidden_states`, a list of [batch, tokens, dim] tensors of one shape (Eq 36-41).

    final_ln=False leaves out the LN (the thesis' text code). Computed in float32 at least (also under AMP)."""
    if len(hidden_states) == 0:
        raise ValueError("layer_averaged_target needs at least one hidden state [batch, tokens, dim]")
    shape = hidden_states[0].shape
    if len(shape) != 3 or any(h.shape != shape for h in hidden_states):
        raise ValueError(f"layer_averaged_target needs hidden states of one shape [batch, tokens, dim], got "
                         f"{[tuple(h.shape) for h in hidden_states]}")
    total = None
    for hidden in hidden_states:
        hidden = hidden if hidden.dtype == torch.float64 else hidden.float()
        normed = F.instance_norm(hidden.transpose(1, 2), eps=eps).transpose(1, 2)  # over tokens, per channel
        total = normed if total is None else total + normed
    mean = total / len(hidden_states)
    return F.layer_norm(mean, mean.shape[-1:], eps=eps) if final_ln else mean


def layer_averaged_kd_loss(prediction: torch.Tensor, target: torch.Tensor,
                           keep: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the student's and the teacher's layer-averaged representations [batch, tokens, dim], over
    every token and channel (thesis Eq 41); `keep` [batch, tokens] bool drops pad tokens (text)."""
    if prediction.shape != target.shape:
        raise ValueError(f"layer-averaged KD: student {tuple(prediction.shape)} and teacher {tuple(target.shape)} "
                         "differ: the student needs the teacher's width and token count")
    squared = (prediction.float() - target.detach().float()).pow(2).mean(dim=-1)  # [batch, tokens]
    if keep is None:
        return squared.mean()
    if keep.shape != squared.shape:
        raise ValueError(f"layer-averaged KD: keep mask {tuple(keep.shape)} does not match the tokens "
                         f"{tuple(squared.shape)}")
    keep = keep.to(squared.dtype)
    return (squared * keep).sum() / keep.sum().clamp(min=1.0)
