"""The thesis' own evaluation of a distilled image tower (section 3.1.1.3, Eq 42, Code 1; docs/methods.md
"Unimodal layer-averaged distillation"): the encoder's patch tokens (CLS and other prefix tokens dropped) are
averaged, layer-normalised and classified by one linear layer,

    y = W LN( 1/N sum_n h_n ) + b

trained on a classification task's train split, the epoch chosen by val top-1, scored on test. probe: the
encoder frozen (only LN and W train); finetune: everything trains, lr_l = lr x layer_decay^(L+1-l) (timm's
`param_groups_layer_decay`: 0 = embeddings, L+1 = the head). The recipe is timm's: RandAugment and random
erasing in the train transform, Mixup/CutMix with soft-target cross entropy (label smoothing alone without
mixing), AdamW and a cosine schedule with linear warm-up.

This differs from `linear_probe.py` (CLIP's protocol: logistic regression on frozen pooled embeddings).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn

from alignlab.data.transforms import CLIP_MEAN, CLIP_STD
from alignlab.evaluate.datasets import load_class_folders
from alignlab.task_config import ImageClassifierConfig
from alignlab.training.builders import seed_everything
from alignlab.training.checkpoint import rng_state, set_rng_state
from alignlab.training.optim import build_scheduler, warmup_steps_for


class PatchMeanClassifier(nn.Module):
    """A timm ViT-like encoder -> mean of its patch tokens -> LN -> Linear (Eq 42)."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        if not callable(getattr(encoder, "group_matcher", None)):
            raise ValueError(f"{type(encoder).__name__} has no timm group_matcher: layer-wise lr decay needs a "
                             "timm ViT-like image tower")
        self.encoder = encoder
        self.prefix_tokens = int(getattr(encoder, "num_prefix_tokens", 1))
        self.norm = nn.LayerNorm(encoder.num_features)
        self.head = nn.Linear(encoder.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)
        if tokens.ndim != 3:
            raise ValueError(f"the image tower gives features of shape {tuple(tokens.shape)}, not patch tokens")
        return self.head(self.norm(tokens[:, self.prefix_tokens:].mean(dim=1)))

    def group_matcher(self, coarse: bool = False) -> dict:
        """The encoder's layer groups under `encoder.` (the head falls in the last group: lr x 1)."""
        def prefixed(pattern: str) -> str:
            return r"^encoder\.(?:" + pattern.removeprefix("^") + ")"

        out = {}
        for name, rule in self.encoder.group_matcher(coarse).items():
            out[name] = (prefixed(rule) if isinstance(rule, str)
                         else [(prefixed(pattern), suffix) for pattern, suffix in rule])
        return out


class _Folder(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], labels: torch.Tensor, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


@torch.no_grad()
def _top1(model: nn.Module, loader, device) -> float:
    model.eval()
    hits = total = 0
    for images, labels in loader:
        hits += int((model(images.to(device)).argmax(-1).cpu() == labels).sum())
        total += len(labels)
    return 100.0 * hits / max(total, 1)


def black_image_posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, with Pillow < 13's answer for 0 bits kept (an all-black image). RandAugment's
    'PosterizeIncreasing' keeps 4 - int(magnitude * 0.4) bits, so 0 at magnitude 10, which timm's default string
    (rand-m9-mstd0.5-inc1: magnitude ~ N(9, 0.5), clipped to [0, 10]) reaches on about 2 % of its draws; Pillow 13
    raises on 0 bits and killed the fine-tune a few hundred images in."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def with_pillow_safe_posterize(transform):
    """`transform` (timm's create_transform output) with every RandAugment posterize op using
    `black_image_posterize`: the same recipe, runnable on Pillow 13. Other ops are untouched."""
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is timm_auto_augment.posterize:
                op.aug_fn = black_image_posterize
    return transform


