"""Is the thesis' fine-tune recipe label-preserving on SynthCaps? The image classifier (probe and fine-tune, thesis
Eq 42 and Code 1) of one trained run, under the recipe the spec gives it and under a plain one without RandAugment,
Mixup/CutMix, random erasing, label smoothing and small crops; prints test top-1 per protocol and recipe.

Why it exists: thesis_unimodal_kd at seed 0 gave probe 18.1 % and fine-tune 18.4 % (64 shape+colour classes), far
from the thesis' 56.2 / 75.0. RandAugment's colour ops, CutMix and 8 %-crops change or cut out what SynthCaps'
labels name (a colour, a shape), so this measures the recipe's share of that.

    python benchmarks/classifier_recipe.py runs/thesis_unimodal_kd/finetune/seed-0/final.pt
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

PLAIN = {"eval.image_classifier.rand_augment": None, "eval.image_classifier.mixup": 0.0,
         "eval.image_classifier.cutmix": 0.0, "eval.image_classifier.crop_scale": [0.9, 1.0],
         "eval.image_classifier.erase": 0.0, "eval.image_classifier.smoothing": 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="final.pt of a run whose config has eval.image_classifier")
    parser.add_argument("--protocols", nargs="+", default=["probe", "finetune"], choices=["probe", "finetune"])
    parser.add_argument("--recipes", nargs="+", default=["spec", "plain"], choices=["spec", "plain"])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from alignlab.experiment import evaluate_trained_model
    from alignlab.training.run_model import load_run_model

    rows = []
    for recipe in args.recipes:
        for protocol in args.protocols:
            overrides = (PLAIN if recipe == "plain" else {}) | {"eval.image_classifier.protocol": protocol}
            cfg, model, tokenizer = load_run_model(args.checkpoint, overrides=overrides)
            if cfg.eval.image_classifier is None:
                parser.error(f"{args.checkpoint}: its config has no eval.image_classifier to run")
            with tempfile.TemporaryDirectory() as out:
                scores = evaluate_trained_model(cfg, model, tokenizer, Path(out))
            rows.append((recipe, protocol, scores["image_classifier/top1"], scores["image_classifier/val_top1"]))
            print(json.dumps({"recipe": recipe, "protocol": protocol, "top1": rows[-1][2]}), flush=True)
    print(f"\n{args.checkpoint}: image classifier test top-1 (val top-1 in brackets)")
    print("| recipe | protocol | test top-1 |\n|---|---|---:|")
    for recipe, protocol, top1, val in rows:
        print(f"| {recipe} | {protocol} | {top1:.1f} ({val:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
