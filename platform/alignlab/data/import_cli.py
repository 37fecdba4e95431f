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
from pathlib import Path

# The importers (PIL, storage) are imported inside run_import: add_import_arguments runs on every
# `alignlab` invocation when the CLI wires it.


def add_import_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `alignlab data import {coco,tsv,webdataset,jsonl}` sub-commands to `parser`."""
    sources = parser.add_subparsers(dest="source", required=True, metavar="{coco,tsv,webdataset,jsonl}")

    def common(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--out", required=True, help="output folder or s3://bucket/prefix (must not hold a dataset)")
        sub.add_argument("--shard-size", type=int, default=1000, help="pairs per tar shard (default 1000)")
        return sub

    coco = common(sources.add_parser("coco", help="COCO captions JSON (+ optional Karpathy split file)"))
    coco.add_argument("--annotations", type=Path, help="COCO captions JSON (captions_*.json)")
    coco.add_argument("--karpathy", type=Path, help="Karpathy split file (dataset_coco.json)")
    coco.add_argument("--split", default="train,restval",
                      help="Karpathy splits to import, comma-separated (default train,restval)")
    coco.add_argument("--image-root", type=Path, help="folder the image paths are relative to "
                                                      "(default: the JSON's folder)")

    tsv = common(sources.add_parser("tsv", help="CC3M/CC12M-style TSV of (image file, caption)"))
    tsv.add_argument("tsv", type=Path)
    tsv.add_argument("--image-root", type=Path, help="folder the image paths are relative to (default: the TSV's)")
    tsv.add_argument("--header", choices=("auto", "yes", "no"), default="auto", help="first row names the columns")
    tsv.add_argument("--image-column", default="0", help="0-based index or header name (default 0)")
    tsv.add_argument("--caption-column", default="1", help="0-based index or header name (default 1)")

    wds = common(sources.add_parser("webdataset", help="webdataset / img2dataset tar shards (re-shard)"))
    wds.add_argument("shards", nargs="+", help="folders, globs, brace patterns or s3:// URIs of .tar shards")

    jsonl = common(sources.add_parser("jsonl", help="the thesis JSONL pair format"))
    jsonl.add_argument("jsonl", type=Path)
    jsonl.add_argument("--image-root", type=Path, help="folder the image paths are relative to (default: the JSONL's)")
    return parser


def _candidates(args: argparse.Namespace) -> tuple:
    """(candidate iterator, source description for the manifest, pairing note or None)."""
    from alignlab.data import importers

    info: dict = {"format": args.source}
    if args.source == "coco":
        splits = tuple(s.strip() for s in args.split.split(",") if s.strip())
        info |= {"annotations": _text(args.annotations), "karpathy": _text(args.karpathy),
                 "image_root": _text(args.image_root), "splits": list(splits) if args.karpathy else None}
        items = importers.coco_candidates(args.annotations, args.image_root, args.karpathy, splits, info=info)
        return items, info, "one sample per (image, caption)"
    if args.source == "tsv":
        info |= {"tsv": str(args.tsv), "image_root": _text(args.image_root), "header": args.header,
                 "image_column": args.image_column, "caption_column": args.caption_column}
        return (importers.tsv_candidates(args.tsv, args.image_root, args.header, args.image_column,
                                         args.caption_column), info, None)
    if args.source == "webdataset":
        info |= {"shards": list(args.shards)}
        return importers.webdataset_candidates(args.shards), info, None
    info |= {"jsonl": str(args.jsonl), "image_root": _text(args.image_root)}
    return importers.jsonl_candidates(args.jsonl, args.image_root), info, "one sample per caption"


def _text(value) -> str | None:
    return None if value is None else str(value)


def run_import(args: argparse.Namespace) -> int:
    """Run the import for parsed `add_import_arguments` options; returns the exit status (module docstring)."""
    from alignlab.data.importers import format_summary, import_dataset

    if args.shard_size < 1:
        print(f"alignlab data import: error: --shard-size must be >= 1, got {args.shard_size}", file=sys.stderr)
        return 2
    try:
        items, info, pairing = _candidates(args)
        manifest = import_dataset(items, args.out, info, shard_size=args.shard_size, pairing=pairing)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"alignlab data import: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(manifest))
    written = manifest["counts"]["train"]
    print(f"[alignlab] {written} pair(s) in {manifest['counts']['train_shards']} shard(s) at {args.out} "
          f"(dataset_hash {manifest['dataset_hash'][:12]}); skipped items and reasons: {args.out}/manifest.json")
    if not written:
        print("alignlab data import: error: no pair was written; see the skipped reasons above", file=sys.stderr)
        return 1
    return 0
