"""`alignlab teacher train`: a small supervised image teacher on SynthCaps plus DiHT concept heads.

(a) Supervised backbone (stand-in for SWAG / ResNet-50-A1, docs/methods.md "DiHT concept distillation" and "S-SMKE"):
a timm model, by default the
    student's image tower (same name and kwargs as `model.image`), trained from scratch with a multi-label
    head on the generator's TRUE labels from each sample's metadata: shapes (objects), colours and sizes
    (attributes); a softmax cross entropy per label group (`label_loss`; binary cross entropy is the option
    `loss: bce`), AdamW, cosine schedule. A held-out part of the training pairs
    measures per-group accuracy (is the top-scoring shape / colour / size among the image's true ones).
(b) Concept heads on the frozen backbone (`alignlab.teachers.concepts`), trained on concepts parsed from
    the (possibly noisy) captions.

Writes into the output folder: `teacher.json` (arch, kwargs, concept vocabularies, label names,
normalisation, image size, training summary), `teacher.pth` (the `Teacher` state dict: backbone,
true-label head, concept heads) and `backbone.pth` (the headless timm state dict, loadable with
`model.image.pretrained=<dir>/backbone.pth`). teacher.json is written last, so a folder without it is
an unfinished run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from PIL import Image

from alignlab.data.dataset import open_train_source, sample_aug_seed
from alignlab.data.skips import CorruptSampleError
from alignlab.data.synth.scene import COLOR_NAMES, SHAPES, SIZES
from alignlab.data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform
from alignlab.storage.torch_files import atomic_torch_save
from alignlab.teachers.concepts import (build_vocabulary, caption_concepts, concept_targets,
                                        resampling_weights, top1_in_concepts, train_concept_head)
from alignlab.teachers.registry import (BACKBONE_WEIGHTS, CONCEPT_HEADS, TEACHER_JSON, TEACHER_WEIGHTS, Teacher,
                                        TimmBackbone, state_dict_hash)
from alignlab.teachers.settings import ConceptSettings, TeacherSettings

log = logging.getLogger(__name__)

LABEL_GROUPS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZES}
LABEL_NAMES: list[str] = [name for names in LABEL_GROUPS.values() for name in names]


# The supervised backbone's fixed recipe (AdamW, linear warm-up then cosine, mild random crops)
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.1
CROP_SCALE = (0.9, 1.0)


def default_arch() -> tuple[str, dict[str, Any], int]:
    """(timm name, kwargs, image size) of the default experiment config's image tower (the student's)."""
    from alignlab.config import load_config

    cfg = load_config(None, [])
    return cfg.model.image.name, dict(cfg.model.image.kwargs), cfg.data.image_size


def true_labels(meta: dict, where: str) -> torch.Tensor:
    """Multi-hot [len(LABEL_NAMES)] of the shapes, colours and sizes of the sample's true objects."""
    objects = meta.get("objects")
    if not objects:
        raise ValueError(f"{where}: sample metadata has no 'objects' (true labels); teacher train needs SynthCaps "
                         "train shards with their <key>.json metadata")
    labels = torch.zeros(len(LABEL_NAMES))
    offset = 0
    for group, names in LABEL_GROUPS.items():
        for obj in objects:
            if obj.get(group) not in names:
                raise ValueError(f"{where}: object {obj} has {group}={obj.get(group)!r}, not one of {names}")
            labels[offset + names.index(obj[group])] = 1.0
        offset += len(names)
    return labels


def load_training_set(data_root: Path, train: str = "train"
                      ) -> tuple[list[Image.Image], list[str], torch.Tensor, list[str]]:
    """(images, captions, true labels [N, L], sample keys) of every training pair, decoded once."""
    source = open_train_source("webdataset", str(Path(data_root) / train))
    images, captions, labels, keys, corrupt = [], [], [], [], list(source.skipped)
    for index in range(len(source)):
        try:
            image, caption, meta = source.get(index)
        except CorruptSampleError as err:
            corrupt.append(err.record)
            continue
        images.append(image)
        captions.append(caption)
        labels.append(true_labels(meta, f"{meta['__url__']}:{meta['__key__']}"))
        keys.append(meta["__key__"])
    if corrupt:
        log.warning("%d corrupt training sample(s) skipped, first: %s:%s (%s)", len(corrupt), corrupt[0]["shard"],
                    corrupt[0]["key"], corrupt[0]["reason"])
    return images, captions, torch.stack(labels), keys


