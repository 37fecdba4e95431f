"""Corrupt training samples are skipped, counted and named, never trained on silently and never allowed to
stop a run on their own (docs/data-formats.md, "Corrupt data").

Two places find them:
- The shard index (`alignlab.data.shards.WebDatasetIndex`) finds what the tar headers show, before the
  first step and identically on every rank: a missing image or caption member, a member under an
  extension no reader knows, a zero-byte image or caption, a caption over `max_caption_bytes`, two
  members with one extension, and the sample a shard's early end cut through. Those samples never enter
  the index, so the batch order is exactly the one a copy of the dataset without them gives.
- Loading (`WebDatasetIndex.get`) finds the rest, which needs the bytes: an image PIL cannot decode
  (truncated, garbage), a caption that is not UTF-8 or only whitespace, metadata that is not JSON. It
  raises `CorruptSampleError`, and `PairDataset` puts another sample in that batch row (see there).

DataLoader workers are separate processes, so load-time records go to append-only JSON-lines files
(`SkipLog`), one per process; `SkipTracker` folds both kinds into the run's `skips.json` and stops the run
when the skipped fraction exceeds `data.max_skip_fraction`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections import Counter
from pathlib import Path

from alignlab.storage.local import write_atomically

log = logging.getLogger(__name__)

# Why a training sample was skipped; the keys of skips.json's "counts" (and of data/skipped/<reason>).
REASONS = {
    "missing_image": "no .png/.jpg/.jpeg/.webp member",
    "missing_caption": "no .txt member",
    "wrong_extension": "the image or caption is missing and a member under an unknown extension is there instead",
    "duplicate_member": "two members of one sample share an extension",
    "empty_image": "the image member has 0 bytes",
    "undecodable_image": "PIL cannot decode the image (truncated, garbage, not an image)",
    "empty_caption": "the caption has 0 bytes or only whitespace",
    "non_utf8_caption": "the caption bytes are not UTF-8",
    "caption_too_long": "the caption is longer than data.max_caption_bytes",
    "malformed_metadata": "the .json member is not a JSON object",
    "truncated_shard": "the shard ends early (cut mid-file or without its end-of-archive marker) inside this sample",
}
DEFAULT_MAX_CAPTION_BYTES = 16384  # ~50x what a 77-token CLIP context reads; no real caption comes close
SKIPS_FILE = "skips.json"
MAX_LISTED = 1000  # skips.json lists this many samples; the counts cover all of them


class CorruptSampleError(ValueError):
    """One sample that cannot be trained on: `reason` (a REASONS key), the shard, the key and what is wrong."""

    def __init__(self, reason: str, shard: str, key: str, detail: str, index: int | None = None):
        self.record = {"shard": shard, "key": key, "reason": reason, "detail": detail}
        if index is not None:
            self.record["index"] = index
        super().__init__(f"{shard}:{key}: {reason} ({detail})")


class TooManyCorruptSamples(ValueError):
    """More of the training data is corrupt than `data.max_skip_fraction` allows (a one-line message)."""


class SkipLog:
    """Append-only skip records under `folder`, one file per process (workers included), read back deduplicated."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def append(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{socket.gethostname()}-{os.getpid()}.jsonl"
        with path.open("a", encoding="utf-8") as handle:  # one short line per write: appends do not interleave
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """Every record once per (shard, key, reason), in a stable order (a sample revisited in a later
        epoch, or by a run resumed before its checkpoint, is one skip)."""
        found = {}
        for path in sorted(self.folder.glob("*.jsonl")) if self.folder.is_dir() else []:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    found.setdefault((record["shard"], record["key"], record["reason"]), record)
        return [found[k] for k in sorted(found)]

    def clear(self) -> None:
        for path in self.folder.glob("*.jsonl") if self.folder.is_dir() else []:
            path.unlink()


def skip_report(dataset: str, num_indexed: int, scanned: list[dict], loaded: list[dict],
                truncated_shards: list[dict]) -> dict:
    """skips.json: counts per reason over every skipped sample, the samples (first MAX_LISTED) and the
    truncated shards. `num_indexed` samples passed the index; the `scanned` ones were left out of it and
    the `loaded` ones are among the indexed (found when read), so found = indexed + scanned."""
    records = scanned + loaded
    found = num_indexed + len(scanned)
    counts = Counter(record["reason"] for record in records)
    return {"dataset": dataset, "samples_found": found, "skipped": len(records),
            "fraction": len(records) / found if found else 0.0, "counts": dict(sorted(counts.items())),
            "truncated_shards": truncated_shards, "samples": records[:MAX_LISTED]}


def check_skip_fraction(report: dict, max_fraction: float) -> None:
    """Raise TooManyCorruptSamples (one line: dataset, counts per reason, first bad keys) past `max_fraction`."""
    if report["fraction"] <= max_fraction:
        return
    counts = ", ".join(f"{reason} {n}" for reason, n in report["counts"].items())
    first = ", ".join(f"{r['shard']}:{r['key']} ({r['reason']})" for r in report["samples"][:3])
    raise TooManyCorruptSamples(
        f"{report['dataset']}: {report['skipped']} of {report['samples_found']} training samples are corrupt "
        f"({report['fraction']:.2%} > data.max_skip_fraction={max_fraction}): {counts}; first: {first}; repair or "
        "drop them (skips.json lists them) or raise data.max_skip_fraction")


def skip_metrics(report: dict) -> dict[str, float]:
    """`data/skipped/<reason>` for every reason (0 when none), for MLflow."""
    return {f"data/skipped/{reason}": float(report["counts"].get(reason, 0)) for reason in REASONS}


class SkipTracker:
    """One run's skips: the index's, plus the load-time records its `SkipLog` (under `run_dir/skips/`)
    collects from every process. `update()` rewrites `run_dir/skips.json` (when `write`) and raises once
    the skipped fraction exceeds `max_fraction`. Built before the first loader, so workers inherit the log."""

    def __init__(self, dataset, run_dir: str | Path, max_fraction: float, fresh: bool, write: bool):
        source = dataset.source
        self.scanned = list(getattr(source, "skipped", []))
        self.truncated = list(getattr(source, "truncated_shards", []))
        self.num_indexed, self.max_fraction, self.name, self.write = len(dataset), max_fraction, dataset.name, write
        self.path = Path(run_dir) / SKIPS_FILE
        self.log = SkipLog(Path(run_dir) / "skips")
        if fresh and write:
            self.log.clear()
        dataset.skip_log = self.log

    def update(self) -> dict:
        report = skip_report(self.name, self.num_indexed, self.scanned, self.log.read(), self.truncated)
        if self.write:
            write_atomically(self.path, [json.dumps(report, indent=1).encode()])
        check_skip_fraction(report, self.max_fraction)
        return report


def load_skip_report(run_dir: str | Path) -> dict | None:
    """The skips.json a run left, None when it has none (older runs, or data without a shard index)."""
    path = Path(run_dir) / SKIPS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
