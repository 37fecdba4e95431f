"""The full evaluation of one model on a SynthCaps-layout data root (docs/data-formats.md layout).

Parts and the folders they read (relative to data_root):
- retrieval, average median rank, similarity histogram: retrieval/test/{images/, captions.json}
- zero-shot per task: classification/<task>/{classes.json, test/}
- linear probe: classification/<linear_probe_task>/{train,val,test}/
- robustness: zero-shot on shift/<name>/test/ vs classification/shape/test/
A part whose folder is absent is skipped and named in the result's "skipped" list; a folder that exists
but is malformed raises, because that is broken data rather than a smaller benchmark.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from alignlab.evaluate.datasets import load_class_folders, load_coco_captions
from alignlab.evaluate.histograms import similarity_histograms
from alignlab.evaluate.linear_probe import linear_probe
from alignlab.evaluate.retrieval import (average_median_rank, average_recall, caption_match_metrics,
                                         retrieval_metrics)
from alignlab.evaluate.robustness import effective_robustness
from alignlab.evaluate.zeroshot import zero_shot_classifier, zero_shot_metrics

HISTOGRAM_PNG = "similarity_histogram.png"
ROBUSTNESS_TASK = "shape"  # the shift sets are shape-classification test sets (docs/data-formats.md)


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@torch.no_grad()
def encode_images(model, paths: Sequence[Path], image_transform: Callable, batch_size: int, device) -> Tensor:
    """[N, d] L2-normalised image features on CPU, encoded in batches of batch_size."""
    chunks = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([image_transform(_load_rgb(path)) for path in paths[start:start + batch_size]])
        # Normalised again here so the metrics' cosine = dot assumption holds for any encoder.
        chunks.append(F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], batch_size: int, device) -> Tensor:
    """[N, d] L2-normalised text features on CPU, encoded in batches of batch_size."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size]))
        chunks.append(F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1).cpu())
    return torch.cat(chunks)


