"""Teacher cache size and speed (docs/methods.md "DiHT concept distillation": DiHT stores the top-10 of two heads in
~80 bytes per image).

    .venv/bin/python benchmarks/teacher_cache.py [--num-train 2000] [--teacher DIR] [--threads 2]

On a SynthCaps of `--num-train` pairs (generated into a scratch folder), with a teacher from
`alignlab teacher train` (trained here with the default settings unless `--teacher` is given; its
training time is printed too), prints:
- cache bytes per image for k = 5, 10, 25 of the two concept heads, as built (this teacher's small
  vocabularies take uint8 ids) and for DiHT-size vocabularies (10,000 objects, 1,200 attributes: uint16 ids);
- cache write throughput (images/s, k = 10, objects + attributes, eval view only);
- lookup time per batch of 128 random indices (memory-mapped local cache), and that time as a fraction of
  one tiny-preset training step when `--step-seconds` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from alignlab.data.synth import SynthCapsConfig, generate_synthcaps
from alignlab.teachers import load_teacher
from alignlab.teachers.cache import TeacherCache, build_teacher_cache, topk_bytes_per_sample
from alignlab.teachers.settings import TeacherSettings
from alignlab.teachers.supervised import train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--teacher", type=Path, help="a teacher folder; default: train one here")
    parser.add_argument("--epochs", type=int, default=3, help="teacher training epochs when training one")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--lookups", type=int, default=200, help="batches of 128 timed")
    parser.add_argument("--step-seconds", type=float, help="a training step's time, to express lookup as a fraction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as tmp:
        run(Path(tmp), args)


def run(scratch: Path, args: argparse.Namespace) -> None:
    data = scratch / "data"
    generate_synthcaps(data, SynthCapsConfig(seed=0, num_train=args.num_train, shard_size=1000, num_retrieval_test=10,
                                             num_retrieval_val=10, zeroshot_per_class_train=1,
                                             zeroshot_per_class_val=1, zeroshot_per_class_test=1, shift_per_class=1))
    teacher_dir = args.teacher
    if teacher_dir is None:
        teacher_dir = scratch / "teacher"
        started = time.perf_counter()
        meta = train_teacher(data, teacher_dir, TeacherSettings(epochs=args.epochs))
        print(f"teacher train ({meta['arch']} {json.dumps(meta['kwargs'])}, {args.num_train} pairs, {args.epochs} "
              f"epochs, {args.threads} threads): {time.perf_counter() - started:.1f} s "
              f"(supervised {meta['summary']['seconds']['supervised']} s, concept heads "
              f"{meta['summary']['seconds']['concept_heads']} s)")
        print(f"  held-out accuracy: {json.dumps(meta['summary']['holdout_accuracy'])}")
    teacher = load_teacher(str(teacher_dir))
    sizes = {name: len(names) for name, names in teacher.concepts.items()}
    print(f"teacher vocabularies: {sizes}")

    print("bytes per image, top-k of objects + attributes, one view:")
    for k in (5, 10, 25):
        built = sum(topk_bytes_per_sample(k, n) for n in sizes.values())
        diht = topk_bytes_per_sample(k, 10_000) + topk_bytes_per_sample(k, 1_200)
        print(f"  k={k:2d}: this teacher {built:3d} B (vocab {sizes}), DiHT-size vocab {diht:3d} B "
              f"(DiHT reports {dict([(5, 40), (10, 80), (25, 200)])[k]} B: 16.3/32.6/81.6 GiB for 438 M images)")

    caches = {}
    for k in (5, 10, 25):
        started = time.perf_counter()
        uri = build_teacher_cache(teacher, data, scratch / "cache", k=k, batch_size=256, image_size=64)
        seconds = time.perf_counter() - started
        cache = caches[k] = TeacherCache.open(uri)
        on_disk = sum(p.stat().st_size for p in Path(uri).rglob("*.npy"))
        print(f"  k={k:2d} built: {cache.bytes_per_sample} B per image in the arrays, {on_disk / len(cache):.1f} B "
              f"per image on disk with .npy headers; write {len(cache) / seconds:.0f} images/s ({seconds:.1f} s "
              f"for {len(cache)} images)")

    cache = caches[10]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(cache), (128,), generator=generator) for _ in range(args.lookups)]
    cache.lookup(batches[0])
    started = time.perf_counter()
    for batch in batches:
        cache.lookup(batch)
    per_batch = (time.perf_counter() - started) / len(batches)
    line = f"lookup, batch of 128 (k=10, two heads, dense [128, K] float32): {per_batch * 1e3:.3f} ms " \
           f"({per_batch / 128 * 1e6:.2f} us per sample)"
    if args.step_seconds:
        line += f", {100 * per_batch / args.step_seconds:.2f} % of a {args.step_seconds} s training step"
    print(line)


if __name__ == "__main__":
    sys.exit(main())
