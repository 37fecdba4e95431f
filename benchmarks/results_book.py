"""Run the results book (docs/results/) in one command: every book spec with `alignlab run --resume`, then its page
with `alignlab report --book`. The same code on a laptop and on a GPU machine; only the device settings differ.

    python benchmarks/results_book.py                               # the whole book, here (hours on 2 cores)
    python benchmarks/results_book.py --specs noise_sweep cat --seeds 0      # some pages, one seed (preliminary)
    python benchmarks/results_book.py --gpu --output-dir runs-gpu --book-dir /tmp/book-gpu   # on a GPU machine
    python benchmarks/results_book.py --dry-run                     # print the commands only

--gpu refuses to start without CUDA, and sets `train.precision=amp_bf16` (written into every run's config and
so into each page's command line: a page says which precision made it), more loader workers and no thread
limit. Give a GPU book its own --output-dir: its runs are not the CPU runs of the same config. Stopped at any
point, the same command picks up where it stopped (`--resume`: finished runs are kept, interrupted ones resume
from their last checkpoint). A spec that fails is named and the script goes on to the next; it exits 1 if any
failed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from alignlab.report.book import BOOK_ORDER

ROOT = Path(__file__).resolve().parents[1]


def alignlab_command() -> list[str]:
    exe = Path(sys.executable).with_name("alignlab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "alignlab.cli"]


def spec_overrides(args) -> list[str]:
    overrides = [f"output_dir={args.output_dir}"]
    if args.seeds is not None:
        overrides.append(f"seeds=[{','.join(str(s) for s in args.seeds)}]")
    if args.gpu:
        overrides += ["train.precision=amp_bf16", f"data.num_workers={args.num_workers}"]
    elif args.threads:
        overrides.append(f"train.threads={args.threads}")
    return overrides + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--specs", nargs="+", default=list(BOOK_ORDER), metavar="NAME",
                        help=f"book specs in ablations/, in order (default: {' '.join(BOOK_ORDER)})")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")],
                        help="comma-separated seeds to run, e.g. 0 or 0,1 (default: each spec's own)")
    parser.add_argument("--output-dir", default="runs", help="where the runs go (the config's output_dir)")
    parser.add_argument("--book-dir", default="docs/results", help="where the pages go")
    parser.add_argument("--gpu", action="store_true", help="CUDA required; bf16 autocast and loader workers")
    parser.add_argument("--num-workers", type=int, default=4, help="with --gpu: data.num_workers per run")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: train.threads per run (kfp's local runner trains two at a time; 0: the default)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("overrides", nargs="*", help="further key=value overrides for every spec")
    args = parser.parse_args(argv)

    unknown = [name for name in args.specs if not (ROOT / "ablations" / f"{name}.yaml").is_file()]
    if unknown:
        parser.error(f"--specs: no ablations/{unknown[0]}.yaml (choose from {', '.join(BOOK_ORDER)})")
    if args.gpu and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("results_book: --gpu but torch sees no CUDA device; drop --gpu to run on the CPU", file=sys.stderr)
            return 2

    overrides = spec_overrides(args)
    failed = []
    for name in args.specs:
        spec = f"ablations/{name}.yaml"
        steps = [
            [*alignlab_command(), "run", spec, "--resume", *overrides],
            [*alignlab_command(), "report", spec, *overrides, "--book", "--book-dir", args.book_dir],
        ]
        for step in steps:
            print("$ " + shlex.join(step), flush=True)
            if args.dry_run:
                continue
            start = time.perf_counter()
            code = subprocess.call(step, cwd=ROOT)
            print(f"  -> exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
            if code != 0:
                failed.append(name)
                break
    if failed:
        print(f"results_book: failed: {', '.join(failed)} (their logs: {args.output_dir}/<spec>/logs/)", file=sys.stderr)
        return 1
    if not args.dry_run:
        print(f"results_book: pages in {args.book_dir}/ (index: {args.book_dir}/README.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
