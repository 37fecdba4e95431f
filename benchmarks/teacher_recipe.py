"""Does the supervised teacher learn shape? `alignlab teacher train`'s backbone training (`train_backbone`, the
shipped code) under each teacher loss, same tower, data, seed and steps; prints hold-out top-1 per label group.

Why it exists: DiHT's and the thesis' teachers are trained on SynthCaps' true labels. With binary cross entropy
on the 18 multi-hot labels the teacher learnt colour and size and left shape near chance (26 % on 2,000 pairs,
27 % on 10,000), while CLIP with the same tower learns shape (88 % at recipe v4): the teacher, not the data,
was the limit. Each loss trains a fresh copy of the default teacher tower from the same seed.

    alignlab data synth --out data/teacher-10k seed=1 num_train=10000 object_scale=1.4 max_objects=2
    python benchmarks/teacher_recipe.py --data data/teacher-10k --config configs/tiny_synthcaps.yaml --epochs 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="SynthCaps root (train shards with metadata)")
    parser.add_argument("--config", type=Path, help="experiment config whose image tower the teacher is "
                        "(default: the default config's)")
    parser.add_argument("--losses", nargs="+", default=["bce", "group_ce"], choices=["bce", "group_ce"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from alignlab.config import load_config
    from alignlab.teachers.settings import TeacherSettings
    from alignlab.teachers.supervised import train_teacher

    cfg = load_config(args.config, [])
    tower = cfg.model.image.name, dict(cfg.model.image.kwargs), cfg.data.image_size
    rows = {}
    for loss in args.losses:  # `alignlab teacher train` itself, into a folder thrown away afterwards
        settings = TeacherSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, loss=loss,
                                   holdout=args.holdout).with_default_arch(*tower)
        with tempfile.TemporaryDirectory() as out:
            summary = train_teacher(args.data, out, settings)["summary"]
        rows[loss] = summary
        steps = -(-summary["num_train"] // settings.batch_size) * settings.epochs
        print(f"{loss}: {steps} steps of {settings.batch_size} on {summary['num_train']} pairs, "
              f"{summary['seconds']['supervised']:.0f} s", flush=True)

    print(f"\n{args.data}: hold-out top-1 per label group ({summary['num_holdout']} pairs; chance in brackets)")
    print("| loss | shape | colour | size | train s |\n|---|---:|---:|---:|---:|")
    for loss, summary in rows.items():
        accuracy = summary["holdout_accuracy"]
        cells = [f"{accuracy[g]['top1']:.3f} ({accuracy[g]['chance']:.2f})" for g in ("shape", "color", "size")]
        print(f"| {loss} | " + " | ".join(cells) + f" | {summary['seconds']['supervised']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
