"""`alignlab data filter`: CAT-filter (or CLIP-score-filter) the training pairs of a dataset (SPEC 3.1).

    alignlab data filter --data ROOT --out URI --stages complexity,action,text_spotting \\
        [--format webdataset|coco|jsonl --train train] [--clip-checkpoint CKPT --clip-threshold 0.35] \\
        [--workers N] [--min-complexity 1 --min-actions 1] [--shard-size 1000] [--max-examples 5]

Reads the training pairs the trainer would read (`data.root`, `data.format`, `data.train`; a COCO or JSONL
sample with several captions counts as one pair per caption) and runs `pipeline.run_filters` on them.
Then it writes under URI (a folder or s3://bucket/prefix):

- `train/shard-*.tar` + `manifest.json`: the kept pairs with their original image bytes and metadata
  (ShardWriter), the manifest recording the filter settings, the table and the source dataset hash;
- `filter_stats.md`, `filter_stats.json`: pairs left after each stage, count and % (DiHT Table A.3);
- `removed_samples.jsonl`: up to --max-examples removed pairs per stage (caption, why) and their images
  under `removed/<stage>/`.

Two passes over the source: the first filters (streaming, images decoded only for image stages), the
second copies the kept pairs and the removed examples. Exit status 0, or 2 on bad input.
"""

import argparse
import sys
import time
from pathlib import Path

# torch, spaCy and PIL are imported inside the functions: add_filter_arguments runs on every `alignlab`
# invocation when the CLI wires it.


def add_filter_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `alignlab data filter` options to `parser` (a sub-command parser or a standalone one)."""
    parser.add_argument("--data", required=True, type=Path, help="dataset root (as data.root)")
    parser.add_argument("--format", default="webdataset", choices=("webdataset", "coco", "jsonl"),
                        help="as data.format (default webdataset)")
    parser.add_argument("--train", default="train", help="as data.train: shards or file relative to --data")
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix (must not hold a dataset)")
    parser.add_argument("--stages", default="complexity,action,text_spotting",
                        help="comma-separated, run in this order: complexity, action, text_spotting, clip_score")
    parser.add_argument("--min-complexity", type=int, default=1, help="keep complexity >= C<n> (default 1)")
    parser.add_argument("--min-actions", type=int, default=1, help="keep pairs with >= n actions (default 1)")
    parser.add_argument("--min-chars", type=int, default=5, help="text spotting: matching characters (default 5)")
    parser.add_argument("--min-confidence", type=float, default=0.8, help="text spotting: OCR confidence (0.8)")
    parser.add_argument("--clip-checkpoint", type=Path, help="alignlab checkpoint (final.pt, step-*.pt) for clip_score")
    parser.add_argument("--clip-threshold", type=float, default=0.35, help="clip_score: keep score >= this")
    parser.add_argument("--device", help="clip_score device (default: cuda if available, else cpu)")
    parser.add_argument("--workers", type=int, default=1, help="processes for the parser and OCR stages")
    parser.add_argument("--shard-size", type=int, default=1000, help="pairs per output shard (default 1000)")
    parser.add_argument("--max-examples", type=int, default=5, help="removed pairs kept as examples per stage")
    return parser


# ---- the source -----------------------------------------------------------------------------------------

def open_source(data_root: Path, format: str, train: str):
    """The trainer's training source for (root, format, train): WebDatasetIndex, CocoCaptions or JsonlPairs."""
    from alignlab.data.dataset import open_train_source

    train_path = Path(train)
    spec = train_path if train_path.is_absolute() else data_root / train_path
    if not data_root.exists():
        raise FileNotFoundError(f"--data {data_root} does not exist")
    return open_train_source(format, str(spec))


def iter_pairs(source, format: str):
    """(key, caption, read_image) per training pair of `source`, in a fixed order; `read_image()` returns
    (image bytes as stored, metadata). A sample with a list of captions gives one pair per caption, keyed
    `<key>_<j>`; a sample with token ids and no text cannot be filtered and raises ValueError."""
    from alignlab.data.writer import sanitize_key

    if format == "webdataset":
        from alignlab.data.shards import IMAGE_EXTENSIONS

        for index in range(len(source)):
            sample = source[index]
            ext = next(e for e in IMAGE_EXTENSIONS if e in sample)

            def read(sample=sample, ext=ext):
                return sample[ext], dict(sample.get("json", {}))
            yield sanitize_key(sample["__key__"]), sample["txt"], read
        return
    for index in range(len(source)):
        if format == "coco":
            captions, path = source.captions[index], source.image_root / source.file_names[index]
            key, meta = str(source.image_ids[index]), {"image_id": source.image_ids[index],
                                                       "file_name": source.file_names[index]}
        else:
            captions, path = source.captions[index], source.image_paths[index]
            key, meta = str(source.sample_ids[index]), {"source_id": source.sample_ids[index],
                                                        "image_path": str(source.image_paths[index])}
        if captions is None:
            raise ValueError(f"{format} sample {key!r} has token ids but no caption text; filtering needs the text")

        def read(path=path, meta=meta):
            return path.read_bytes(), dict(meta)
        if isinstance(captions, str):
            yield sanitize_key(key), captions, read
        else:
            for j, caption in enumerate(captions):
                yield sanitize_key(f"{key}_{j}"), caption, read


