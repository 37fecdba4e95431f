"""Whole training step (forward, loss, backward, AdamW) of a preset with each loss, against InfoNCE.

PSD's claim is "no extra compute": this measures it on the real model rather than the loss alone.
Runs interleave the losses step by step (these machines are noisy) and report the median.

    python benchmarks/train_step_cost.py --preset tiny --batch 128 --steps 15
"""

from __future__ import annotations

import argparse

import torch

from alignlab.config import LossConfig, ModelConfig
from alignlab.data.tokenizers import build_tokenizer
from alignlab.training import builders
from _timing import interleaved_step_times, print_ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()

    model_cfg = ModelConfig(preset=args.preset)
    tokenizer = build_tokenizer(model_cfg.tokenizer.kind, context_length=model_cfg.tokenizer.context_length)
    size = model_cfg.image.kwargs.get("img_size", 224)
    images = torch.randn(args.batch, 3, size, size)
    tokens = tokenizer([f"a red circle chasing a blue star number {i}" for i in range(args.batch)])
    losses = {name: builders.loss_from_config(LossConfig(name=name), world_size=1, seed=0)
              for name in ("infonce", "psd", "hn_nce")}
    models = {}
    for name in losses:
        torch.manual_seed(0)
        model = builders.model_from_config(model_cfg, tokenizer)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    arms = {name: (*models[name], loss_fn, None) for name, loss_fn in losses.items()}
    times = interleaved_step_times(arms, images, tokens, args.steps, lambda step: {
        "indices": torch.arange(args.batch), "epoch": 0, "step": step, "total_steps": args.steps + 2})
    print(f"preset {args.preset}, batch {args.batch}, {args.steps} steps each, torch threads {torch.get_num_threads()}")
    print_ratios(times, base="infonce", label="loss")


if __name__ == "__main__":
    main()
