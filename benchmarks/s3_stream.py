"""Samples/s of training data read straight from S3 (ranged GETs) against the same shards on local disk.

    .venv/bin/python benchmarks/s3_stream.py [--num-train 256] [--shard-size 100] [--workers 0 1] [--repeats 2]

Generates a tiny SynthCaps (the tests' settings unless overridden), uploads its train split and
manifest to a SeaweedFS it starts itself (tests/s3_server.py, the server the tests use), then times,
best of `--repeats`:
- building `WebDatasetIndex`: local headers, the S3 header walk (ranged GETs), and S3 with sidecar
  indexes (`write_shard_index`), with the number of GETs and bytes each fetched;
- raw reads `index[i]` in a shuffled order (one ranged GET per sample on S3, pread locally), and
  `get_many` (+ PNG decode) per batch of 32 with 1 and 8 fetch threads;
- the training input pipeline: `PairDataset` (PNG decode, crop, tokenise) through the DataLoader of
  the trainer (`ResumableBatchSampler`, batch 32) with each `--workers` count.
Loopback numbers: they show the per-request cost of the client and server, not a real network's latency.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from _timing import best_seconds  # noqa: E402
from s3_server import start_seaweedfs  # noqa: E402

from alignlab import storage  # noqa: E402
from alignlab.data.dataset import PairDataset, build_train_loader  # noqa: E402
from alignlab.data.shards import WebDatasetIndex, write_shard_index  # noqa: E402
from alignlab.data.synth import SynthCapsConfig, generate_synthcaps  # noqa: E402
from alignlab.data.tokenizers import build_tokenizer  # noqa: E402
from alignlab.data.transforms import build_image_transform  # noqa: E402
from alignlab.storage.s3 import S3Store  # noqa: E402


class CountingGets:
    """Counts S3Store.read_range calls and bytes in this process while active."""

    def __enter__(self):
        self.gets, self.bytes, self._original = 0, 0, S3Store.read_range
        counter = self

        def counting(store, key, start, length, if_match=None):
            counter.gets, counter.bytes = counter.gets + 1, counter.bytes + length
            return counter._original(store, key, start, length, if_match=if_match)

        S3Store.read_range = counting
        return self

    def __exit__(self, *exc):
        S3Store.read_range = self._original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader worker counts")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings (the machine may be shared)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="s3-stream-bench-") as tmp:
        run_benchmark(Path(tmp), args)


def run_benchmark(scratch: Path, args: argparse.Namespace) -> None:
    local_root = scratch / "synthcaps"
    generate_synthcaps(local_root, SynthCapsConfig(seed=7, num_train=args.num_train, shard_size=args.shard_size,
                                                   num_retrieval_test=10, num_retrieval_val=10,
                                                   zeroshot_per_class_train=1, zeroshot_per_class_val=1,
                                                   zeroshot_per_class_test=1, shift_per_class=1))
    shards = sorted((local_root / "train").glob("*.tar"))
    total_mb = sum(path.stat().st_size for path in shards) / 1e6
    server = start_seaweedfs(scratch / "seaweedfs")
    try:
        os.environ.update(server.env())
        server.make_bucket("bench")
        remote_root = "s3://bench/synthcaps"
        storage.upload_file(local_root / "manifest.json", f"{remote_root}/manifest.json")
        for path in shards:
            storage.upload_file(path, f"{remote_root}/train/{path.name}")
        print(f"SynthCaps: {args.num_train} train samples in {len(shards)} shards, {total_mb:.2f} MB; "
              f"S3: SeaweedFS at {server.endpoint} (loopback); best of {args.repeats}")

        local_spec, remote_spec = str(local_root / "train"), f"{remote_root}/train"
        manifest = f"{remote_root}/manifest.json"
        print("\nindex build                 seconds    GETs   MB fetched")
        seconds = best_seconds(lambda: WebDatasetIndex(local_spec), args.repeats)
        print(f"  local (tar headers)       {seconds:7.3f}       -            -")
        with CountingGets() as walk:
            seconds = best_seconds(lambda: WebDatasetIndex(remote_spec, manifest=manifest), args.repeats)
        print(f"  s3 header walk            {seconds:7.3f} {walk.gets // args.repeats:7d} "
              f"{walk.bytes / args.repeats / 1e6:12.3f}")
        for path in shards:
            write_shard_index(f"{remote_spec}/{path.name}")
        with CountingGets() as sidecar:
            seconds = best_seconds(lambda: WebDatasetIndex(remote_spec, manifest=manifest), args.repeats)
        print(f"  s3 sidecar index          {seconds:7.3f} {sidecar.gets // args.repeats:7d} "
              f"{sidecar.bytes / args.repeats / 1e6:12.3f}   (+1 GET per shard for the sidecar itself)")

        local, remote = WebDatasetIndex(local_spec), WebDatasetIndex(remote_spec, manifest=manifest)
        order = list(range(len(local)))
        random.Random(0).shuffle(order)
        print("\nraw samples (index[i], shuffled)   samples/s")
        for name, index in (("local pread", local), ("s3 ranged GET", remote)):
            seconds = best_seconds(lambda: [index[i] for i in order], args.repeats)
            print(f"  {name:32s} {len(order) / seconds:9.0f}")
        batches = [order[i:i + 32] for i in range(0, len(order), 32)]
        for threads in (1, 8):  # get() decodes the PNG too, as PairDataset's batches do
            remote.close()
            remote.fetch_threads = threads
            seconds = best_seconds(lambda: [remote.get_many(batch) for batch in batches], args.repeats)
            print(f"  {f's3 get_many, {threads} thread(s)':32s} {len(order) / seconds:9.0f}")

        tokenizer = build_tokenizer("clip_bpe", context_length=32)
        transform = build_image_transform(64, train=True, crop_scale=(0.9, 1.0), hflip=0.0)
        print("\ntraining input pipeline (decode + crop + tokenise, batch 32)   samples/s")
        for workers in args.workers:
            for name, index in (("local", local), ("s3", remote)):
                dataset = PairDataset(index, tokenizer, transform)
                loader = build_train_loader(dataset, batch_size=32, seed=0, num_workers=workers)
                seconds = best_seconds(lambda: sum(len(batch[2]) for batch in loader), args.repeats)
                print(f"  {name:5s} num_workers={workers}  {len(loader) * 32 / seconds:9.0f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
