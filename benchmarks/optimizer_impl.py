"""AdamW kernels (`train.optimizer_impl`): the optimizer step alone and the whole training step, per preset.

torch runs AdamW on the CPU as a per-tensor Python loop unless told otherwise; "fused" is one kernel over all
tensors. The arms are copies of the same model (same seed) stepped in turn (interleaved; these machines are
noisy); medians and ratios against the loop. Also prints the largest parameter difference after the steps:
the kernels agree to float rounding, not bit for bit.

    python benchmarks/optimizer_impl.py --preset tiny --batch 128 --steps 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from alignlab.config import LossConfig, ModelConfig
from alignlab.data.tokenizers import build_tokenizer
from alignlab.training import builders
from alignlab.training.optim import OPTIMIZER_IMPLS, build_optimizer
from _timing import interleaved_step_times, print_ratios


def optimizer_step_times(model_cfg: ModelConfig, tokenizer, steps: int) -> dict[str, list[float]]:
    """Seconds of `optimizer.step()` alone per impl, on random gradients, interleaved."""
    torch.manual_seed(0)
    model = builders.model_from_config(model_cfg, tokenizer)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizers = {impl: build_optimizer(model, model.no_weight_decay_param_names(), lr=1e-4, weight_decay=0.1,
                                        betas=(0.9, 0.98), eps=1e-6, impl=impl) for impl in OPTIMIZER_IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in optimizers}
    for step in range(steps + 3):
        for impl, optimizer in optimizers.items():
            tic = time.perf_counter()
            optimizer.step()
            if step >= 3:
                times[impl].append(time.perf_counter() - tic)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(preset=args.preset)
    tok_cfg = model_cfg.tokenizer
    tokenizer = build_tokenizer("clip_bpe", context_length=tok_cfg.context_length)  # no vocabulary to train
    print(f"preset {args.preset}, batch {args.batch}, {args.steps} steps each, torch threads {torch.get_num_threads()}")
    print("optimizer.step() alone:")
    print_ratios(optimizer_step_times(model_cfg, tokenizer, args.steps * 2), base="for_loop", label="impl")

    size = model_cfg.image.kwargs.get("img_size", 64)
    images = torch.randn(args.batch, 3, size, size)
    tokens = tokenizer([f"a red circle chasing a blue star number {i}" for i in range(args.batch)])
    loss_fn = builders.loss_from_config(LossConfig(name="infonce"), world_size=1, seed=0)
    arms = {}
    for impl in OPTIMIZER_IMPLS:
        torch.manual_seed(0)
        model = builders.model_from_config(model_cfg, tokenizer)
        optimizer = build_optimizer(model, model.no_weight_decay_param_names(), lr=1e-4, weight_decay=0.1,
                                    betas=(0.9, 0.98), eps=1e-6, impl=impl)
        arms[impl] = (model, optimizer, loss_fn, None)
    times = interleaved_step_times(arms, images, tokens, args.steps, lambda step: {
        "indices": torch.arange(args.batch), "epoch": 0, "step": step, "total_steps": args.steps + 2})
    print("whole training step (forward, loss, backward, AdamW):")
    print_ratios(times, base="for_loop", label="impl")
    reference = dict(arms["for_loop"][0].named_parameters())
    for impl in ("foreach", "fused"):
        diff = max(float((p.detach() - reference[n].detach()).abs().max()) for n, p in arms[impl][0].named_parameters())
        print(f"max |param({impl}) - param(for_loop)| after {args.steps + 2} steps: {diff:.2e}")
    print(f"whole-step median per impl: " + ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
