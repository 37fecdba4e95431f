"""Cost of psd_loss and hn_nce_loss against clip_loss: one forward + backward, time and memory, batch 256 /
1024 / 4096, d = 512. Targets (docs/methods.md "PSD": PSD costs what CLIP costs): PSD <= 1.05x time, HN-NCE <= 1.10x
time, both <= 1.1x memory.

    .venv/bin/python benchmarks/loss_cost.py [--batch-sizes 256 1024 4096] [--dim 512] [--threads 1]
                                             [--device cpu|cuda] [--seconds 20] [--no-rss]

Time: median over repeats, the three losses interleaved in a rotating order so that changes in machine load
hit them alike. On CPU the ratio is taken on process CPU time with --threads 1 (the fairer number on a shared
machine; wall time is printed too); on CUDA on wall time between synchronisations.
Memory: "saved" = bytes of the distinct storages autograd keeps for backward (saved_tensors_hooks), exact and
deterministic; "peak" = torch.cuda.max_memory_allocated on CUDA, and on CPU (Linux) the peak-RSS increase of a fresh
subprocess per (loss, batch) (coarse: meaningful when the N x N matrices are tens of MiB, i.e. batch 4096).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from alignlab.losses import clip_loss, hn_nce_loss, psd_loss

PSD_ALPHA = 0.5
LOSSES = {
    "clip": lambda image, text, scale, mask: clip_loss(image, text, scale),
    # docs/methods.md "PSD" defaults: swapped prediction, tau_t = 0.1, detached targets; alpha mid-schedule.
    "psd": lambda image, text, scale, mask: psd_loss(image, text, scale, PSD_ALPHA, mask),
    # DiHT's PMD setting (docs/methods.md "HN-NCE"): alpha 0.999, beta 0.5, weights with gradient.
    "hn_nce": lambda image, text, scale, mask: hn_nce_loss(image, text, scale, 0.999, 0.5),
}
TARGETS = {"psd": (1.05, 1.1), "hn_nce": (1.10, 1.1)}  # (time, memory) ratios against clip


def make_inputs(batch: int, dim: int, device: str, seed: int = 0):
    """Random L2-normalised features and PSD's aligned mask (first floor(alpha N) of a random permutation)."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(device)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(device)
    mask = torch.zeros(batch, dtype=torch.bool)
    mask[torch.randperm(batch, generator=generator)[: int(PSD_ALPHA * batch)]] = True
    return image, text, mask.to(device)


def forward_backward(name: str, image, text, mask) -> None:
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = torch.tensor(1 / 0.07, device=image.device, requires_grad=True)
    LOSSES[name](image, text, scale, mask).backward()


def time_once(name: str, inputs, device: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + backward."""
    _synchronise(device)
    wall, cpu = time.perf_counter(), time.process_time()
    forward_backward(name, *inputs)
    _synchronise(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_interleaved(inputs, device: str, seconds: float) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per loss; at least 5 rounds, more while the time budget lasts."""
    names = list(LOSSES)
    for name in names:  # warm-up: allocator, kernels, thread pools
        time_once(name, inputs, device)
    samples = {name: [] for name in names}
    start, round_index = time.perf_counter(), 0
    while round_index < 5 or (time.perf_counter() - start < seconds and round_index < 200):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            samples[name].append(time_once(name, inputs, device))
        round_index += 1
    return {name: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
            for name, runs in samples.items()}


def saved_tensor_bytes(name: str, image, text, mask) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one forward pass."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return tensor

    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = torch.tensor(1 / 0.07, device=image.device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        LOSSES[name](image, text, scale, mask)
    return sum(storages.values())


def peak_bytes(name: str, batch: int, dim: int, device: str, threads: int) -> int | None:
    """Peak memory of one forward + backward above what the inputs already hold."""
    if device == "cuda":
        inputs = make_inputs(batch, dim, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        forward_backward(name, *inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    command = [sys.executable, __file__, "--rss-probe", name, "--batch-sizes", str(batch), "--dim", str(dim),
               "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def rss_probe(name: str, batch: int, dim: int) -> int:
    """In a fresh process: peak RSS increase of one forward + backward (libraries warmed up on a tiny batch).

    Reads VmHWM, the peak of this process image; getrusage's ru_maxrss would carry the parent's peak over
    the fork + exec (Linux)."""
    forward_backward(name, *make_inputs(64, dim, "cpu"))
    inputs = make_inputs(batch, dim, "cpu")
    baseline = _proc_status_bytes("VmRSS")
    forward_backward(name, *inputs)
    return _proc_status_bytes("VmHWM") - baseline


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: CPU, then CUDA if present")
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget per batch size")
    parser.add_argument("--no-rss", action="store_true", help="skip the CPU peak-RSS subprocesses")
    parser.add_argument("--rss-probe", choices=list(LOSSES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_probe:
        print(rss_probe(args.rss_probe, args.batch_sizes[0], args.dim))
        return
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        report(device, args)


def report(device: str, args) -> None:
    clock = "CPU" if device == "cpu" else "wall"
    print(f"\n{device}: d = {args.dim}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); "
          f"ratios against clip_loss; time ratio on {clock} time")
    header = (f"{'batch':>6} {'loss':>7} {'wall ms':>9} {'cpu ms':>9} {'time x':>7} {'saved MiB':>10} "
              f"{'x':>5} {'peak MiB':>9} {'x':>5}  target")
    print(header + "\n" + "-" * len(header))
    for batch in args.batch_sizes:
        inputs = make_inputs(batch, args.dim, device)
        times = time_interleaved(inputs, device, args.seconds)
        saved = {name: saved_tensor_bytes(name, *inputs) for name in LOSSES}
        skip_peak = device == "cpu" and args.no_rss
        peak = {name: None if skip_peak else peak_bytes(name, batch, args.dim, device, args.threads)
                for name in LOSSES}
        for name in LOSSES:
            time_ratio = times[name][clock == "CPU"] / times["clip"][clock == "CPU"]
            saved_ratio = saved[name] / saved["clip"]
            peak_text = "-".rjust(9) + " " + "-".rjust(5)
            if peak[name] is not None:
                peak_text = f"{peak[name] / 2**20:9.1f} {peak[name] / max(peak['clip'], 1):5.2f}"
            verdict = ""
            if name in TARGETS:
                time_target, memory_target = TARGETS[name]
                ok = time_ratio <= time_target and saved_ratio <= memory_target
                verdict = f"{'ok' if ok else 'MISSED'} (<= {time_target}x time, <= {memory_target}x memory)"
            print(f"{batch:>6} {name:>7} {times[name][0] * 1e3:9.2f} {times[name][1] * 1e3:9.2f} "
                  f"{time_ratio:7.3f} {saved[name] / 2**20:10.2f} {saved_ratio:5.2f} {peak_text}  {verdict}")


def _synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