def train_image_classifier(encoder: nn.Module, task_root: Path, settings: ImageClassifierConfig, image_size: int,
                           eval_transform, *, seed: int = 0, hflip: float = 0.0) -> dict[str, float]:
    """Probe or fine-tune a copy of `encoder` on `task_root/{train,val,test}` (class folders); returns
    {"top1": test top-1 of the best-val epoch, "val_top1", "best_epoch"} in percent. `encoder` is not changed.
    One seed, one result: timm's crops and RandAugment draw from Python's `random` and Mixup from numpy's, so
    all three generators are seeded for the call (and the caller's states given back after); two evaluations of
    the same tower differed before."""
    caller_state = rng_state()
    seed_everything(seed)
    try:
        return _train_image_classifier(encoder, task_root, settings, image_size, eval_transform, seed=seed,
                                       hflip=hflip)
    finally:
        set_rng_state(caller_state)


def _train_image_classifier(encoder: nn.Module, task_root: Path, settings: ImageClassifierConfig, image_size: int,
                            eval_transform, *, seed: int, hflip: float) -> dict[str, float]:
    s = settings
    device = next(encoder.parameters()).device
    train_paths, train_labels, classnames, _ = load_class_folders(task_root, "train")
    splits = {split: load_class_folders(task_root, split)[:2] for split in ("val", "test")}
    generator = torch.Generator().manual_seed(seed)
    train_transform = with_pillow_safe_posterize(
        create_transform(image_size, is_training=True, scale=tuple(s.crop_scale), hflip=hflip, color_jitter=0.0,
                         auto_augment=s.rand_augment, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD,
                         re_prob=s.erase))
    batch = min(s.batch_size, len(train_paths)) // 2 * 2  # Mixup pairs a batch with its flip: an even size
    loader = torch.utils.data.DataLoader(_Folder(train_paths, train_labels, train_transform), batch_size=batch,
                                         shuffle=True, drop_last=True, generator=generator)
    evaluation = {split: torch.utils.data.DataLoader(_Folder(*splits[split], eval_transform), batch_size=s.batch_size)
                  for split in splits}

    model = PatchMeanClassifier(copy.deepcopy(encoder), len(classnames)).to(device)
    if s.protocol == "probe":
        model.encoder.requires_grad_(False)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": s.weight_decay}]
    else:
        groups = param_groups_layer_decay(model, weight_decay=s.weight_decay, layer_decay=s.layer_decay,
                                          no_weight_decay_list=_no_weight_decay(model))
        for group in groups:
            group["lr"] = s.lr * group.pop("lr_scale")
    optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=tuple(s.betas), eps=s.eps)
    total = s.epochs * len(loader)
    scheduler = build_scheduler(optimizer, warmup_steps_for(s.warmup, total), total)
    mixing = s.mixup > 0 or s.cutmix > 0
    mixup = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, prob=s.mix_prob, switch_prob=s.switch_prob,
                  label_smoothing=s.smoothing, num_classes=len(classnames)) if mixing else None
    criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(s.smoothing)

    best = {"val_top1": -1.0}
    for epoch in range(s.epochs):
        model.train()
        if s.protocol == "probe":
            model.encoder.eval()  # frozen: its norms and dropout as at inference
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            if mixup is not None:
                images, labels = mixup(images, labels)
            loss = criterion(model(images), labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"eval.image_classifier: the loss is {loss.item()} at epoch {epoch}: "
                                         "lower eval.image_classifier.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        val = _top1(model, evaluation["val"], device)
        if val > best["val_top1"]:
            best = {"val_top1": val, "best_epoch": float(epoch + 1), "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best.pop("state"))
    return {"top1": _top1(model, evaluation["test"], device), **best}


def _no_weight_decay(model: PatchMeanClassifier) -> set[str]:
    names = getattr(model.encoder, "no_weight_decay", lambda: set())()
    return {f"encoder.{name}" for name in names}  # fnmatch patterns; timm's names hold no wildcards