def _split(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(n * holdout)))
    if held >= n:
        raise ValueError(f"holdout={holdout} of {n} samples leaves nothing to train on")
    return order[held:].sort().values, order[:held].sort().values


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def label_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "group_ce") -> torch.Tensor:
    """The supervised teacher's loss on [B, len(LABEL_NAMES)] logits and multi-hot true labels.

    group_ce: the sum over label groups g (shape, colour, size) of the batch mean of
    -sum_{c in g} t_c log softmax(z_g)_c, where t = y_g / sum(y_g) spreads the group's target evenly over the
    image's true labels (two objects of different shapes: 1/2 each). bce: binary cross entropy with logits,
    the mean over all labels. On SynthCaps bce learns colour and size and leaves shape near chance (its easy
    labels dominate the mean); group_ce learns shape with the same tower, data and steps
    (benchmarks/teacher_recipe.py)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels)
    if kind != "group_ce":
        raise ValueError(f"teacher loss {kind!r}: choose group_ce or bce")
    total, offset = logits.new_zeros(()), 0
    for names in LABEL_GROUPS.values():
        target = labels[:, offset:offset + len(names)]
        target = target / target.sum(dim=1, keepdim=True).clamp_min(1)
        total = total + -(target * F.log_softmax(logits[:, offset:offset + len(names)], dim=1)).sum(dim=1).mean()
        offset += len(names)
    return total


def train_backbone(model: torch.nn.Module, images: list[Image.Image], labels: torch.Tensor, rows: torch.Tensor,
                   config: TeacherSettings) -> list[float]:
    """Supervised training of `model` (timm, num_classes = len(LABEL_NAMES)) with `label_loss` of
    `config.loss`; returns the mean loss per epoch."""
    transform = build_image_transform(config.image_size, train=True, crop_scale=CROP_SCALE)
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=WEIGHT_DECAY)
    warmup = int(total * WARMUP_FRACTION)
    epoch_losses, step = [], 0
    model.train()
    for epoch in range(config.epochs):
        order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))]
        total_loss = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size].tolist()
            x = torch.stack([transform(images[i], random.Random(sample_aug_seed(config.seed, epoch, i)))
                             for i in batch])
            loss = label_loss(model(x), labels[batch], config.loss)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, warmup, config.lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            step += 1
        epoch_losses.append(total_loss / len(order))
        log.info("teacher epoch %d/%d: loss %.4f", epoch + 1, config.epochs, epoch_losses[-1])
    model.eval()
    return epoch_losses


@torch.no_grad()
def embed_and_classify(model: torch.nn.Module, images: list[Image.Image], image_size: int,
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-logits features [N, D], label logits [N, L]) of every image under the eval transform."""
    transform = build_image_transform(image_size, train=False)
    backbone = TimmBackbone(model).eval()
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        x = torch.stack([transform(image) for image in images[start:start + batch_size]])
        embedding, label_logits = backbone(x)
        features.append(embedding)
        logits.append(label_logits)
    return torch.cat(features), torch.cat(logits)


