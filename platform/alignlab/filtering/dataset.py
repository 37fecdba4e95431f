"""Filter a dataset's training pairs with CAT (DiHT section 3.1) or the CLIP score, into new shards.

Reads the training pairs the trainer would read (`data.root`, `data.format`, `data.train`; a COCO or JSONL
sample with several captions counts as one pair per caption) and runs `pipeline.run_filters` on them.
Then it writes under `out` (a folder or s3://bucket/prefix):

- `train/shard-*.tar` + `manifest.json`: the kept pairs with their original image bytes and metadata
  (ShardWriter), the manifest recording the filter settings, the table and the source dataset hash;
- `filter_stats.md`, `filter_stats.json`: pairs left after each stage, count and % (DiHT Table A.3);
- `removed_samples.jsonl`: up to `max_examples` removed pairs per stage (caption, why) and their images
  under `removed/<stage>/`.

Two passes over the source: the first filters (streaming, images decoded only for image stages), the
second copies the kept pairs and the removed examples. `alignlab data filter` and a spec's `filter` prepare
step call `filter_dataset`; its settings are `filtering.settings.FilterSettings`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

# ---- the source -----------------------------------------------------------------------------------------

def open_source(data_root: Path, format: str, train: str):
    """The trainer's training source for (root, format, train): WebDatasetIndex, CocoCaptions or JsonlPairs."""
    from alignlab.data.dataset import open_train_source

    train_path = Path(train)
    spec = train_path if train_path.is_absolute() else data_root / train_path
    if not data_root.exists():
        raise FileNotFoundError(f"data {data_root} does not exist")
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
    """(model on `device` in eval mode, tokenizer, eval image transform) of an alignlab run's checkpoint."""
    from alignlab.training.builders import transforms_from_config
    from alignlab.training.run_model import load_run_model

    if not checkpoint.is_file():
        raise FileNotFoundError(f"clip_checkpoint {checkpoint} does not exist (a run's final.pt or "
                                "checkpoints/step-*.pt)")
    cfg, model, tokenizer = load_run_model(checkpoint)
    _, eval_transform = transforms_from_config(cfg.data)
    return model.to(device).eval(), tokenizer, eval_transform


# ---- the command -------------------------------------------------------------------------------------------

def _recorded_settings(stages: tuple[str, ...], min_complexity: int, min_actions: int, min_chars: int,
                       min_confidence: float, clip_checkpoint: str | None, clip_threshold: float,
                       clip_keep_fraction: float | None = None) -> dict:
    """The settings the manifest and filter_stats.json record: those of the stages that ran."""
    settings = {"stages": list(stages), "min_complexity": min_complexity, "min_actions": min_actions}
    if "text_spotting" in stages:
        settings |= {"min_chars": min_chars, "min_confidence": min_confidence}
    if "clip_score" in stages:
        settings |= {"clip_checkpoint": str(clip_checkpoint), "clip_threshold": clip_threshold}
        if clip_keep_fraction is not None:
            settings["clip_keep_fraction"] = clip_keep_fraction
    return settings


def threshold_keeping(scores, fraction: float) -> float:
    """The highest threshold that keeps at least `fraction` of `scores` (score >= threshold is kept): the
    ceil(fraction x N)-th largest score. Ties at it keep a few more."""
    ordered = sorted((float(s) for s in scores), reverse=True)
    if not ordered:
        raise ValueError("clip_keep_fraction: no readable training pair to score")
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def _decoded_pairs(source, format: str, decode: bool):
    """(pair id, key, caption, RGB image, None) of every training pair in order; with `decode` False the image is
    None, and an image that cannot be read gives (pair id, key, caption, None, (reason, detail))."""
    import io

    from PIL import Image

    for pair_id, (key, caption, read) in enumerate(iter_pairs(source, format)):
        image, unreadable_reason = None, None
        if decode:
            try:
                image = Image.open(io.BytesIO(read()[0])).convert("RGB")
            except FileNotFoundError as err:
                unreadable_reason = ("missing_file", str(err))
            except Exception as err:  # PIL's many decode errors
                unreadable_reason = ("undecodable_image", f"{type(err).__name__}: {err}")
        yield pair_id, key, caption, image, unreadable_reason


