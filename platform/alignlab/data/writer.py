"""Write webdataset tar shards of image-caption pairs, with a manifest (docs/data-formats.md,
"Importing and filtering").

    with ShardWriter("s3://bucket/coco-train", shard_size=1000) as writer:   # or a local folder
        writer.add("391895_1", png_bytes, "A man riding a bike.", {"image_id": 391895})
        writer.skip("captions.json: annotation 17", "empty_caption")
    # -> <out>/train/shard-000000.tar ..., <out>/manifest.json

The layout is SynthCaps' training split: per sample key `<key>.png|jpg` (the image bytes as given, never
re-encoded), `<key>.txt` (UTF-8 caption) and `<key>.json` (metadata with `sample_id` and `source`), so
`WebDatasetIndex` and `alignlab train` with `data.root=<out>` (format webdataset, train `train`) read it
unchanged. Each shard is assembled in a local temporary file and handed to `alignlab.storage`, which
makes it visible under its final name only once complete (local: rename; S3: single PUT or completed
multipart upload). Tar members carry fixed metadata (mtime 0, uid 0), so the same samples give
byte-identical shards.

Nothing is dropped silently: a caller that cannot use an item records it with `skip(item, reason)`, and
`close()` writes every skipped item and the counts per reason into the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
from collections import Counter
from typing import BinaryIO

from alignlab.storage import open_store

log = logging.getLogger(__name__)

WRITER_VERSION = "1.0.0"
IMAGE_MEMBER_EXTENSIONS = ("png", "jpg")
MAX_KEY_LENGTH = 80  # key + ".json" stays far below the 100-character ustar name field
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (POSIX ustar header from the standard library, data, zero padding to 512 bytes) with
    fixed metadata, so that shards are byte-identical across runs. Built directly rather than through
    TarFile.addfile, which costs a third of the time per training pair."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def tar_trailer(archive_length: int) -> bytes:
    """The bytes that close an archive of `archive_length` bytes of members: the end-of-archive marker
    (two zero blocks), then zero padding to whole 10 KiB records, as tar itself writes."""
    length = archive_length + 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + (-length % tarfile.RECORDSIZE))


def tar_archive(members: list[bytes]) -> bytes:
    """A complete archive from `tar_member` outputs."""
    body = b"".join(members)
    return body + tar_trailer(len(body))


def check_key(key: str) -> str:
    """Return `key` if it is a valid sample key, else raise ValueError saying how to fix it.

    Valid keys start with a letter or digit, contain only letters, digits, `_` and `-`, and have at most
    MAX_KEY_LENGTH characters: webdataset cuts the key at the first dot and treats `/` as a folder, and
    member names must fit a ustar header. `sanitize_key` turns any string into a valid key."""
    if not isinstance(key, str) or not _KEY.match(key) or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"invalid sample key {key!r}: use 1-{MAX_KEY_LENGTH} characters from [A-Za-z0-9_-] "
                         "starting with a letter or digit (no dots or slashes; sanitize_key(...) makes one)")
    return key


def sanitize_key(raw: str) -> str:
    """A valid sample key derived from `raw` (e.g. a file name or a source id).

    Runs of other characters become `_` (`COCO_val2014_0001.jpg` -> `COCO_val2014_0001_jpg`); a key that
    would be empty, start with `_`/`-` or be too long gets a short hash of `raw` so it stays unique and
    deterministic. Two different raws may still map to one key (`a.b`, `a_b`): writers reject the second
    as a duplicate, and importers record it as skipped."""
    key = _UNSAFE_RUN.sub("_", str(raw))
    if _KEY.match(key) and len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.sha256(str(raw).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    stem = key.strip("_-")[: MAX_KEY_LENGTH - len(digest) - 1]
    return f"{stem}_{digest}" if stem else f"k{digest}"


def dataset_hash(files: dict[str, str]) -> str:
    """SynthCaps' dataset hash: sha256 over the sorted `path<TAB>sha256` lines of the files."""
    return hashlib.sha256("".join(f"{p}\t{h}\n" for p, h in sorted(files.items())).encode()).hexdigest()


