"""`alignlab data filter`: CAT-filter (or CLIP-score-filter) the training pairs of a dataset (DiHT section 3.1).

    alignlab data filter --data ROOT --out URI --stages complexity,action,text_spotting \\
        [--format webdataset|coco|jsonl --train train] [--clip-checkpoint CKPT --clip-threshold 0.35] \\
        [--workers N] [--min-complexity 1 --min-actions 1] [--shard-size 1000] [--max-examples 5]

The flags are `FilterSettings`' fields; `filtering.dataset.filter_dataset` does the work (module docstring
there: what is written where). Exit status 0, or 2 on bad input.
"""

import argparse
import sys

from alignlab.filtering.settings import FilterSettings
from alignlab.settings.cli import add_settings_arguments, settings_from_args


def add_filter_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `alignlab data filter` options to `parser` (a sub-command parser or a standalone one)."""
    return add_settings_arguments(parser, FilterSettings)


def run_filter(args: argparse.Namespace) -> int:
    """`alignlab data filter`: filter, write the outputs, print the table; returns the exit status."""
    from alignlab.filtering.dataset import filter_dataset

    settings = settings_from_args(FilterSettings, args)
    try:
        report = filter_dataset(**settings.model_dump())
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"alignlab data filter: error: {error}", file=sys.stderr)
        return 2
    print(report["table"])
    print(f"[alignlab] kept {report['written']} of {report['total']} pair(s) in {report['wall_time_s']:.1f} s "
          f"({report['workers']} worker(s)); outputs: {settings.out}/train, filter_stats.md, filter_stats.json, "
          "removed_samples.jsonl, removed/")
    return 0
