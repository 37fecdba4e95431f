"""One training step of alignlab against open_clip on the same architecture, batch and precision (fp32, CPU).

The alignlab arm runs what `trainer.train` runs per step (train_step, gradient norm, divergence guard, AdamW,
scheduler, logit-scale clamp, the logged statistics in one host sync). The open_clip arms run what
open_clip_train's `train_one_epoch` runs per step (lr assignment, forward, ClipLoss, backward, AdamW, clamp),
with the optimizer as open_clip_train builds it ("open_clip": torch's default AdamW kernel, a per-tensor
loop on CPU) and with `fused=True` ("oc_fused", the kernel alignlab uses by default), so the ratio shows
how much of the difference is the optimizer. Arms are stepped in turn (interleaved; the machine is shared)
and medians are compared.

Architectures: alignlab's preset with timm's CLIP layout (`pre_norm=True`: an ln_pre and a bias-free patch
projection, as CLIP) against `open_clip.CLIP` with the same widths; the parameter counts are printed and
must agree to 0.001 %. FLOPs of a step are counted by torch's FlopCounterMode (matmuls, convolutions,
attention) and compared to the best fp32 GEMM rate this process reaches with the same threads.

    python benchmarks/openclip_step.py --preset tiny --batch 128 --steps 10
    python benchmarks/openclip_step.py --preset vit-b-32 --batch 8 --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time

import torch

from alignlab.data.tokenizers import build_tokenizer
from alignlab.models import build_dual_encoder
from alignlab.models.presets import get_preset
from alignlab.training import builders
from alignlab.training.guard import DivergenceGuard
from alignlab.training.optim import build_optimizer, build_scheduler
from alignlab.training.trainer import train_step
from alignlab.config import LossConfig

OPEN_CLIP_VISION = {"tiny": dict(image_size=64, patch_size=8, layers=4, width=128, head_width=32),
                    "vit-b-32": dict(image_size=224, patch_size=32, layers=12, width=768, head_width=64)}


def gemm_peak(threads: int, sizes=(512, 1024, 2048), repeats: int = 5) -> float:
    """Best fp32 FLOP/s of a square matmul over `sizes`: the rate a step made only of large GEMMs could reach."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(repeats):
            tic = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - tic))
    return best


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def alignlab_arm(preset: str, tokenizer, steps: int, device: str = "cpu", autocast=contextlib.nullcontext):
    kwargs = get_preset(preset)
    kwargs["image"].setdefault("kwargs", {})["pre_norm"] = True  # CLIP's ln_pre, bias-free patch projection
    kwargs["text"]["context_length"] = tokenizer.context_length
    torch.manual_seed(0)
    model = build_dual_encoder(**kwargs).to(device)
    optimizer = build_optimizer(model, model.no_weight_decay_param_names(), lr=5e-4, weight_decay=0.2,
                                betas=(0.9, 0.98), eps=1e-6, impl="fused")
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=steps)
    loss_fn = builders.loss_from_config(LossConfig(name="infonce"), world_size=1, seed=0)
    guard = DivergenceGuard(torch.device(device), 0, None, advice="")
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=False)
    state = {"step": 0}

    def step(images, tokens):
        # the body of trainer.train's loop (one rank, no clipping)
        context = {"indices": torch.arange(len(images)), "epoch": 0, "step": state["step"],
                   "total_steps": steps, "targets": {}}
        stats = train_step(model, loss_fn, images, tokens, context, accumulation=1,
                           autocast=autocast, scaler=scaler)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        guard.observe(state["step"] + 1, stats["loss"], grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        model.clamp_logit_scale_()
        state["step"] += 1
        keys = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
        torch.stack([stats[k].float() for k in keys]).tolist()

    return model, step


def open_clip_arm(preset: str, tokenizer, steps: int, fused: bool, device: str = "cpu",
                  autocast=contextlib.nullcontext):
    import open_clip
    from open_clip_train.scheduler import cosine_lr

    kwargs = get_preset(preset)
    text = kwargs["text"]
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=kwargs["embed_dim"], vision_cfg=OPEN_CLIP_VISION[preset], output_dict=True,
                           text_cfg=dict(context_length=tokenizer.context_length, vocab_size=text["vocab_size"],
                                         width=text["width"], heads=text["heads"], layers=text["layers"])).to(device)
    # open_clip_train.main's parameter groups and optimizer
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}]
    optimizer = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, **({"fused": True} if fused else {}))
    scheduler = cosine_lr(optimizer, 5e-4, 2, steps)
    loss = open_clip.ClipLoss()
    state = {"step": 0}

    def step(images, tokens):
        # the body of open_clip_train.train.train_one_epoch (accum_freq 1, no clipping)
        scheduler(state["step"])
        optimizer.zero_grad()
        with autocast():
            model_out = model(images, tokens)
            losses = loss(**model_out, output_dict=True)
            total_loss = sum(losses.values())
        total_loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        state["step"] += 1

    return model, step


