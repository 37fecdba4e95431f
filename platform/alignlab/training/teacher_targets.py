"""Teacher targets for one batch (docs/methods.md "DiHT concept distillation"): read from a teacher cache, or from the
teacher run online.

`TeacherTargets(images, indices)` returns what the distillation losses read, on the batch's device:
"objects" / "attributes" (the teacher's top-k distributions [B, K], renormalised), "embedding" (the
teacher's image embedding [B, D], for ED) and "distribution" (that embedding in the student's shared space,
L2-normalised [B, d], DD's soft labels). Cached targets are joined on the training source's sample index
(`TeacherCache.lookup`), so they follow the sample whatever the batch order, rank or resume point.
Online, the teacher runs under no_grad on the same augmented images the student sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from alignlab.data.writer import manifest_dataset_hash
from alignlab.losses.distill import keep_top_k

CONCEPTS = ("objects", "attributes")


class TeacherTargets:
    """Per-batch teacher targets from exactly one of `cache` (a `TeacherCache`) or `teacher` (a `Teacher`).

    names: the targets the losses need (concept names and/or "embedding"); k: top-k kept per concept
    distribution (a cache built with a larger k is cut down to k and renormalised); project: maps a
    teacher embedding into the student's shared space (only when DD is on).
    """

    def __init__(self, names: Sequence[str], *, cache=None, teacher=None, k: int = 10,
                 input_mean: Sequence[float] = (), input_std: Sequence[float] = (),
                 project: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if (cache is None) == (teacher is None):
            raise ValueError("TeacherTargets needs exactly one of a teacher cache or an online teacher")
        self.names = tuple(names)
        self.cache, self.teacher, self.k = cache, teacher, k
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.project = project

    @property
    def online(self) -> bool:
        return self.teacher is not None

    def __call__(self, images: torch.Tensor, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        device = images.device
        if self.online:
            with torch.no_grad():
                raw = self.teacher(images, input_mean=self.input_mean, input_std=self.input_std)
                if "tokens" in self.names:
                    raw["tokens"] = self.teacher.tokens(images, input_mean=self.input_mean, input_std=self.input_std)
            found = {name: F.softmax(raw[name].float(), dim=-1) if name in CONCEPTS else raw[name].float()
                     for name in self.names}
        else:
            indices = torch.as_tensor(indices, dtype=torch.long).cpu()
            looked_up = self.cache.lookup(indices)
            found = {name: looked_up[name].to(device, non_blocking=True).float() for name in self.names}
        targets = {name: keep_top_k(value, self.k) if name in CONCEPTS else value for name, value in found.items()}
        if self.project is not None:
            with torch.no_grad():
                targets["distribution"] = self.project(targets["embedding"])
        return targets


def target_sizes(names: Sequence[str], *, cache=None, teacher=None, image_size: int = 64,
                 device: torch.device | str = "cpu") -> dict[str, int]:
    """Width of each target: classes per concept, D for the embedding. From the cache's metadata, or
    from one forward pass of the teacher on a blank image (the teacher does not declare its width)."""
    if cache is not None:
        sizes = dict(cache.num_classes) | {"embedding": cache.embedding_dim}
    else:
        blank = torch.zeros(1, 3, image_size, image_size, device=device)
        with torch.no_grad():
            out = teacher(blank, input_mean=teacher.mean, input_std=teacher.std)
            if "tokens" in names:
                out["tokens"] = teacher.tokens(blank, input_mean=teacher.mean, input_std=teacher.std)
        sizes = {name: int(value.shape[-1]) for name, value in out.items()}
    return {name: int(sizes[name]) for name in names}


def open_teacher_source(distill, data_root, device: torch.device | str = "cpu", *, source=None,
                        image_size: int | None = None, train: str = "train"):
    """`(cache, None)` when `distill.cache` is set (a URI, or "auto": built or found first), else
    `(None, teacher)` with the teacher loaded onto `device` for online targets. A cache must hold every
    target the enabled losses need, with at least the configured top-k, and match the training data
    (its dataset hash, and the sample keys of `source` when given)."""
    names = distill.needed_targets()
    if distill.cache is None:
        teacher = _load_teacher(distill)
        missing = [name for name in names if name not in teacher.target_names + ("tokens",)]  # tokens: Teacher.tokens
        if missing:
            raise ValueError(f"distill.teacher={distill.teacher!r} gives targets {list(teacher.target_names)} but the "
                             f"enabled losses need {missing}: use a teacher folder from `alignlab teacher train` "
                             "for concept targets")
        return None, teacher.to(device)
    from alignlab.teachers.cache import TeacherCache

    if distill.cache == "auto":
        uri = prepare_teacher_cache(distill, data_root, device, image_size=image_size, train=train)
    else:
        uri = distill.cache
    cache = TeacherCache.open(uri, expected_dataset_hash=manifest_dataset_hash(data_root), source=source)
    missing = [name for name in names if name not in cache.targets]
    if missing:
        raise ValueError(f"teacher cache {uri} holds targets {list(cache.targets)} but the enabled losses need "
                         f"{missing}: rebuild it with `alignlab teacher cache` asking for them")
    if distill.concepts.names and cache.k < distill.concepts.k:
        raise ValueError(f"distill.concepts.k={distill.concepts.k} but teacher cache {uri} keeps only the top "
                         f"{cache.k}: lower k or rebuild the cache with k >= {distill.concepts.k}")
    return cache, None


def auto_cache_root(data_root) -> str:
    """Where distill.cache=auto keeps caches: next to the data, one content-addressed folder per
    (teacher weights, dataset, transform, targets, k)."""
    return str(Path(data_root) / "teacher-caches")


def prepare_teacher_cache(distill, data_root, device: torch.device | str = "cpu", *, image_size: int | None = None,
                          train: str = "train") -> str:
    """distill.cache=auto: the URI of this teacher's cache for the data at `data_root` (view 0: the student's
    eval transform), built first unless a complete one exists. Under torchrun rank 0 builds it while the
    other ranks wait, then they find it complete."""
    from alignlab.teachers.cache import build_teacher_cache
    from alignlab.training.distributed import barrier

    if str(data_root).startswith("s3://"):
        raise ValueError(f"distill.cache=auto builds the cache next to local data, but data.root is {data_root}: "
                         "build it with `alignlab teacher cache` and set distill.cache to its URI")
    teacher = _load_teacher(distill).to(device)
    kwargs = {"targets": distill.needed_targets(), "k": distill.concepts.k, "image_size": image_size, "train": train}
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if main:
        uri = build_teacher_cache(teacher, Path(data_root), auto_cache_root(data_root), progress=True, **kwargs)
    barrier()
    if not main:
        uri = build_teacher_cache(teacher, Path(data_root), auto_cache_root(data_root), **kwargs)
    return uri


def _load_teacher(distill):
    from alignlab.teachers import load_teacher

    return load_teacher(distill.teacher, arch=distill.teacher_arch, kwargs=distill.teacher_kwargs)


