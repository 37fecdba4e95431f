"""`alignlab data import`: turn an image-caption dataset into alignlab's webdataset shards.

    alignlab data import coco --annotations captions_train2017.json --image-root train2017 --out DIR
    alignlab data import coco --karpathy dataset_coco.json --split train,restval --image-root coco --out DIR
    alignlab data import tsv cc3m.tsv [--image-root DIR] [--header auto|yes|no] --out s3://bucket/cc3m
    alignlab data import webdataset 'shards/{00000..00099}.tar' --out DIR
    alignlab data import jsonl train.jsonl --out DIR
    (all: [--shard-size N])

Writes `<out>/train/shard-*.tar` and `<out>/manifest.json` (counts, checksums, dataset hash and every
skipped item with its reason), then prints a table of what was written and skipped. Train on it with
`data.root=<out> data.format=webdataset data.train=train`. Exit status: 0 when at least one pair was
written, 1 when none was, 2 on bad input (a missing file, an existing output, a malformed source file).
"""

import argparse
import sys

from alignlab.data.import_settings import ImportSettings
from alignlab.settings.cli import add_settings_arguments, settings_from_args

# Per format: the ImportSettings fields it has no flag for, and the flag (or positional) that fills `sources`.
_FORMATS = {
    "coco": ("COCO captions JSON (+ optional Karpathy split file)", ("header", "image_column", "caption_column"),
             "--annotations"),
    "tsv": ("CC3M/CC12M-style TSV of (image file, caption)", ("karpathy", "split"), "tsv"),
    "webdataset": ("webdataset / img2dataset tar shards (re-shard)",
                   ("image_root", "karpathy", "split", "header", "image_column", "caption_column"), "shards"),
    "jsonl": ("the thesis JSONL pair format", ("karpathy", "split", "header", "image_column", "caption_column"),
              "jsonl"),
}


def add_import_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `alignlab data import {coco,tsv,webdataset,jsonl}` sub-commands to `parser` (flags from
    ImportSettings)."""
    formats = parser.add_subparsers(dest="source", required=True, metavar="{coco,tsv,webdataset,jsonl}")
    for name, (help_text, unused, source) in _FORMATS.items():
        sub = formats.add_parser(name, help=help_text)
        add_settings_arguments(sub, ImportSettings, skip=("format", "sources", *unused))
        if source.startswith("--"):
            sub.add_argument(source, dest="source_file", help="captions JSON (captions_*.json)")
        elif name == "webdataset":
            sub.add_argument(source, nargs="+", help="folders, globs, brace patterns or s3:// URIs of .tar shards")
        else:
            sub.add_argument(source, help=f"the {name.upper()} file")
    return parser


def settings_from_import_args(args: argparse.Namespace) -> ImportSettings:
    """The ImportSettings of parsed `add_import_arguments` options."""
    given = getattr(args, "shards", None) or [getattr(args, key) for key in ("source_file", "tsv", "jsonl")
                                               if getattr(args, key, None)]
    source_flag = _FORMATS[args.source][2]
    return settings_from_args(ImportSettings, args, format=args.source, sources=[str(g) for g in given],
                              flags={"sources": source_flag})


def run_import(args: argparse.Namespace) -> int:
    """Run the import for parsed `add_import_arguments` options; returns the exit status (module docstring)."""
    from alignlab.data.importers import format_summary, import_source

    try:
        settings = settings_from_import_args(args)
        manifest = import_source(**settings.model_dump())
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"alignlab data import: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(manifest))
    written = manifest["counts"]["train"]
    print(f"[alignlab] {written} pair(s) in {manifest['counts']['train_shards']} shard(s) at {settings.out} "
          f"(dataset_hash {manifest['dataset_hash'][:12]}); skipped items and reasons: {settings.out}/manifest.json")
    if not written:
        print("alignlab data import: error: no pair was written; see the skipped reasons above", file=sys.stderr)
        return 1
    return 0