def label_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per label group: `top1` = fraction of images whose top-scoring class of the group is a true one;
    `chance` = the same for a uniformly random guess (mean of #true / #classes)."""
    out, offset = {}, 0
    for group, names in LABEL_GROUPS.items():
        block_logits, block_labels = logits[:, offset:offset + len(names)], labels[:, offset:offset + len(names)]
        hit = block_labels.gather(1, block_logits.argmax(dim=1, keepdim=True)).squeeze(1)
        out[group] = {"top1": float(hit.mean()), "chance": float(block_labels.sum(1).mean() / len(names))}
        offset += len(names)
    return out


def train_teacher(data_root: str | Path, out_dir: str | Path, config: TeacherSettings | None = None,
                  train: str = "train") -> dict:
    """Train the supervised backbone and the concept heads on SynthCaps at `data_root`; write the teacher
    folder `out_dir` (see the module docstring) and return teacher.json's content. Without `config.arch` the
    teacher is the default experiment config's image tower."""
    config = config or TeacherSettings()
    if not config.arch or not config.image_size:
        config = config.with_default_arch(*default_arch())
    name = config.arch.removeprefix("timm:")
    if not timm.is_model(name):
        raise ValueError(f"teacher arch {config.arch!r} is not a timm model; list candidates with timm.list_models()")
    out_dir = Path(out_dir)
    (out_dir / TEACHER_JSON).unlink(missing_ok=True)  # a crash below leaves an unfinished-looking folder
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    images, captions, labels, keys = load_training_set(Path(data_root), train)
    train_rows, held_rows = _split(len(images), config.holdout, config.seed)
    model = timm.create_model(name, pretrained=False, num_classes=len(LABEL_NAMES), **config.kwargs)
    epoch_losses = train_backbone(model, images, labels, train_rows, config)
    supervised_seconds = time.perf_counter() - started

    features, label_logits = embed_and_classify(model, images, config.image_size)
    concepts_started = time.perf_counter()
    parsed = caption_concepts(captions)
    heads, vocabularies, concept_summary = {}, {}, {}
    for head_name in CONCEPT_HEADS:
        head, vocab, summary = _fit_concept_head(parsed[head_name], features, train_rows, held_rows, config.concepts,
                                                  config.seed)
        heads[head_name], vocabularies[head_name], concept_summary[head_name] = head, vocab, summary

    teacher = Teacher(TimmBackbone(model), mean=CLIP_MEAN, std=CLIP_STD, image_size=config.image_size,
                      has_logits=True, heads=heads, concepts=vocabularies, label_names=LABEL_NAMES,
                      source=str(out_dir))
    summary = {
        "num_samples": len(images), "num_train": len(train_rows), "num_holdout": len(held_rows),
        "epochs": config.epochs, "loss_per_epoch": [round(v, 5) for v in epoch_losses],
        "holdout_accuracy": label_accuracy(label_logits[held_rows], labels[held_rows]),
        "train_accuracy": label_accuracy(label_logits[train_rows], labels[train_rows]),
        "concept_heads": concept_summary,
        "seconds": {"supervised": round(supervised_seconds, 2),
                    "concept_heads": round(time.perf_counter() - concepts_started, 2),
                    "total": round(time.perf_counter() - started, 2)},
    }
    return _write_teacher(out_dir, teacher, model, config, name, data_root, summary)


def _fit_concept_head(concepts: list[list[str]], features: torch.Tensor, train_rows: torch.Tensor,
                      held_rows: torch.Tensor, config: ConceptSettings, seed: int):
    """Vocabulary from the training part, head trained on its rows that have a target, held-out top-1."""
    train_concepts = [concepts[i] for i in train_rows.tolist()]
    vocab, counts = build_vocabulary(train_concepts, config.min_count)
    if not vocab:
        raise ValueError(f"no concept occurs in >= min_count={config.min_count} training captions; lower "
                         "--min-count or use more data")
    targets, has_target = concept_targets(concepts, vocab)
    weights = resampling_weights(concepts, vocab, counts)
    fit = train_rows[has_target[train_rows]]
    head, stats = train_concept_head(features[fit], targets[fit], weights[fit], config, seed=seed)
    held = held_rows[has_target[held_rows]]
    with torch.no_grad():
        holdout_top1 = top1_in_concepts(head(features[held]), targets[held])
    skipped = int(len(train_rows) - len(fit))
    if skipped:
        log.info("concept head: %d of %d training captions have no in-vocabulary concept (skipped)", skipped,
                 len(train_rows))
    return head, vocab, {"vocab_size": len(vocab), "trained_on": len(fit), "skipped_no_concept": skipped,
                         "holdout_top1_in_concepts": holdout_top1, **stats}


def _write_teacher(out_dir: Path, teacher: Teacher, model, config: TeacherSettings, name: str, data_root,
                   summary: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = model.pretrained_cfg.get("classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(f"{c}." for c in classifiers))}
    atomic_torch_save(backbone, out_dir / BACKBONE_WEIGHTS)
    atomic_torch_save(teacher.state_dict(), out_dir / TEACHER_WEIGHTS)
    manifest = Path(data_root) / "manifest.json"
    meta = {
        "format": "alignlab-teacher/1", "arch": f"timm:{name}", "kwargs": config.kwargs,
        "image_size": config.image_size, "normalization": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "concepts": teacher.concepts, "label_names": LABEL_NAMES, "label_groups": {g: list(v) for g, v in
                                                                                   LABEL_GROUPS.items()},
        "weights_hash": teacher.weights_hash, "backbone_hash": state_dict_hash(backbone),
        "data": {"root": str(data_root), "dataset_hash": json.loads(manifest.read_text()).get("dataset_hash")
                 if manifest.is_file() else None},
        "config": config.model_dump(mode="json"), "summary": summary,
    }
    payload = json.dumps(meta, indent=1, default=list).encode()
    from alignlab.storage.local import write_atomically

    write_atomically(out_dir / TEACHER_JSON, [payload])  # last: marks the folder complete
    return meta
