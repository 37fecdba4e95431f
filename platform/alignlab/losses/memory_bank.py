"""A FIFO memory bank of past teacher vectors, the extra negatives of the contrastive target loss (thesis
section 3.2.6.3, Eq 84-85; docs/methods.md, "Thesis methods").

Safe where a bank of past *student* vectors collapses (thesis Table 21): the teacher is frozen, so old
entries never go stale. The bank is a module whose state lives in buffers, so it is saved and restored with
the model's state dict and a resumed run continues with the same negatives, bit for bit.

Slots not yet written are left out of the negatives (`negatives()` returns only filled slots). The thesis'
code instead starts from random positive-orthant unit vectors; `init="random"` reproduces that reading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.losses.distributed import gather_column_values

INITS = ("empty", "random")


class TeacherMemoryBank(nn.Module):
    """`size` past teacher vectors of width `dim`, oldest overwritten first."""

    def __init__(self, size: int, dim: int, init: str = "empty", seed: int = 0):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"memory bank size and dim must be >= 1, got size={size}, dim={dim}")
        if init not in INITS:
            raise ValueError(f"memory bank init {init!r} is not one of {INITS}")
        queue = torch.zeros(size, dim)
        filled = 0
        if init == "random":
            generator = torch.Generator().manual_seed(seed)
            queue = F.normalize(torch.rand(size, dim, generator=generator), dim=-1)
            filled = size
        self.register_buffer("queue", queue)
        self.register_buffer("pointer", torch.tensor(0, dtype=torch.long))
        self.register_buffer("filled", torch.tensor(filled, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def negatives(self) -> torch.Tensor:
        """The filled slots [filled, dim] (no gradient), to follow the batch's columns in the loss."""
        return self.queue[: int(self.filled)].detach()

    @torch.no_grad()
    def push(self, teacher_features: torch.Tensor, distributed: str = "none") -> None:
        """Enqueue this step's teacher vectors (gathered over ranks, so every rank keeps the same bank), after
        the loss has used the bank. With more vectors than slots only the newest `size` are kept."""
        vectors = gather_column_values(teacher_features.detach(), distributed).to(self.queue)
        if vectors.ndim != 2 or vectors.shape[1] != self.queue.shape[1]:
            raise ValueError(f"memory bank holds [*, {self.queue.shape[1]}] vectors, got {tuple(vectors.shape)}")
        vectors = vectors[-self.size:]
        slots = (int(self.pointer) + torch.arange(vectors.shape[0])) % self.size
        self.queue[slots.to(self.queue.device)] = vectors
        self.pointer.fill_((int(self.pointer) + vectors.shape[0]) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + vectors.shape[0]))


class FeatureQueue(TeacherMemoryBank):
    """The same FIFO for vectors the student makes: the student memory bank (thesis Tables 20-21) and the
    momentum encoder's queues (Table 22). Unlike teacher vectors these go stale as the weights move."""