def _retrieval_parts(model, tokenizer, image_transform, folder: Path, out_dir: Path, batch_size, device,
                     histogram: bool, amr_folds: str = "random") -> dict[str, float]:
    paths, captions, text_to_image = load_coco_captions(folder / "images", folder / "captions.json")
    images = encode_images(model, paths, image_transform, batch_size, device)
    texts = encode_texts(model, tokenizer, captions, batch_size, device)
    metrics = retrieval_metrics(images, texts, text_to_image)
    metrics["mean_R@1"] = (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"]) / 2.0
    metrics["avg_R"] = average_recall(metrics)
    metrics.update(caption_match_metrics(images, texts, text_to_image, captions))
    metrics.update(average_median_rank(images, texts, text_to_image, order=amr_folds))
    metrics.update(num_images=len(paths), num_captions=len(captions))
    results = {f"retrieval/{key}": value for key, value in metrics.items()}
    if histogram:
        stats = similarity_histograms(images, texts, text_to_image, out_dir / HISTOGRAM_PNG)
        results.update({f"similarity/{key}": value for key, value in stats.items()})
    return results


def zero_shot_split(model, tokenizer, image_transform, root: Path, batch_size: int, device,
                    split: str = "test") -> dict[str, float]:
    """Zero-shot metrics of one task folder (classification/<task>) on `split`; "val" selects checkpoints."""
    paths, labels, classnames, templates = load_class_folders(root, split)
    classifier = zero_shot_classifier(model.encode_text, tokenizer, classnames, templates, device=device)
    images = encode_images(model, paths, image_transform, batch_size, device)
    return zero_shot_metrics(images, classifier.cpu(), labels)


def _linear_probe(model, image_transform, root: Path, batch_size, device, cs=None) -> dict[str, float]:
    splits = {}
    for split in ("train", "val", "test"):
        paths, labels, _, _ = load_class_folders(root, split)
        splits[split] = (encode_images(model, paths, image_transform, batch_size, device), labels)
    return linear_probe(*splits["train"], *splits["val"], *splits["test"], Cs=cs)


def _robustness(zero_shot_on: Callable[[Path], dict], data_root: Path, shifts: Sequence[str],
                skipped: list[str]) -> dict[str, float]:
    """Zero-shot shape top-1 on each shift set vs on classification/shape/test (single-run summary)."""
    prefix = f"robustness/{ROBUSTNESS_TASK}"
    if not shifts:
        return {}
    in_dist_dir = data_root / "classification" / ROBUSTNESS_TASK / "test"
    if not in_dist_dir.is_dir():
        skipped.append(f"{prefix}: no in-distribution folder {in_dist_dir}")
        return {}
    results: dict[str, float] = {}
    for shift in shifts:
        shift_dir = data_root / "shift" / shift / "test"
        if shift_dir.is_dir():
            results[f"{prefix}/{shift}/top1"] = zero_shot_on(shift_dir.parent)["top1"]
        else:
            skipped.append(f"{prefix}/{shift}: no folder {shift_dir}")
    if not results:
        return {}
    shift_mean = float(np.mean(list(results.values())))
    summary = effective_robustness([zero_shot_on(in_dist_dir.parent)["top1"]], [shift_mean])
    results.update({f"{prefix}/in_dist_top1": summary["in_dist_top1"],
                    f"{prefix}/shift_mean_top1": summary["shifted_top1"], f"{prefix}/gap": summary["gap"]})
    return results


def evaluate_model(model, tokenizer, image_transform, data_root, out_dir, batch_size: int = 256,
                   device="cpu", tasks: Sequence[str] = ("shape", "color", "shape_color"),
                   linear_probe_task: str | None = "shape_color",
                   shifts: Sequence[str] = ("sketch", "texture", "clutter", "resample"),
                   histogram: bool = True, linear_probe_cs: Sequence[float] | None = None,
                   amr_folds: str = "random") -> dict:
    """Run every evaluation part whose data exists; write `out_dir/eval.json` (and the histogram PNG).

    The model (docs/data-formats.md: encode_image / encode_text) must already live on `device`; it is put in eval
    mode and restored to its previous mode afterwards. Features are encoded under torch.no_grad on `device`
    and moved to CPU, where the metrics are computed. image_transform maps a PIL RGB image to a [3, H, W]
    tensor. linear_probe_task=None turns the probe off. Returns a flat dict: `retrieval/...` (incl.
    `retrieval/mean_R@1` = mean of the two R@1, and `retrieval/*_amr`), `similarity/...`,
    `zeroshot/<task>/{top1,top5,mean_per_class_recall}`, `linear_probe/<task>/{top1,C,val_top1}`,
    `robustness/shape/{<shift>/top1,in_dist_top1,shift_mean_top1,gap}`, and "skipped": a list naming each
    part left out because its folder is absent.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data_root, out_dir = Path(data_root), Path(out_dir)
    if not data_root.is_dir():
        raise FileNotFoundError(f"data_root not found: {data_root} (expected a SynthCaps-layout folder)")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    skipped: list[str] = []
    zero_shot_cache: dict[str, dict[str, float]] = {}

    def zero_shot_on(root: Path) -> dict[str, float]:
        if str(root) not in zero_shot_cache:
            zero_shot_cache[str(root)] = zero_shot_split(model, tokenizer, image_transform, root, batch_size, device)
        return zero_shot_cache[str(root)]

    was_training = model.training
    model.eval()
    try:
        retrieval_dir = data_root / "retrieval" / "test"
        if retrieval_dir.is_dir():
            results.update(_retrieval_parts(model, tokenizer, image_transform, retrieval_dir, out_dir,
                                            batch_size, device, histogram, amr_folds))
        else:
            skipped.append(f"retrieval, average median rank, similarity histogram: no folder {retrieval_dir}")

        for task in tasks:
            test_dir = data_root / "classification" / task / "test"
            if test_dir.is_dir():
                for key, value in zero_shot_on(test_dir.parent).items():
                    results[f"zeroshot/{task}/{key}"] = value
            else:
                skipped.append(f"zeroshot/{task}: no folder {test_dir}")

        if linear_probe_task is not None:
            root = data_root / "classification" / linear_probe_task
            absent = [str(root / s) for s in ("train", "val", "test") if not (root / s).is_dir()]
            if absent:
                skipped.append(f"linear_probe/{linear_probe_task}: no folder {', '.join(absent)}")
            else:
                probe = _linear_probe(model, image_transform, root, batch_size, device, linear_probe_cs)
                for key, value in probe.items():
                    results[f"linear_probe/{linear_probe_task}/{key}"] = value

        results.update(_robustness(zero_shot_on, data_root, shifts, skipped))
    finally:
        model.train(was_training)

    results["skipped"] = skipped
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return results
