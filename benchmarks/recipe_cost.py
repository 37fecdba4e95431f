"""Step cost of benchmark-recipe variants against the first one: the whole training step (forward, loss,
backward, AdamW) of each variant's model on a batch of its own image size, the variants interleaved step by
step in this process (these machines are noisy), medians and ratios.

The recipe's wall-clock budget (<= 5 minutes of training per run on 2 quiet cores) is judged from these ratios
and one timed run of the reference, not from a timed test:

    python benchmarks/recipe_cost.py configs/tiny_synthcaps.yaml --data data/synth-v2 --threads 2 --steps 12 \\
        --variant "" --variant "model.image.kwargs.output_stride=8"

Each variant is a space-separated list of config overrides ('' = the config as is); the first is the reference.
"""

from __future__ import annotations

import argparse
import os

import torch

from alignlab.config import load_config
from alignlab.data.roots import resolve_data_root
from alignlab.training import builders
from _timing import interleaved_step_times, print_ratios


def build_variant(config: str, data: str, overrides: list[str]):
    """The variant's model (its tokenizer from the SynthCaps folder `data`, as training builds it), its
    AdamW and its loss, seeded alike."""
    cfg = load_config(config, [f"data.root={data}", "data.synth=null", *overrides])
    tokenizer = builders.tokenizer_from_config(cfg.model, cfg.data, resolve_data_root(cfg.data))
    torch.manual_seed(0)
    model = builders.model_from_config(cfg.model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=False)
    loss_fn = builders.loss_from_config(cfg.loss, world_size=1, seed=0, distill=cfg.distill)
    return cfg, tokenizer, (model, optimizer, loss_fn, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--data", required=True, help="a SynthCaps folder (for the tokenizer)")
    parser.add_argument("--variant", action="append", default=[], help="space-separated overrides ('' = as is)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variant or [""]
    arms, sizes = {}, set()
    for index, variant in enumerate(variants):
        cfg, tokenizer, arm = build_variant(args.config, args.data, variant.split())
        arms[f"v{index}"] = arm
        sizes.add((cfg.data.image_size, cfg.train.batch_size))
    if len(sizes) != 1:
        raise SystemExit(f"variants differ in image size or batch {sorted(sizes)}: time them separately")
    size, batch = sizes.pop()
    images = torch.randn(batch, 3, size, size)
    tokens = tokenizer([f"a small red circle to the left of a large blue star {i}" for i in range(batch)])
    times = interleaved_step_times(arms, images, tokens, args.steps, lambda step: {
        "indices": torch.arange(batch), "epoch": 0, "step": step, "total_steps": args.steps + 2})
    print(f"{args.config}, batch {batch}, {size} px, {args.steps} steps each, torch threads {args.threads}")
    for index, variant in enumerate(variants):
        print(f"v{index}: {variant or '(as is)'}")
    print_ratios(times, base="v0", label="variant")


if __name__ == "__main__":
    main()