def source_dataset_hash(data_root: Path, source) -> str:
    """The `dataset_hash` of the source's manifest.json; without one, the same hash computed over the
    files the pairs come from (shards, or the captions file)."""
    import hashlib

    from alignlab.data.writer import dataset_hash, manifest_dataset_hash

    found = manifest_dataset_hash(data_root)
    if found:
        return found
    paths = getattr(source, "shard_paths", None) or [getattr(source, "path")]
    files = {str(Path(p).resolve()): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}
    return dataset_hash(files)


# ---- the CLIP-score stage ---------------------------------------------------------------------------------

def load_clip_scorer(checkpoint: Path, device: str):
    """(model on `device` in eval mode, tokenizer, eval image transform) from an alignlab checkpoint.

    The config stored in the checkpoint rebuilds tokenizer and model, as `alignlab evaluate` does."""
    from alignlab.config import validate_config
    from alignlab.training import builders
    from alignlab.training.checkpoint import load_checkpoint

    if not checkpoint.is_file():
        raise FileNotFoundError(f"--clip-checkpoint {checkpoint} does not exist (a run's final.pt or "
                                "checkpoints/step-*.pt)")
    state = load_checkpoint(checkpoint)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{checkpoint} is not an alignlab checkpoint (needs 'config' and 'model' entries)")
    cfg = validate_config(state["config"], source=f"config stored in {checkpoint}")
    tokenizer = builders.tokenizer_from_config(cfg.model, cfg.data, builders.resolve_data_root(cfg.data))
    model = builders.model_from_config(cfg.model, tokenizer)
    model.load_state_dict(state["model"])
    _, eval_transform = builders.transforms_from_config(cfg.data)
    return model.to(device).eval(), tokenizer, eval_transform


# ---- the command -------------------------------------------------------------------------------------------

def _settings(args: argparse.Namespace, stages: tuple[str, ...]) -> dict:
    settings = {"stages": list(stages), "min_complexity": args.min_complexity, "min_actions": args.min_actions}
    if "text_spotting" in stages:
        settings |= {"min_chars": args.min_chars, "min_confidence": args.min_confidence}
    if "clip_score" in stages:
        settings |= {"clip_checkpoint": str(args.clip_checkpoint), "clip_threshold": args.clip_threshold}
    return settings


