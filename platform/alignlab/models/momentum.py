"""The momentum encoder of the thesis' section 3.2.4.3.2 (Eq 70, Table 22; MoCo, ALBEF; docs/methods.md, "Thesis
methods"): an exponential moving average of the whole student, whose h'' vectors of the batch are the
contrastive loss' positives and batch negatives, and whose past vectors fill one FIFO queue per modality.

    theta_k = m theta_k + (1 - m) theta_q        (m = 0.995)

As the thesis does (to free its activations before the student's), `step` updates the copy and runs it before
the student's forward pass. Parameters and queues are buffers or frozen parameters of a submodule of the
student, so checkpoints carry them and a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumEncoder(nn.Module):
    """A frozen copy of `student` (made at construction) and its (image, text) queues
    (`alignlab.losses.FeatureQueue`), or None for the batch alone."""

    def __init__(self, student: nn.Module, momentum: float, layer: str = "h2",
                 queues: tuple[nn.Module, nn.Module] | None = None, drop: tuple[str, ...] = ()):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum m={momentum} must be in [0, 1)")
        self.momentum, self.layer = momentum, layer
        self.model = copy.deepcopy(student).requires_grad_(False)
        for name in drop:  # training-only modules of the student (banks, heads) are not part of the copy
            setattr(self.model, name, None)
        self.image_queue, self.text_queue = queues or (None, None)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Eq 70 on every parameter of the copy (by name, from `student`); buffers are copied as they are."""
        params = dict(student.named_parameters())
        names = [name for name, _ in self.model.named_parameters()]
        torch._foreach_lerp_([p for _, p in self.model.named_parameters()], [params[n].detach() for n in names],
                             1.0 - self.momentum)
        buffers = dict(student.named_buffers())
        for name, buffer in self.model.named_buffers():
            buffer.copy_(buffers[name])

    @torch.no_grad()
    def step(self, student: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update from `student`, then the copy's L2-normalised (image, text) vectors of `layer` for the batch."""
        self.update(student)
        outputs = self.model(images, tokens)
        return outputs["layers"][self.model.layer_names.index(self.layer)]
