"""PSD's progressive schedule and minibatch partitioning (docs/methods.md "PSD"; PSD section 3.3).

alpha(t) decays over training (cosine 0.8 -> 0.2 is the method; linear gives the same results; constant
alpha is the "no progressive distillation" ablation). Each global batch of N pairs is split into
N_a = floor(alpha N) aligned rows and N - N_a unaligned rows.

Which rows are aligned is decided by a per-sample priority: the N_a rows of the global batch with the
lowest priority are aligned. The priority is a pure function of (seed, epoch, sample index) for the
**dynamic** partition, so the global partition is refreshed every epoch, and of (seed, sample index)
for the **static** partition, so a sample keeps its rank for the whole run (with constant alpha the
samples of low priority are aligned throughout). Both are reproducible from the seed, independent of
data workers and identical on every rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_MASK64 = (1 << 64) - 1


def alpha_at(step: int, total_steps: int, schedule: str, start: float, end: float, hold: float = 0.0) -> float:
    """alpha after `step` of `total_steps` optimizer steps: cosine or linear from start to end, or constant.

    `hold` (the named deviation `loss.psd.alpha_hold`; 0 is the paper): alpha = 1, plain InfoNCE, for the
    first `hold` fraction of the steps, and the schedule runs over the rest. From a random initialisation the
    self-distilled targets are uniform (the features have not separated yet) and pull the student towards
    collapse; holding off distillation until the model has left ln N avoids that (docs/methods.md "PSD")."""
    held = math.floor(hold * total_steps)
    if step < held:
        return 1.0
    step, total_steps = step - held, total_steps - held
    if schedule == "constant":
        return start
    progress = min(1.0, step / max(1, total_steps - 1))
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown alpha schedule {schedule!r}; choose cosine, linear or constant")


def _mix(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def partition_priority(indices: torch.Tensor, seed: int, epoch: int, partition: str) -> torch.Tensor:
    """A float64 priority in [0, 1) per sample; lower is aligned first."""
    if partition not in ("dynamic", "static"):
        raise ValueError(f"unknown PSD partition {partition!r}; choose dynamic or static")
    salt = _mix(_mix(seed) ^ (epoch + 1 if partition == "dynamic" else 0))
    return torch.tensor([_mix(salt ^ int(i)) / 2.0**64 for i in indices.tolist()], dtype=torch.float64)


def aligned_mask(indices: torch.Tensor, alpha: float, *, seed: int, epoch: int, partition: str) -> torch.Tensor:
    """Boolean mask over this rank's rows: True for the floor(alpha N) lowest-priority rows of the
    global batch (N = local rows x world size; ranks hold contiguous slices of the global batch)."""
    priority = partition_priority(indices, seed, epoch, partition)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        local = priority.to(device)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        global_priority = torch.cat(gathered).cpu()
        offset = dist.get_rank() * priority.numel()
    else:
        global_priority, offset = priority, 0
    n = global_priority.numel()
    n_aligned = math.floor(alpha * n + 1e-9)
    order = torch.argsort(global_priority, stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:n_aligned]] = True
    return mask[offset:offset + priority.numel()]
