"""alignlab against open_clip on one GPU: ViT-B/32, batch 256, bf16 autocast; samples/s, peak memory and MFU.

The training steps are the ones benchmarks/openclip_step.py times (alignlab's trainer loop body; open_clip_train's
`train_one_epoch` body with its AdamW, which takes torch's default foreach kernel on a GPU), same architecture
(parameter counts printed), stepped in turn (interleaved) with a device sync around each step; medians.
MFU = the architecture's FLOPs per step (torch's FlopCounterMode on the full-context open_clip step, so an arm
that skips padding is not credited with work it did not do) / median step time / the bf16 matmul peak this GPU
reaches in a GEMM microbenchmark (printed beside the H100 SXM datasheet's 989 TFLOP/s dense).

    python benchmarks/gpu_throughput.py                      # on a GPU machine
    python benchmarks/gpu_throughput.py --smoke              # CPU check: tiny preset, batch 8, 2 steps, fp32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from alignlab.data.tokenizers import build_tokenizer
from alignlab.models.presets import get_preset
from openclip_step import OPEN_CLIP_VISION, alignlab_arm, count, open_clip_arm, step_flops


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, batch 8, 2 steps, fp32 on any device")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device here: run with --smoke for the CPU check, or on a GPU machine")
    preset, batch, steps, warmup = ("tiny", 8, 2, 1) if args.smoke else ("vit-b-32", args.batch, args.steps,
                                                                           args.warmup)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    autocast = (contextlib.nullcontext if dtype == torch.float32
                else lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    context_length = get_preset(preset)["text"]["context_length"]
    tokenizer = build_tokenizer("clip_bpe", context_length=context_length)
    size = OPEN_CLIP_VISION[preset]["image_size"]
    torch.manual_seed(1)
    images = torch.randn(batch, 3, size, size, device=device)
    tokens = tokenizer([f"a photo of a red circle chasing a blue star number {i}" for i in range(batch)]).to(device)
    total = warmup + steps
    arms = {"alignlab": alignlab_arm(preset, tokenizer, total, device=str(device), autocast=autocast),
            "open_clip": open_clip_arm(preset, tokenizer, total, fused=False, device=str(device), autocast=autocast)}
    counts = {name: count(model) for name, (model, _) in arms.items()}
    with autocast():
        nominal = step_flops(arms["open_clip"][0], images, tokens)
    peak_memory = {name: 0 for name in arms}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(total):
        for name, (_, step) in arms.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            tic = time.perf_counter()
            step(images, tokens)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - tic)
            if device.type == "cuda":
                peak_memory[name] = max(peak_memory[name], torch.cuda.max_memory_allocated(device))
    peak = gemm_peak(device, dtype, 2048 if args.smoke else 8192)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, preset {preset}, "
          f"batch {batch}, {'fp32' if dtype == torch.float32 else 'bf16 autocast'}, {steps} timed steps per arm "
          f"after {warmup} warm-up, load {os.getloadavg()}")
    print("parameters: " + ", ".join(f"{n} {c:,}" for n, c in counts.items()))
    print(f"architecture FLOPs per step {nominal / 1e9:.1f} G; {dtype} GEMM peak measured {peak / 1e12:.3f} TFLOP/s"
          + ("" if args.smoke else " (H100 SXM datasheet: 989 dense)"))
    base = statistics.median(times["open_clip"])
    print(f"{'arm':10s} {'median s/step':>14s} {'samples/s':>10s} {'x open_clip':>12s} {'peak GiB':>9s} {'MFU':>7s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:10s} {median:14.4f} {batch / median:10.1f} {base / median:12.3f} "
              f"{peak_memory[name] / 2**30:9.2f} {nominal / median / peak:7.1%}")


if __name__ == "__main__":
    main()
