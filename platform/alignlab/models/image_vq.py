"""Image VQ of a frozen teacher's CLS vector, thesis section 3.2.7 (Eq 86-90; docs/methods.md "Image VQ"):

    z = W_down(c)                       (Linear - Tanh - Linear, D -> S, the thesis code)
    m = argmax_j cos(z, e_j)            (the printed "argmin" is a typo)
    q = delta(z) + sg(e_m - delta(z))   (straight-through: the gradient of q flows to z)
    d = Block([W_up q ; masked patches])[CLS]  (one pre-LN block; 90 % of the patches are the mask token)

The codes move by an exponential moving average of the normalised vectors assigned to them (decay 0.99, as
BEiT v2's `NormEMAVectorQuantizer`), never by gradient; the codebook is a buffer of the model, so checkpoints
carry it and a resumed run continues with the same codes. Usage (perplexity of the code distribution,
fraction of codes used) is what the thesis tracks for collapse.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from alignlab.models.frozen_teacher import FrozenTeacherTask


class CosineCodebook(nn.Module):
    """`size` unit-norm codes of width `dim`, EMA-updated in training mode (module docstring)."""

    def __init__(self, size: int, dim: int, decay: float = 0.99):
        super().__init__()
        if size < 2 or dim < 1 or not 0 < decay < 1:
            raise ValueError(f"codebook needs size >= 2, dim >= 1 and 0 < decay < 1, got {size}, {dim}, {decay}")
        self.size, self.decay = size, decay
        codes = F.normalize(torch.randn(size, dim), dim=-1)
        self.register_buffer("codes", codes)
        self.register_buffer("code_sum", codes.clone())  # EMA of the assigned vectors (direction = the code)
        self.register_buffer("cluster_size", torch.zeros(size))  # EMA of the assignment counts (usage)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(straight-through q [B, S], the chosen codes e_m [B, S], indices m [B]) for z [B, S]."""
        unit = F.normalize(z.float(), dim=-1)
        indices = (unit @ self.codes.T).argmax(dim=-1)
        code = self.codes[indices]
        if self.training:
            self._ema_update(unit.detach(), indices)
        return unit + (code - unit).detach(), code, indices

    @torch.no_grad()
    def _ema_update(self, unit: torch.Tensor, indices: torch.Tensor) -> None:
        onehot = F.one_hot(indices, self.size).to(unit.dtype)
        counts, sums = onehot.sum(dim=0), onehot.T @ unit
        if dist.is_available() and dist.is_initialized():  # every rank's assignments move the same codes
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.code_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        hit = counts > 0  # a code no vector chose keeps its direction (BEiT v2's zero mask)
        self.codes.copy_(torch.where(hit[:, None], F.normalize(self.code_sum, dim=-1), self.codes))


def codebook_usage(indices: torch.Tensor, size: int) -> dict[str, float]:
    """{"perplexity": exp(entropy of the code histogram) in [1, size], "usage": fraction of codes used}."""
    counts = torch.bincount(indices.flatten().cpu(), minlength=size).double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "usage": float((counts > 0).sum()) / size}


class ImageVQ(FrozenTeacherTask):
    """`model(images, tokens)` -> {"prediction": d [B, D], "teacher_cls": c [B, D], "z": [B, S], "code": [B, S],
    "indices": [B]} (tokens unused). teacher: an `alignlab.teachers.Teacher` whose embedding is c."""

    def __init__(self, teacher: nn.Module, teacher_dim: int, *, codebook_size: int, code_dim: int = 16,
                 decay: float = 0.99, mask_ratio: float = 0.9, image_size: int, patch_size: int, heads: int,
                 input_mean=(), input_std=(), mask_seed: int = 0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"vq.patch_size={patch_size} does not divide data.image_size={image_size}")
        if teacher_dim % heads:
            raise ValueError(f"vq.decoder_heads={heads} does not divide the teacher's width {teacher_dim}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"vq.mask_ratio={mask_ratio} must be in [0, 1)")
        self.teacher, self.mask_ratio = teacher, mask_ratio
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.down = nn.Sequential(nn.Linear(teacher_dim, teacher_dim), nn.Tanh(), nn.Linear(teacher_dim, code_dim))
        self.codebook = CosineCodebook(codebook_size, code_dim, decay)
        self.up = nn.Linear(code_dim, teacher_dim)
        self.patch_embed = nn.Conv2d(3, teacher_dim, patch_size, stride=patch_size)
        patches = (image_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, patches, teacher_dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, teacher_dim))
        self.decoder = Block(teacher_dim, heads)
        self.norm = nn.LayerNorm(teacher_dim, eps=1e-6)
        # Training masks are a pure function of (seed, batches drawn): the count is checkpointed, so a resumed
        # run masks as an uninterrupted one (the global RNG also serves the data loader's start of an epoch).
        self.mask_seed = mask_seed
        self.register_buffer("mask_draws", torch.zeros((), dtype=torch.long))
        self.freeze_teacher()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """One block: nothing worth checkpointing."""

    def _masked_patches(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        count = math.floor(self.mask_ratio * patches.shape[1] + 0.5)  # exactly this many per image
        generator = None
        if self.training:
            generator = torch.Generator().manual_seed(self.mask_seed * 1_000_003 + int(self.mask_draws))
            self.mask_draws += 1
        noise = torch.rand(patches.shape[:2], generator=generator).to(patches.device)  # eval: the global RNG
        ranks = noise.argsort(dim=1).argsort(dim=1)
        masked = (ranks < count).unsqueeze(-1)
        return torch.where(masked, self.mask_token.to(patches.dtype), patches)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None) -> dict:
        with torch.no_grad():
            teacher_cls = self.teacher(images, input_mean=self.input_mean, input_std=self.input_std)["embedding"]
        z = self.down(teacher_cls.float())
        quantized, code, indices = self.codebook(z)
        sequence = torch.cat([self.up(quantized).unsqueeze(1).to(images.dtype), self._masked_patches(images)], dim=1)
        prediction = self.norm(self.decoder(sequence))[:, 0]
        return {"prediction": prediction, "teacher_cls": teacher_cls, "z": z, "code": code, "indices": indices}