def step_flops(model: torch.nn.Module, images, tokens) -> int:
    """FLOPs of one forward + backward (torch's FlopCounterMode: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(images, tokens)
        out = out if isinstance(out, dict) else {}
        loss = sum(v.float().sum() for k, v in out.items() if k.endswith("features"))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(OPEN_CLIP_VISION))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default="alignlab,open_clip,oc_fused")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    context_length = get_preset(args.preset)["text"]["context_length"]
    tokenizer = build_tokenizer("clip_bpe", context_length=context_length)
    size = OPEN_CLIP_VISION[args.preset]["image_size"]
    torch.manual_seed(1)
    images = torch.randn(args.batch, 3, size, size)
    tokens = tokenizer([f"a photo of a red circle chasing a blue star number {i}" for i in range(args.batch)])
    total = args.steps + 2
    builders_by_arm = {"alignlab": lambda: alignlab_arm(args.preset, tokenizer, total),
                       "open_clip": lambda: open_clip_arm(args.preset, tokenizer, total, fused=False),
                       "oc_fused": lambda: open_clip_arm(args.preset, tokenizer, total, fused=True)}
    arms = {name: builders_by_arm[name]() for name in args.arms.split(",")}
    counts = {name: count(model) for name, (model, _) in arms.items()}
    print(f"preset {args.preset} (CLIP layout), image {size} px, context {context_length}, batch {args.batch}, "
          f"fp32, torch threads {torch.get_num_threads()}, {args.steps} timed steps per arm, load {os.getloadavg()}")
    print("parameters: " + ", ".join(f"{n} {c:,}" for n, c in counts.items()))
    spread = (max(counts.values()) - min(counts.values())) / min(counts.values())
    print(f"parameter count difference: {100 * spread:.5f} %")
    if spread > 1e-5:
        raise SystemExit("the architectures differ by more than 0.001 % of parameters; the comparison is void")
    flops = {name: step_flops(model, images, tokens) for name, (model, _) in arms.items()}

    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(total):
        for name, (_, step) in arms.items():
            tic = time.perf_counter()
            step(images, tokens)
            if i >= 2:
                times[name].append(time.perf_counter() - tic)
    peak = gemm_peak(args.threads)
    base = statistics.median(times["open_clip"]) if "open_clip" in times else None
    print(f"fp32 GEMM peak (best square matmul, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
    nominal = max(flops.values())  # the full-context step; an arm that skips padding does less
    print(f"GFLOP/step: what the arm executed; 'model of peak': the full-context step's {nominal / 1e9:.2f} GFLOP "
          f"per median step time, against the GEMM peak")
    print(f"{'arm':10s} {'median s/step':>14s} {'x open_clip':>12s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} "
          f"{'of peak':>8s} {'model of peak':>14s} {'samples/s':>9s}")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / base:12.3f}" if base else f"{'-':>12s}"
        rate = flops[name] / median
        print(f"{name:10s} {median:14.4f} {ratio} {flops[name] / 1e9:11.2f} {rate / 1e9:8.1f} "
              f"{rate / peak:8.1%} {nominal / median / peak:14.1%} {args.batch / median:9.1f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
