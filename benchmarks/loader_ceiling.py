"""Training loader samples/s on one core against the ceiling: plain PIL decode + resize of the same JPEGs.

The loader arm is what the trainer iterates with `data.num_workers: 0` (WebDatasetIndex random access, the
training transform: seeded random resized crop, CLIP normalisation; CLIP BPE tokenisation; collate). The
ceiling arm decodes the same bytes with PIL and resizes them to the output size, nothing else (no crop draw,
no tensor, no caption). Both run in this process on one core, in alternating rounds (the machine is shared);
medians of samples per CPU-second (and per wall-second) and the loader/ceiling ratio are printed.

    python benchmarks/loader_ceiling.py --size 64 --num 2000
    python benchmarks/loader_ceiling.py --size 224 --num 400
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from alignlab.data.dataset import PairDataset, build_train_loader
from alignlab.data.shards import WebDatasetIndex
from alignlab.data.tokenizers import build_tokenizer
from alignlab.data.transforms import build_image_transform

CAPTIONS = ["a red circle above a small blue square", "two green triangles next to a yellow star on grey",
            "a photo of a dog running on the beach at sunset", "a purple hexagon left of an orange cross"]


def write_shards(root: Path, num: int, source_size: int, per_shard: int = 500) -> list[bytes]:
    """JPEG shards of smooth random images (source_size^2, like photos, not noise); returns the JPEG bytes."""
    rng = np.random.default_rng(0)
    blobs = []
    for shard in range(-(-num // per_shard)):
        with wds.TarWriter(str(root / f"shard-{shard:06d}.tar")) as sink:
            for n in range(shard * per_shard, min(num, (shard + 1) * per_shard)):
                coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                image = coarse.resize((source_size, source_size), Image.BILINEAR)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                blobs.append(buffer.getvalue())
                sink.write({"__key__": f"s{n:07d}", "jpg": blobs[-1], "txt": CAPTIONS[n % len(CAPTIONS)]})
    return blobs


def ceiling_round(blobs: list[bytes], size: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB").resize((size, size), Image.BICUBIC)
    return time.perf_counter() - wall, time.process_time() - cpu


def loader_round(dataset: PairDataset, batch: int, epoch: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in build_train_loader(dataset, batch_size=batch, seed=0, epoch=epoch, num_workers=0):
        pass
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="output image size")
    parser.add_argument("--source-size", type=int, default=None, help="stored JPEG size (default size * 1.25)")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    source_size = args.source_size or int(args.size * 1.25)
    with tempfile.TemporaryDirectory() as tmp:
        blobs = write_shards(Path(tmp), args.num, source_size)
        dataset = PairDataset(WebDatasetIndex(tmp), build_tokenizer("clip_bpe", context_length=77),
                              build_image_transform(args.size, train=True, crop_scale=(0.9, 1.0)))
        num = len(dataset) // args.batch * args.batch
        rates: dict[str, list[tuple[float, float]]] = {"ceiling": [], "loader": []}
        loader_round(dataset, args.batch, epoch=0)  # warm-up: page cache, tokenizer
        for round_ in range(args.rounds):
            wall, cpu = ceiling_round(blobs[:num], args.size)
            rates["ceiling"].append((num / cpu, num / wall))
            wall, cpu = loader_round(dataset, args.batch, epoch=round_ + 1)
            rates["loader"].append((num / cpu, num / wall))
    print(f"{num} samples of {source_size}px JPEG -> {args.size}px, {args.rounds} alternating rounds, one core, "
          f"load {os.getloadavg()}")
    ceiling_cpu = statistics.median(r[0] for r in rates["ceiling"])
    ceiling_wall = statistics.median(r[1] for r in rates["ceiling"])
    print(f"{'arm':8s} {'samples/CPU-s':>14s} {'x ceiling':>10s} {'samples/wall-s':>15s} {'x ceiling':>10s}")
    for name, values in rates.items():
        cpu, wall = statistics.median(r[0] for r in values), statistics.median(r[1] for r in values)
        print(f"{name:8s} {cpu:14.0f} {cpu / ceiling_cpu:10.2f} {wall:15.0f} {wall / ceiling_wall:10.2f}")


if __name__ == "__main__":
    main()
