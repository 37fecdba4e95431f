"""What each speed option buys on this machine: train.compile, train.channels_last, precision amp_bf16, against
the default (eager, fp32, contiguous), on one training step of a preset (forward, loss, backward, fused AdamW).

Arms are copies of one model (same seed) stepped in turn (interleaved; the machine is shared); medians and
ratios against the default. The compiled arm's first steps (compilation) are timed separately and left out.

    python benchmarks/train_options.py --preset tiny --batch 128 --steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from alignlab.config import LossConfig, ModelConfig
from alignlab.data.tokenizers import build_tokenizer
from alignlab.training import builders
from alignlab.training.optim import build_optimizer
from alignlab.training.trainer import train_step

ARMS = ("default", "channels_last", "amp_bf16", "compile")


def build_arm(name: str, model_cfg: ModelConfig, tokenizer):
    torch.manual_seed(0)
    model = builders.model_from_config(model_cfg, tokenizer)
    optimizer = build_optimizer(model, model.no_weight_decay_param_names(), lr=1e-4, weight_decay=0.1,
                                betas=(0.9, 0.98), eps=1e-6)
    if name == "channels_last":
        model.image_tower.to(memory_format=torch.channels_last)
    runnable = torch.compile(model) if name == "compile" else model
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "amp_bf16"
                else contextlib.nullcontext)
    return runnable, optimizer, autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(preset=args.preset)
    tokenizer = build_tokenizer("clip_bpe", context_length=model_cfg.tokenizer.context_length)
    size = model_cfg.image.kwargs.get("img_size", 224)
    images = torch.randn(args.batch, 3, size, size)
    tokens = tokenizer([f"a photo of a red circle chasing a blue star number {i}" for i in range(args.batch)])
    loss_fn = builders.loss_from_config(LossConfig(name="infonce"), world_size=1, seed=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    arms = {name: build_arm(name, model_cfg, tokenizer) for name in args.arms.split(",")}

    def step(name: str, step_index: int) -> float:
        model, optimizer, autocast = arms[name]
        batch = images.contiguous(memory_format=torch.channels_last) if name == "channels_last" else images
        tic = time.perf_counter()
        context = {"indices": torch.arange(args.batch), "epoch": 0, "step": step_index, "total_steps": 100}
        train_step(model, loss_fn, batch, tokens, context, accumulation=1, autocast=autocast, scaler=scaler)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - tic

    warmup = {name: sum(step(name, i) for i in range(2)) for name in arms}  # compilation happens here
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(args.steps):
        for name in arms:
            times[name].append(step(name, i + 2))
    base = statistics.median(times["default"])
    print(f"preset {args.preset}, batch {args.batch}, torch threads {args.threads}, {args.steps} timed steps per arm "
          f"(interleaved), load {os.getloadavg()}")
    print(f"{'arm':14s} {'median s/step':>14s} {'x default':>10s} {'first 2 steps s':>16s}")
    for name, values in times.items():
        print(f"{name:14s} {statistics.median(values):14.4f} {statistics.median(values) / base:10.3f} "
              f"{warmup[name]:16.1f}")


if __name__ == "__main__":
    main()