def filter_dataset(args: argparse.Namespace) -> dict:
    """Run the filter for parsed `add_filter_arguments` options; returns filter_stats.json's content."""
    import io
    import json

    from PIL import Image

    from alignlab.data.importers import check_image
    from alignlab.data.writer import DuplicateKeyError, ShardWriter, image_extension
    from alignlab.filtering.pipeline import STAGES, run_filters

    started = time.perf_counter()
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise ValueError(f"--stages {args.stages!r}: choose from {', '.join(STAGES)} (comma-separated)")
    if args.workers < 1 or args.shard_size < 1 or args.max_examples < 0:
        raise ValueError("--workers and --shard-size must be >= 1 and --max-examples >= 0")
    clip = {}
    if "clip_score" in stages:
        if args.clip_checkpoint is None:
            raise ValueError("stage clip_score needs --clip-checkpoint (an alignlab final.pt)")
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, transform = load_clip_scorer(args.clip_checkpoint, device)
        clip = {"clip_model": model, "tokenizer": tokenizer, "image_transform": transform, "device": device,
                "clip_threshold": args.clip_threshold}
    source = open_source(args.data, args.format, args.train)
    source_info = {"data_root": str(args.data), "format": args.format, "train": args.train,
                   "dataset_hash": source_dataset_hash(args.data, source)}
    writer = ShardWriter(args.out, shard_size=args.shard_size, generator="alignlab-filter")  # fails early if taken
    needs_image = bool({"text_spotting", "clip_score"} & set(stages))
    keys: list[str] = []
    unreadable: dict[int, tuple[str, str]] = {}  # pair id -> (reason, detail): not filtered, recorded as skipped

    def filter_input():
        for pair_id, (key, caption, read) in enumerate(iter_pairs(source, args.format)):
            keys.append(key)
            image = None
            if needs_image:
                try:
                    image = Image.open(io.BytesIO(read()[0])).convert("RGB")
                except FileNotFoundError as err:
                    unreadable[pair_id] = ("missing_file", str(err))
                    continue
                except Exception as err:  # PIL's many decode errors
                    unreadable[pair_id] = ("undecodable_image", f"{type(err).__name__}: {err}")
                    continue
            yield pair_id, image, caption

    result = run_filters(filter_input(), stages, workers=args.workers, min_complexity=args.min_complexity,
                         min_actions=args.min_actions, min_chars=args.min_chars, min_confidence=args.min_confidence,
                         max_examples=args.max_examples, **clip)
    stats = result.stats
    kept = set(result.kept_ids)
    examples = {e["sample_id"]: (stage, e) for stage, rows in stats.examples.items() for e in rows}
    removed_rows = []
    with writer:
        for pair_id, (key, caption, read) in enumerate(iter_pairs(source, args.format)):
            if pair_id in unreadable:
                writer.skip(f"{args.data}: {key}", *unreadable[pair_id])
                continue
            if pair_id not in kept and pair_id not in examples:
                continue
            try:
                data, meta = read()
            except FileNotFoundError as err:
                writer.skip(f"{args.data}: {key}", "missing_file", str(err))
                continue
            if image_extension(data) is None:  # e.g. webp in a webdataset source: stored as PNG
                converted, original_format, detail = check_image(data)
                if converted is None:
                    writer.skip(f"{args.data}: {key}", "undecodable_image", detail)
                    continue
                data, meta["reencoded_from"] = converted, original_format
            if pair_id in examples:
                stage, example = examples[pair_id]
                relpath = f"removed/{stage}/{key}.{image_extension(data)}"
                writer.store.write_bytes(relpath, data)
                removed_rows.append({"stage": stage, "sample_id": key, "caption": caption,
                                     "detail": example["detail"], "image": relpath})
                continue
            meta.setdefault("source", f"filter:{args.data}")
            try:
                writer.add(key, data, caption, meta)
            except DuplicateKeyError as err:
                writer.skip(f"{args.data}: {key}", "duplicate_key", str(err))
        elapsed = time.perf_counter() - started
        table = stats.to_dict()
        table["examples"] = {stage: [{**e, "sample_id": keys[e["sample_id"]]} for e in rows]
                             for stage, rows in stats.examples.items()}
        report = {"source": source_info, "filter": _settings(args, stages), **table,
                  "unreadable": len(unreadable), "written": writer.num_samples, "wall_time_s": round(elapsed, 2),
                  "workers": args.workers}
        writer.close(source=source_info, filter=_settings(args, stages), filter_stats=stats.rows())
    store = writer.store
    store.write_bytes("filter_stats.json", json.dumps(report, indent=2).encode())
    store.write_bytes("filter_stats.md", _markdown(report, stats).encode())
    store.write_bytes("removed_samples.jsonl", "".join(json.dumps(r) + "\n" for r in removed_rows).encode())
    report["table"] = stats.format_table()
    return report


def _markdown(report: dict, stats) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in report["filter"].items() if k != "stages")
    lines = [f"# Filter statistics: {report['source']['data_root']}", "",
             f"Stages in order: {', '.join(report['filter']['stages'])} ({settings}). "
             f"Source dataset_hash `{report['source']['dataset_hash'][:12]}`; "
             f"{report['unreadable']} pair(s) with an unreadable image were not filtered (see manifest.json).", "",
             stats.to_markdown()]
    return "\n".join(lines)


def run_filter(args: argparse.Namespace) -> int:
    """`alignlab data filter`: filter, write the outputs, print the table; returns the exit status."""
    try:
        report = filter_dataset(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"alignlab data filter: error: {error}", file=sys.stderr)
        return 2
    print(report["table"])
    print(f"[alignlab] kept {report['written']} of {report['total']} pair(s) in {report['wall_time_s']:.1f} s "
          f"({report['workers']} worker(s)); outputs: {args.out}/train, filter_stats.md, filter_stats.json, "
          "removed_samples.jsonl, removed/")
    return 0
