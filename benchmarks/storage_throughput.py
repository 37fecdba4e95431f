"""Upload/download MB/s of alignlab.storage against a local SeaweedFS S3 server it starts itself.

    .venv/bin/python benchmarks/storage_throughput.py [--size-mb 256] [--files 4] [--part-mb 16]

Starts `weed server` with tests/s3_server.py's `start_seaweedfs` (so the numbers are for exactly the
server the tests use), then times, best of `--repeats`: `upload_file` and `download_file` of
`--files` random files of `--size-mb` MB each (multipart above `--part-mb`), `write_bytes` /
`read_bytes` of 1 MB objects (per-request overhead), and the local atomic write for comparison.
Also prints the weed process's resident memory. Loopback numbers: a ceiling for the client and
server CPU cost, not for a real network.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import best_seconds  # noqa: E402
from s3_server import start_seaweedfs  # noqa: E402

from alignlab.storage import open_store  # noqa: E402
from alignlab.storage.base import MiB  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="size of each large file")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--part-mb", type=int, default=16, help="multipart part size (>= 5)")
    parser.add_argument("--small", type=int, default=100, help="number of 1 MB objects")
    parser.add_argument("--go-mem-limit", default="384MiB", help="GOMEMLIMIT of the weed process")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings (the machine may be shared)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        run_benchmark(Path(tmp), args)


def run_benchmark(scratch: Path, args: argparse.Namespace) -> None:
    server = start_seaweedfs(scratch / "seaweedfs", go_mem_limit=args.go_mem_limit)
    try:
        os.environ.update(server.env())
        print(f"weed (GOMEMLIMIT={args.go_mem_limit}): {' '.join(server.command)}")
        print(f"weed RSS after start: {server.rss_mib():.0f} MiB")
        server.make_bucket("bench")
        s3 = open_store("s3://bench/throughput", part_size=args.part_mb * MiB)
        local = open_store(scratch / "local")

        sources = []
        for i in range(args.files):
            path = scratch / f"src-{i}.bin"
            with open(path, "wb") as handle:
                for _ in range(args.size_mb):
                    handle.write(os.urandom(MiB))
            sources.append(path)
        total_mb = args.files * args.size_mb * MiB / 1e6
        small = os.urandom(MiB)

        results = {
            "S3 upload_file": (lambda: [s3.upload_file(p, p.name) for p in sources], total_mb),
            "S3 download_file": (lambda: [s3.download_file(p.name, scratch / "dl.bin") for p in sources], total_mb),
            "S3 write_bytes 1 MB": (lambda: [s3.write_bytes(f"small/{i}", small) for i in range(args.small)],
                                    args.small * MiB / 1e6),
            "S3 read_bytes 1 MB": (lambda: [s3.read_bytes(f"small/{i}") for i in range(args.small)],
                                   args.small * MiB / 1e6),
            "local upload_file": (lambda: [local.upload_file(p, p.name) for p in sources], total_mb),
        }
        print(f"{args.files} x {args.size_mb} MB files, part size {args.part_mb} MB, best of {args.repeats}")
        for name, (run, megabytes) in results.items():
            seconds = best_seconds(run, args.repeats)
            print(f"  {name:22s} {megabytes / seconds:8.1f} MB/s  ({megabytes:.0f} MB in {seconds:.2f} s)")
        print(f"weed RSS after the run: {server.rss_mib():.0f} MiB, peak {server.rss_mib('VmHWM'):.0f} MiB")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
