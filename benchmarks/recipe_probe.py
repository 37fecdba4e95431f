"""Does a recipe escape ln N and learn shape? Trains one config on a SynthCaps folder decoded once into memory
(so the loader does not dominate on 2 cores), with the project's model, loss, optimizer and schedule builders,
and prints: steps whose loss sat within 0.05 of ln N, the largest mean pairwise text / image cosine (the
collapse statistic the trainer logs), the final loss, the training seconds and zero-shot top-1 on the
colour, shape and shape+colour test sets.

Each variant is a set of overrides; variants run one after the other in this process (compare them on the
same machine state). The v1 -> v2 recipe comparison of the benchmark issue:

    python benchmarks/recipe_probe.py --data data/synth-v2 configs/tiny_synthcaps.yaml \\
        --variant "" --variant "model.preset=tiny model.tokenizer.kind=clip_bpe train.lr=3e-4"

(`alignlab data synth --out data/synth-v2 object_scale=1.4 max_objects=2` makes the data; `--stop N`
ends each variant after N steps of its full schedule.)
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import tarfile
import time

import numpy as np
import torch
from PIL import Image

from alignlab.config import load_config
from alignlab.data.synth.captions import CLASS_TEMPLATES
from alignlab.data.transforms import CLIP_MEAN, CLIP_STD
from alignlab.evaluate.datasets import load_class_folders
from alignlab.evaluate.zeroshot import zero_shot_classifier, zero_shot_metrics
from alignlab.training import builders
from alignlab.data.roots import local_eval_root, resolve_data_root
from alignlab.training.optim import build_optimizer, build_scheduler, warmup_steps_for
from alignlab.training.trainer import mean_pairwise_cosine

MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)  # the project's eval transform normalises with these
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - MEAN) / STD


def _decode(root: str, size: int) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for shard in sorted(glob.glob(f"{root}/train/*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(members):
            image = Image.open(io.BytesIO(members[key]["png"])).convert("RGB").resize((size, size))
            images.append(np.asarray(image))
            captions.append(members[key]["txt"].decode())
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def _image_features(model, root, task: str, split: str, size: int):
    paths, labels, classnames, _ = load_class_folders(root / "classification" / task, split)
    x = _normalise(torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((size, size))))
                                .permute(2, 0, 1) for p in paths]))
    return torch.cat([model.encode_image(x[i:i + 256]) for i in range(0, len(x), 256)]), labels, classnames


def _zero_shot(model, tokenizer, root, size) -> dict[str, float]:
    """Zero-shot top-1 per task, and for shape a logistic-regression probe on the frozen image features
    (train split -> test split): whether the image features carry shape at all, text side aside."""
    from sklearn.linear_model import LogisticRegression

    out = {}
    for task in ("color", "shape", "shape_color"):
        features, labels, classnames = _image_features(model, root, task, "test", size)
        classifier = zero_shot_classifier(model.encode_text, tokenizer, classnames, CLASS_TEMPLATES[task])
        out[f"zeroshot/{task}/top1"] = round(zero_shot_metrics(features, classifier, labels)["top1"], 1)
    train_x, train_y, _ = _image_features(model, root, "shape", "train", size)
    test_x, test_y, _ = _image_features(model, root, "shape", "test", size)
    probe = LogisticRegression(C=10.0, max_iter=1000).fit(train_x.numpy(), np.asarray(train_y))
    out["probe/shape/top1"] = round(100.0 * probe.score(test_x.numpy(), np.asarray(test_y)), 1)
    return out


def probe(config: str, data: str, overrides: list[str], stop: int | None) -> dict:
    cfg = load_config(config, [f"data.root={data}", "data.synth=null", *overrides])
    root = resolve_data_root(cfg.data)
    images, captions = _decode(str(root), cfg.data.image_size)
    builders.seed_everything(cfg.seed)
    tokenizer = builders.tokenizer_from_config(cfg.model, cfg.data, root)
    model = builders.model_from_config(cfg.model, tokenizer)
    tokens = tokenizer(captions)
    tc, batch = cfg.train, cfg.train.batch_size
    total = tc.max_steps or tc.epochs * (len(images) // batch)
    optimizer = build_optimizer(model, model.no_weight_decay_param_names(), lr=tc.lr, weight_decay=tc.weight_decay,
                                betas=tuple(tc.betas), eps=tc.eps, rules=builders.param_group_rules(cfg))
    scheduler = build_scheduler(optimizer, warmup_steps_for(tc.warmup, total), total, tc.min_lr_ratio)
    loss_fn = builders.loss_from_config(cfg.loss, 1, cfg.seed, cfg.distill)
    generator, ln_n, steps = torch.Generator().manual_seed(cfg.seed), math.log(batch), min(total, stop or total)
    at_ln_n, max_cos_text, max_cos_image, step, loss, start = 0, 0.0, 0.0, 0, torch.tensor(math.nan), time.time()
    while step < steps:
        order = torch.randperm(len(images), generator=generator)
        for b in range(len(images) // batch):
            rows = order[b * batch:(b + 1) * batch]
            outputs = model(_normalise(images[rows]), tokens[rows])
            terms, _ = loss_fn(outputs, {"indices": rows, "epoch": 0, "step": step, "total_steps": total,
                                         "targets": {}})
            loss = sum(terms.values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            model.clamp_logit_scale_()
            at_ln_n += abs(loss.item() - ln_n) < 0.05
            max_cos_text = max(max_cos_text, float(mean_pairwise_cosine(outputs["text_features"].detach())))
            max_cos_image = max(max_cos_image, float(mean_pairwise_cosine(outputs["image_features"].detach())))
            step += 1
            if step >= steps:
                break
    seconds = time.time() - start
    model.eval()
    with torch.no_grad():
        metrics = _zero_shot(model, tokenizer, local_eval_root(root), cfg.data.image_size)
    return {"overrides": " ".join(overrides), "steps": steps, "warmup": warmup_steps_for(tc.warmup, total),
            "steps_at_ln_n": at_ln_n, "max_text_cos": round(max_cos_text, 2), "max_image_cos": round(max_cos_image, 2),
            "final_loss": round(loss.item(), 3), "train_seconds": round(seconds), **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--data", required=True, help="a SynthCaps folder (alignlab data synth --out ...)")
    parser.add_argument("--variant", action="append", default=[], help="space-separated overrides ('' = as is)")
    parser.add_argument("--stop", type=int, default=None)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for variant in args.variant or [""]:
        print(json.dumps(probe(args.config, args.data, variant.split(), args.stop)), flush=True)


if __name__ == "__main__":
    main()
