"""Wall time of one ablation on the inline runner and on kfp's local runner, in one process. Target: the
kfp local runner takes at most 1.10x the inline runner's time on the demo (issue 5, section 3).

    .venv/bin/python benchmarks/runner_overhead.py                          # a tiny two-arm spec (about a minute)
    .venv/bin/python benchmarks/runner_overhead.py --spec ablations/demo.yaml   # the demo (much longer)

Each runner starts in its own empty working folder, so both generate their data and open a fresh MLflow
store (unless $MLFLOW_TRACKING_URI is set); their output goes to <folder>/runner.log. The kfp runner pays
one Python start-up and import per step and runs up to two arm x seed runs at a time; the inline runner
runs everything in this process, one run after another. On a shared machine, repeat and compare medians.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from alignlab.ablation_runner import run_ablation
from alignlab_pipelines.local import run_local

TINY_SYNTH = {"seed": 7, "num_train": 512, "shard_size": 256, "num_retrieval_test": 40, "num_retrieval_val": 20,
              "zeroshot_per_class_train": 4, "zeroshot_per_class_val": 2, "zeroshot_per_class_test": 3,
              "shift_per_class": 3}


def write_tiny_spec(folder: Path) -> Path:
    """Two arms x one seed of a tiny model on a small SynthCaps set (the shapes of tests/conftest.py)."""
    base = {"name": "tiny", "output_dir": "runs",
            "data": {"root": "data", "synth": TINY_SYNTH, "num_workers": 0, "image_size": 32},
            "model": {"preset": "tiny", "embed_dim": 32, "tokenizer": {"context_length": 16},
                      "image": {"kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48,
                                           "num_heads": 2}},
                      "text": {"width": 32, "layers": 1, "heads": 2}},
            "train": {"batch_size": 32, "epochs": 2, "log_every": 4, "progress": False},
            "eval": {"batch_size": 64, "zeroshot_tasks": ["shape"], "linear_probe_task": None, "shifts": [],
                     "histogram": False}}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "overhead", "base": "base.yaml", "arms": {"a": {"train.lr": 1e-3}, "b": {"train.lr": 1e-4}},
            "seeds": [0], "report_metrics": ["retrieval/mean_R@1", "final_loss"]}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


def timed_run(runner, spec: Path, overrides: list[str], folder: Path) -> float:
    """Seconds `runner` takes on the spec, started in `folder` with its output in folder/runner.log."""
    folder.mkdir(parents=True)
    previous = Path.cwd()
    os.chdir(folder)
    try:
        with open("runner.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            tic = time.perf_counter()
            runner(spec, overrides, resume=False)
            return time.perf_counter() - tic
    finally:
        os.chdir(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, help="ablation spec (default: a tiny two-arm spec)")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every arm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.keep or Path(tmp)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        spec = args.spec.resolve() if args.spec else write_tiny_spec(folder)
        times = {}
        for name, runner in (("inline", run_ablation), ("kfp-local", run_local)):
            times[name] = timed_run(runner, spec, args.overrides, folder / name)
            print(f"{name:>9}: {times[name]:8.1f} s   (log: {folder / name / 'runner.log'})", flush=True)
        ratio = times["kfp-local"] / times["inline"]
        print(f"    ratio: {ratio:8.2f} x   (target <= 1.10 x on the demo; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