def manifest_dataset_hash(root: str | os.PathLike) -> str | None:
    """The `dataset_hash` recorded in `<root>/manifest.json` (SynthCaps, imports and filters write one), for a
    local folder or an `s3://` prefix; None when there is no manifest or it records no hash."""
    from alignlab import storage

    uri = f"{os.fspath(root).rstrip('/')}/manifest.json"
    if not storage.exists(uri):
        return None
    found = json.loads(storage.read_bytes(uri)).get("dataset_hash")
    return found if isinstance(found, str) and found else None


class DuplicateKeyError(ValueError):
    """`ShardWriter.add` got a key that an earlier sample of this writer already has."""


class ShardWriter:
    """Write samples into `<out_uri>/<split>/<prefix>-NNNNNN.tar` shards of `shard_size` samples each.

    `add(key, image_bytes, caption, meta)` appends one sample (the image must already be encoded PNG or
    JPEG bytes; the extension is read from the bytes). `skip(item, reason, detail)` records an item the
    caller could not use. `close(**extra)` writes the last shard and `<out_uri>/manifest.json`:
    {"generator", "generator_version", "counts", "files" {relpath: sha256}, "dataset_hash", "skipped"
    [{"item", "reason", "detail"}], "skipped_counts" {reason: n}} plus the `extra` fields (e.g. the source
    and settings of an import). Use it as a context manager: on an exception no manifest is written, so
    an interrupted job never leaves a complete-looking dataset behind.
    """

    def __init__(self, out_uri: str | os.PathLike, shard_size: int = 1000, prefix: str = "shard",
                 split: str = "train", generator: str = "alignlab-import"):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if not re.match(r"^[A-Za-z0-9_-]+$", prefix) or not re.match(r"^[A-Za-z0-9_-]+$", split):
            raise ValueError(f"prefix {prefix!r} and split {split!r} must be non-empty [A-Za-z0-9_-] names")
        self.out_uri = os.fspath(out_uri)
        self.store = open_store(self.out_uri)
        if self.store.exists("manifest.json"):
            raise FileExistsError(f"{self.store.uri('manifest.json')} exists: {self.out_uri} already holds a "
                                  "dataset; choose another --out or delete it first")
        try:
            leftovers = [key for key in self.store.list() if key.startswith(f"{split}/")]
        except FileNotFoundError:  # a local folder that does not exist yet
            leftovers = []
        if leftovers:  # readers take every .tar of the folder: old shards would mix into this dataset
            raise FileExistsError(f"{self.out_uri} already has {len(leftovers)} file(s) under {split}/ (first: "
                                  f"{leftovers[0]}), e.g. from an interrupted run; delete them or choose another --out")
        self.shard_size, self.prefix, self.split, self.generator = shard_size, prefix, split, generator
        self.files: dict[str, str] = {}
        self.skipped: list[dict] = []
        self.skipped_counts: Counter = Counter()
        self.num_samples = 0
        self.image_counts: Counter = Counter()
        self._keys: set[str] = set()
        self._shard: BinaryIO | None = None
        self._shard_digest = None
        self._shard_length = 0
        self._in_shard = 0
        self._closed = False

    # ---- samples -----------------------------------------------------------------------------------

    def has_key(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str, image_bytes: bytes, caption: str, meta: dict | None = None) -> None:
        """Append one sample. `meta` is stored as `<key>.json` with `sample_id` set to `key` and `source`
        defaulting to the generator name. Raises ValueError on an invalid key, DuplicateKeyError on a
        repeated one, and ValueError if the image is not PNG/JPEG bytes or the caption not a string."""
        if self._closed:
            raise ValueError("ShardWriter is closed; open a new one to write more samples")
        check_key(key)
        if key in self._keys:
            raise DuplicateKeyError(f"sample key {key!r} was already written to {self.out_uri}; keys must be unique")
        extension = image_extension(image_bytes)
        if extension is None:
            raise ValueError(f"sample {key!r}: image bytes are neither PNG nor JPEG (starts with "
                             f"{bytes(image_bytes[:8])!r}); re-encode it, e.g. with encode_png(...)")
        if not isinstance(caption, str):
            raise ValueError(f"sample {key!r}: caption must be a str, got {type(caption).__name__}")
        meta = dict(meta or {})
        meta["sample_id"] = key
        meta.setdefault("source", self.generator)
        members = (tar_member(f"{key}.{extension}", bytes(image_bytes)),
                   tar_member(f"{key}.txt", caption.encode("utf-8")),
                   tar_member(f"{key}.json", json.dumps(meta, separators=(",", ":")).encode()))
        if self._shard is None:
            self._open_shard()
        for member in members:
            self._shard.write(member)
            self._shard_digest.update(member)
            self._shard_length += len(member)
        self._keys.add(key)
        self.num_samples += 1
        self.image_counts[extension] += 1
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self._finish_shard()

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        """Record a source item that was not written, and why (`reason` is a short fixed name such as
        `missing_file`; `detail` says more about this one item)."""
        self.skipped.append({"item": _printable(item), "reason": reason, "detail": _printable(detail)})
        self.skipped_counts[reason] += 1

    # ---- shards ------------------------------------------------------------------------------------

    def _shard_relpath(self, number: int) -> str:
        return f"{self.split}/{self.prefix}-{number:06d}.tar"

    def _open_shard(self) -> None:
        self._shard = tempfile.TemporaryFile(prefix="alignlab-shard-")
        self._shard_digest = hashlib.sha256()
        self._shard_length, self._in_shard = 0, 0

    def _finish_shard(self) -> None:
        trailer = tar_trailer(self._shard_length)
        self._shard.write(trailer)
        self._shard_digest.update(trailer)
        relpath = self._shard_relpath(len(self.files))
        self._shard.seek(0)
        self.store.write_stream(relpath, self._shard)  # atomic: see the module docstring
        self._shard.close()
        self.files[relpath] = self._shard_digest.hexdigest()
        self._shard, self._shard_digest = None, None

    # ---- the end -----------------------------------------------------------------------------------

    def summary(self) -> dict:
        """Counts so far: written samples, shards, skipped items in total and per reason."""
        return {self.split: self.num_samples, f"{self.split}_shards": len(self.files) + (self._shard is not None),
                "skipped": len(self.skipped), "images": dict(sorted(self.image_counts.items()))}

    def close(self, **extra) -> dict:
        """Write the last shard and manifest.json; returns the manifest. `extra` fields are added to it."""
        if self._closed:
            raise ValueError("ShardWriter.close() was already called")
        if self._shard is not None:
            self._finish_shard()
        self._closed = True
        if not self.num_samples:
            log.warning("%s: no sample written (%d skipped); the manifest records why", self.out_uri,
                        len(self.skipped))
        files = dict(sorted(self.files.items()))
        manifest = {"generator": self.generator, "generator_version": WRITER_VERSION, "format": "webdataset",
                    "train": self.split, **extra, "counts": self.summary(), "files": files,
                    "dataset_hash": dataset_hash(files), "skipped": self.skipped,
                    "skipped_counts": dict(sorted(self.skipped_counts.items()))}
        self.store.write_bytes("manifest.json", json.dumps(manifest, indent=2).encode())
        return manifest

    def abort(self) -> None:
        """Drop the shard being assembled; shards already stored stay, and no manifest is written."""
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def image_extension(data: bytes) -> str | None:
    """`png` or `jpg` from the file signature of encoded image bytes; None for anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    return None


def _printable(text) -> str:
    """`text` as a str that encodes to UTF-8: undecodable bytes (surrogate escapes) become `\\xNN`."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")
