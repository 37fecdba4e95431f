"""Evaluation of the thesis' single-modality runs (config sections `unimodal`, `vq`; docs/methods.md): what the
thesis tracks for each, on the data root's held-out retrieval val split, and for an image tower its own
probe or fine-tune (`eval.image_classifier`).

- unimodal: `kd/val_loss`, the layer-averaged MSE on the val images (image) or captions (text);
- eval.image_classifier: `image_classifier/{top1, val_top1, best_epoch}` (Eq 42, `image_classifier.py`);
- vq: `vq/val_loss` (= reconstruction + commitment), `vq/val_reconstruction`, `vq/val_perplexity` and
  `vq/val_usage` over every val image at once (the thesis' collapse check).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from alignlab.evaluate.datasets import load_coco_captions
from alignlab.losses.layer_average import layer_averaged_kd_loss
from alignlab.losses.vq import image_vq_loss

VAL_SEED = 0  # the VQ decoder's patch masks on val: one fixed draw, so runs compare


def _val_split(data_root: Path) -> tuple[list[Path], list[str]]:
    folder = data_root / "retrieval" / "val"
    paths, captions, _ = load_coco_captions(folder / "images", folder / "captions.json")
    return paths, captions


def _image_batches(paths: list[Path], transform, batch_size: int, device):
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        yield torch.stack(images).to(device)


def evaluate_task(cfg, model, tokenizer, eval_transform, data_root: Path, out_dir: Path) -> dict:
    """The metrics of a unimodal or VQ run (module docstring); writes `out_dir/eval.json`."""
    from alignlab.models.image_vq import codebook_usage

    device = next(model.parameters()).device
    paths, captions = _val_split(Path(data_root))
    batch_size = cfg.eval.batch_size
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(VAL_SEED)
            if cfg.unimodal is not None:
                losses, counts = [], []
                if cfg.unimodal.modality == "image":
                    batches = _image_batches(paths, eval_transform, batch_size, device)
                    inputs = [(images, None) for images in batches]
                else:
                    inputs = [(None, tokenizer(captions[i:i + batch_size]).to(device))
                              for i in range(0, len(captions), batch_size)]
                for images, tokens in inputs:
                    out = model(images, tokens)
                    losses.append(float(layer_averaged_kd_loss(out["prediction"], out["target"], out["keep"])))
                    counts.append(len(out["prediction"]))
                results["kd/val_loss"] = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
            else:
                outputs = [model(images) for images in _image_batches(paths, eval_transform, batch_size, device)]
                joined = {key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}
                reconstruction, commitment = image_vq_loss(joined["prediction"], joined["teacher_cls"], joined["z"],
                                                           joined["code"])
                usage = codebook_usage(joined["indices"], cfg.vq.codebook_size)
                results |= {"vq/val_loss": float(reconstruction + commitment),
                            "vq/val_reconstruction": float(reconstruction),
                            "vq/val_perplexity": usage["perplexity"], "vq/val_usage": usage["usage"]}
    finally:
        model.train(was_training)
    if cfg.eval.image_classifier is not None:
        from alignlab.evaluate.image_classifier import train_image_classifier

        c = cfg.eval.image_classifier
        scores = train_image_classifier(model.image_tower.model, Path(data_root) / "classification" / c.task, c,
                                        cfg.data.image_size, eval_transform, seed=cfg.seed, hflip=cfg.data.hflip)
        results |= {f"image_classifier/{key}": value for key, value in scores.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return results