def filter_dataset(data: str | Path, out: str, stages: Sequence[str], *, format: str, train: str,
                   min_complexity: int, min_actions: int, min_chars: int, min_confidence: float,
                   clip_checkpoint: str | None, clip_threshold: float, device: str | None, workers: int,
                   shard_size: int, max_examples: int, clip_keep_fraction: float | None = None) -> dict:
    """Filter the training pairs of `data` through `stages` into `out` (module docstring); returns
    filter_stats.json's content plus the printable "table". The arguments are `FilterSettings`' fields
    (its defaults: `filter_dataset(**FilterSettings(data=..., out=...).model_dump())`)."""
    import json

    from alignlab.data.importers import check_image
    from alignlab.data.writer import DuplicateKeyError, ShardWriter, image_extension
    from alignlab.filtering.pipeline import STAGES, run_filters

    started = time.perf_counter()
    data, stages = Path(data), tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise ValueError(f"stages {list(stages)}: choose from {', '.join(STAGES)}")
    if workers < 1 or shard_size < 1 or max_examples < 0:
        raise ValueError("workers and shard_size must be >= 1 and max_examples >= 0")
    if clip_keep_fraction is not None and "clip_score" not in stages:
        raise ValueError("clip_keep_fraction sets the clip_score threshold: add clip_score to stages or unset it")
    clip = {}
    source = open_source(data, format, train)
    if "clip_score" in stages:
        if clip_checkpoint is None:
            raise ValueError("stage clip_score needs clip_checkpoint (an alignlab final.pt)")
        import torch

        from alignlab.filtering.clip_score import clip_scores

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, transform = load_clip_scorer(Path(clip_checkpoint), device)
        if clip_keep_fraction is not None:  # a scoring pass of its own: the threshold must be known first
            images, captions, scores = [], [], []
            for _, _, caption, image, unreadable_reason in _decoded_pairs(source, format, decode=True):
                if unreadable_reason:  # not filtered; the pass below records it as skipped
                    continue
                images.append(image)
                captions.append(caption)
                if len(images) == 1024:
                    scores += clip_scores(model, tokenizer, transform, images, captions, 256, device).tolist()
                    images, captions = [], []
            scores += clip_scores(model, tokenizer, transform, images, captions, 256, device).tolist()
            clip_threshold = threshold_keeping(scores, clip_keep_fraction)
        clip = {"clip_model": model, "tokenizer": tokenizer, "image_transform": transform, "device": device,
                "clip_threshold": clip_threshold}
    recorded = _recorded_settings(stages, min_complexity, min_actions, min_chars, min_confidence, clip_checkpoint,
                                  clip_threshold, clip_keep_fraction)
    source_info = {"data_root": str(data), "format": format, "train": train,
                   "dataset_hash": source_dataset_hash(data, source)}
    writer = ShardWriter(out, shard_size=shard_size, generator="alignlab-filter")  # fails early if taken
    needs_image = bool({"text_spotting", "clip_score"} & set(stages))
    keys: list[str] = []
    unreadable: dict[int, tuple[str, str]] = {}  # pair id -> (reason, detail): not filtered, recorded as skipped

    def filter_input():
        for pair_id, key, caption, image, unreadable_reason in _decoded_pairs(source, format, decode=needs_image):
            keys.append(key)
            if unreadable_reason:
                unreadable[pair_id] = unreadable_reason
                continue
            yield pair_id, image, caption

    result = run_filters(filter_input(), stages, workers=workers, min_complexity=min_complexity,
                         min_actions=min_actions, min_chars=min_chars, min_confidence=min_confidence,
                         max_examples=max_examples, **clip)
    stats = result.stats
    kept = set(result.kept_ids)
    examples = {e["sample_id"]: (stage, e) for stage, rows in stats.examples.items() for e in rows}
    removed_rows = []
    with writer:
        for pair_id, (key, caption, read) in enumerate(iter_pairs(source, format)):
            if pair_id in unreadable:
                writer.skip(f"{data}: {key}", *unreadable[pair_id])
                continue
            if pair_id not in kept and pair_id not in examples:
                continue
            try:
                data, meta = read()
            except FileNotFoundError as err:
                writer.skip(f"{data}: {key}", "missing_file", str(err))
                continue
            if image_extension(data) is None:  # e.g. webp in a webdataset source: stored as PNG
                converted, original_format, detail = check_image(data)
                if converted is None:
                    writer.skip(f"{data}: {key}", "undecodable_image", detail)
                    continue
                data, meta["reencoded_from"] = converted, original_format
            if pair_id in examples:
                stage, example = examples[pair_id]
                relpath = f"removed/{stage}/{key}.{image_extension(data)}"
                writer.store.write_bytes(relpath, data)
                removed_rows.append({"stage": stage, "sample_id": key, "caption": caption,
                                     "detail": example["detail"], "image": relpath})
                continue
            meta.setdefault("source", f"filter:{data}")
            try:
                writer.add(key, data, caption, meta)
            except DuplicateKeyError as err:
                writer.skip(f"{data}: {key}", "duplicate_key", str(err))
        elapsed = time.perf_counter() - started
        table = stats.to_dict()
        table["examples"] = {stage: [{**e, "sample_id": keys[e["sample_id"]]} for e in rows]
                             for stage, rows in stats.examples.items()}
        report = {"source": source_info, "filter": recorded, **table,
                  "unreadable": len(unreadable), "written": writer.num_samples, "wall_time_s": round(elapsed, 2),
                  "workers": workers}
        writer.close(source=source_info, filter=recorded, filter_stats=stats.rows())
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
