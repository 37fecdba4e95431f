"""Whole training loop, alignlab `train()` against open_clip_train's `main`, on the same SynthCaps shards: samples/s.

Both train the tiny architecture in CLIP layout (benchmarks/openclip_step.py checks the parameter counts agree)
from the same webdataset shards at 64 px, batch 128, fp32, one compute thread, one loader worker, crop scale
[0.9, 1], as separate processes run in alternation (A B A B; the machine is shared). Per-step times are what
each logs: alignlab's `step_time` (data wait included) and open_clip's `Batch (t)` (also end to end); start-up
and the first 2 steps are left out; samples/s = batch / median step time.

open_clip_train 3.3.0 meets webdataset 1.0.2's tar expander, which ends a shard with an empty dict; the
open_clip worker below drops those before open_clip's `group_by_keys_nothrow` (a benchmark-only wrapper).

    python benchmarks/openclip_loop.py --rounds 2 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

OPEN_CLIP_TINY = {"embed_dim": 128,
                  "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
                  "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}


def open_clip_worker(config: str, argv: list[str]) -> None:
    import open_clip
    import open_clip_train.data as data
    import torch

    torch.set_num_threads(1)
    open_clip.add_model_config(config)
    group = data.group_by_keys_nothrow
    data.group_by_keys_nothrow = lambda files, *a, **k: group((f for f in files if "fname" in f), *a, **k)
    from open_clip_train.main import main

    main(argv)


def alignlab_worker(root: str, out: str, steps: int, batch: int) -> None:
    from alignlab.config import validate_config
    from alignlab.training.trainer import train

    tree = {"name": "loop", "seed": 0, "output_dir": out,
            "data": {"root": root, "num_workers": 1, "image_size": 64, "crop_scale": [0.9, 1.0]},
            "model": {"preset": "tiny", "embed_dim": 128, "tokenizer": {"kind": "clip_bpe", "context_length": 32},
                      "image": {"kwargs": {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 128,
                                           "num_heads": 4, "pre_norm": True}},
                      "text": {"width": 128, "layers": 4, "heads": 4}},
            "train": {"batch_size": batch, "max_steps": steps, "threads": 1, "log_every": 1, "progress": False,
                      "checkpoint_every": 10_000, "grad_clip": None},
            "eval": {"enabled": False}, "tracking": {"enabled": False}}
    train(validate_config(tree), Path(out) / "run")


def run_open_clip(tmp: Path, shards: str, steps: int, batch: int, round_: int) -> list[float]:
    logs = tmp / f"oc-{round_}"
    argv = ["--train-data", shards, "--train-num-samples", str(steps * batch), "--dataset-type", "webdataset",
            "--batch-size", str(batch), "--epochs", "1", "--model", "tiny_clip", "--workers", "1",
            "--precision", "fp32", "--device", "cpu", "--log-every-n-steps", "1", "--logs", str(logs),
            "--name", "r", "--save-frequency", "0", "--report-to", "", "--warmup", "2", "--seed", "0"]
    out = subprocess.run([sys.executable, __file__, "--worker", "open_clip", str(tmp / "tiny_clip.json"), *argv],
                         capture_output=True, text=True, check=True)
    return [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", out.stdout + out.stderr)]


def run_alignlab(tmp: Path, root: Path, steps: int, batch: int, round_: int) -> list[float]:
    out = tmp / f"al-{round_}"
    subprocess.run([sys.executable, __file__, "--worker", "alignlab", str(root), str(out), str(steps), str(batch)],
                   capture_output=True, text=True, check=True)
    return [json.loads(line)["step_time"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        if sys.argv[2] == "open_clip":
            return open_clip_worker(sys.argv[3], sys.argv[4:])
        return alignlab_worker(sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    from alignlab.data.synth import SynthCapsConfig, generate_synthcaps

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "tiny_clip.json").write_text(json.dumps(OPEN_CLIP_TINY))
        shard_size = 256
        num = max(args.steps * args.batch, shard_size)
        root = tmp / "synth"
        generate_synthcaps(root, SynthCapsConfig(num_train=num, image_size=64, shard_size=shard_size,
                                                 num_retrieval_test=10, num_retrieval_val=10,
                                                 zeroshot_per_class_train=1, zeroshot_per_class_val=1,
                                                 zeroshot_per_class_test=1, shift_per_class=1))
        last = -(-num // shard_size) - 1
        shards = str(root / "train" / f"shard-{{000000..{last:06d}}}.tar")
        times: dict[str, list[float]] = {"alignlab": [], "open_clip": []}
        for round_ in range(args.rounds):
            times["alignlab"] += run_alignlab(tmp, root, args.steps, args.batch, round_)[2:]
            times["open_clip"] += run_open_clip(tmp, shards, args.steps, args.batch, round_)[2:]
    print(f"SynthCaps 64 px, batch {args.batch}, {args.steps} steps per run ({args.rounds} alternating runs each, "
          f"first 2 steps of a run left out), 1 thread + 1 loader worker, load {os.getloadavg()}")
    base = statistics.median(times["open_clip"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:10s} median step {median:7.3f} s  {args.batch / median:7.1f} samples/s  "
              f"{base / median:5.2f}x open_clip's samples/s  ({len(values)} steps)")


if __name__ == "__main__":
    main()
