"""One storage layer for local paths and `s3://bucket/key` URIs (issue "Data at real scale", section 1),
used by datasets, caches, checkpoints and reports.

    store = open_store("s3://bucket/runs/exp1")        # or open_store("/data/runs/exp1")
    store.write_bytes("metrics.json", data)             # keys are relative to the store root
    write_bytes("s3://bucket/runs/exp1/metrics.json", data)  # or one-off helpers on full URIs

Guarantees:
- Atomic writes. Local: temporary file in the same folder + fsync + os.replace. S3: a single PUT, or
  a multipart upload that only becomes visible when completed (see `alignlab.storage.s3`).
- Retries with exponential backoff and full jitter on connection errors, 5xx and throttling
  (`base.RetryPolicy`, `attempts` below); 4xx errors (NoSuchKey, AccessDenied, ...) fail at once with
  FileNotFoundError / PermissionError naming the URI.
- S3 credentials only from the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or
  MINIO_ACCESS_KEY / MINIO_SECRET_KEY), endpoint AWS_ENDPOINT_URL or S3_ENDPOINT_URL, optional
  AWS_REGION. The `minio` package (extra "storage") is imported only when an s3:// URI is opened.
- Random access: `read_range(uri, start, length)` (`Store.read_range`) returns exactly `length`
  bytes with one ranged GET under the same retry policy, and `stat(uri)` gives size and ETag; a
  `RangedReader` turns them into a seekable file, which is how training walks tar shards in S3
  (`alignlab.data.shards.WebDatasetIndex`). Pickled S3 stores carry no credentials: the copy reads
  them from its own process's environment.
- Manifests: `write_manifest` records the sha256 of every object, `verify_manifest` and
  `read_bytes(..., expected_sha256=...)` raise ChecksumMismatchError naming each bad object.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Iterable

from alignlab.storage.base import (DEFAULT_ATTEMPTS, DEFAULT_PART_SIZE, S3_SCHEME, ChecksumMismatchError,
                                   ObjectInfo, RetryPolicy, Store, split_s3_uri)
from alignlab.storage.local import LocalStore, iter_chunks
from alignlab.storage.ranged import RangedReader

__all__ = ["ChecksumMismatchError", "LocalStore", "MANIFEST_NAME", "ObjectInfo", "RangedReader", "RetryPolicy",
           "Store", "download_file", "download_tree", "exists", "is_remote", "list_prefix", "load_manifest",
           "open_read", "open_store", "read_bytes", "read_range", "sha256_of", "stat", "upload_file",
           "url_for_webdataset", "verify_manifest", "write_bytes", "write_manifest"]

MANIFEST_NAME = "storage-manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_scheme(uri: str | os.PathLike) -> str:
    uri = os.fspath(uri)
    if "://" in uri and not uri.startswith(S3_SCHEME):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/key")
    return uri


def open_store(uri: str | os.PathLike, attempts: int = DEFAULT_ATTEMPTS,
               part_size: int = DEFAULT_PART_SIZE) -> Store:
    """The store rooted at `uri` (a local folder or `s3://bucket[/prefix]`). `attempts` and `part_size`
    (multipart chunk, >= 5 MiB) only concern S3: local filesystem errors are not transient."""
    uri = _check_scheme(uri)
    if not uri.startswith(S3_SCHEME):
        return LocalStore(uri)
    # Imported here because minio is the optional "storage" extra; local paths work without it.
    from alignlab.storage.s3 import S3Store, settings_from_env

    bucket, prefix = split_s3_uri(uri)
    return S3Store(settings_from_env(), bucket, prefix, RetryPolicy(attempts=attempts), part_size)


def _locate(uri: str | os.PathLike) -> tuple[Store, str]:
    """The store holding the object `uri`, and its key there."""
    uri = _check_scheme(uri)
    if uri.startswith(S3_SCHEME):
        bucket, key = split_s3_uri(uri)
        if not key:
            raise ValueError(f"{uri!r} names a bucket, not an object; expected s3://bucket/key")
        return open_store(S3_SCHEME + bucket), key
    path = Path(uri)
    return LocalStore(path.parent), path.name


def read_bytes(uri: str | os.PathLike, expected_sha256: str | None = None) -> bytes:
    """The object's bytes; with `expected_sha256` (e.g. from `load_manifest`) they are verified."""
    store, key = _locate(uri)
    data = store.read_bytes(key)
    if expected_sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != expected_sha256:
        raise ChecksumMismatchError({store.uri(key): (expected_sha256, actual)})
    return data


def read_range(uri: str | os.PathLike, start: int, length: int) -> bytes:
    """Exactly `length` bytes of the object from offset `start` (one ranged GET on S3)."""
    store, key = _locate(uri)
    return store.read_range(key, start, length)


def stat(uri: str | os.PathLike) -> ObjectInfo:
    """Size (and ETag on S3) of the object; FileNotFoundError naming it when missing."""
    store, key = _locate(uri)
    return store.stat(key)


def is_remote(uri: str | os.PathLike) -> bool:
    """Whether `uri` names object storage (s3://) rather than a local path."""
    return _check_scheme(uri).startswith(S3_SCHEME)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    store, key = _locate(uri)
    store.write_bytes(key, data)


def exists(uri: str | os.PathLike) -> bool:
    store, key = _locate(uri)
    return store.exists(key)


def list_prefix(uri: str | os.PathLike) -> list[str]:
    """Full URIs of every object under the folder `uri` (recursive, sorted)."""
    store = open_store(uri)
    return [store.uri(key) for key in store.list()]


def upload_file(local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
    store, key = _locate(uri)
    store.upload_file(local_path, key)


def download_file(uri: str | os.PathLike, local_path: str | os.PathLike) -> None:
    store, key = _locate(uri)
    store.download_file(key, local_path)


def download_tree(uri_prefix: str | os.PathLike, keys: Iterable[str], local_dir: str | os.PathLike,
                  checksums: dict[str, str] | None = None, threads: int = 8) -> Path:
    """Download the objects `keys` (relative to `uri_prefix`) into the folder `local_dir`, all or nothing.

    Everything lands in a temporary sibling folder first; `local_dir` appears (one rename) only once
    every object is there and, for keys in `checksums` (key -> sha256, e.g. a manifest's `files`),
    verified. A failure leaves no `local_dir` and no temporary folder; ChecksumMismatchError names each
    bad object. If another process completed `local_dir` meanwhile, its copy is kept. Objects are
    fetched on `threads` threads (small files are latency-bound)."""
    store, local_dir = open_store(uri_prefix), Path(local_dir)
    keys = sorted(set(keys))
    if not keys:
        raise ValueError(f"download_tree({store.root!r}) got no keys to download")
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_dir.parent / f".{local_dir.name}.partial-{uuid.uuid4().hex}"

    def fetch(key: str) -> tuple[str, str, str] | None:
        data = store.read_bytes(key)
        target = tmp.joinpath(*key.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        want = (checksums or {}).get(key)
        if want is not None and (got := hashlib.sha256(data).hexdigest()) != want:
            return store.uri(key), want, got
        return None

    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            bad = [found for found in pool.map(fetch, keys) if found is not None]
        if bad:
            raise ChecksumMismatchError({uri: (want, got) for uri, want, got in bad})
        try:
            os.rename(tmp, local_dir)
        except OSError:
            if not local_dir.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dir


def open_read(uri: str | os.PathLike) -> BinaryIO:
    """A binary stream of the object (e.g. `tarfile.open(fileobj=..., mode="r|")` for a shard)."""
    store, key = _locate(uri)
    return store.open_read(key)


def url_for_webdataset(uri: str | os.PathLike) -> str:
    """A URL webdataset 1.0.2 opens (through `webdataset.gopen`) for the shard at `uri`.

    Local paths are returned unchanged. `s3://bucket/key` becomes
    `pipe:<this python> -m alignlab.storage.s3 's3://bucket/key'`, a child process that streams the
    object to stdout with the same credentials (inherited environment), retries and clear errors as
    this module. A pipe is used rather than a presigned HTTP URL because webdataset puts the URL into
    its error messages and curl's command line, and a presigned URL carries the access key id and a
    signature, and expires (a long epoch can outlive it). Brace patterns survive the quoting, so
    `url_for_webdataset("s3://b/shard-{000000..000009}.tar")` can be given to `webdataset.WebDataset`.
    webdataset refuses pipe: URLs when WDS_SECURE=1. A missing or unreadable object reaches webdataset
    as an IOError with the child's exit status 1 or as `tarfile.ReadError('empty file')` (whichever it
    notices first); the child's stderr names the object and the cause.
    """
    uri = _check_scheme(uri)
    if not uri.startswith(S3_SCHEME):
        return uri
    split_s3_uri(uri)
    return "pipe:" + shlex.join([sys.executable, "-m", "alignlab.storage.s3", uri])


def sha256_of(store: Store, key: str) -> str:
    """sha256 of one object, streamed (never the whole object in memory)."""
    digest = hashlib.sha256()
    with store.open_read(key) as stream:
        for chunk in iter_chunks(stream):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(uri_prefix: str | os.PathLike, files: Iterable[str], name: str = MANIFEST_NAME) -> dict[str, str]:
    """Hash each object `files` names (keys relative to `uri_prefix`) as it is stored, and write
    `{"algorithm": "sha256", "files": {key: sha256}}` to `<uri_prefix>/<name>`. The `files` mapping has
    the layout of SynthCaps' manifest.json, so `verify_manifest(root, name="manifest.json")` checks a
    SynthCaps dataset too. Returns the key -> sha256 mapping."""
    store = open_store(uri_prefix)
    checksums = {key: sha256_of(store, key) for key in sorted(set(files))}
    if not checksums:
        raise ValueError(f"write_manifest({store.root!r}) got no files; pass the keys to record")
    body = {"algorithm": "sha256", "files": checksums}
    store.write_bytes(name, json.dumps(body, indent=1, sort_keys=True).encode())
    return checksums


def load_manifest(uri_prefix: str | os.PathLike, name: str = MANIFEST_NAME) -> dict[str, str]:
    """The key -> sha256 mapping stored in `<uri_prefix>/<name>`."""
    store = open_store(uri_prefix)
    try:
        body = json.loads(store.read_bytes(name))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{store.uri(name)} is not valid JSON ({exc}); rewrite it with write_manifest") from exc
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{store.uri(name)} is not a checksum manifest: need a JSON object with a 'files' "
                         "mapping of key -> sha256 (as write_manifest writes)")
    bad = [key for key, digest in files.items() if not isinstance(digest, str) or not _SHA256.match(digest)]
    if bad:
        raise ValueError(f"{store.uri(name)}: entries {bad[:5]} are not 64-hex-digit sha256 checksums")
    return files


def verify_manifest(uri_prefix: str | os.PathLike, name: str = MANIFEST_NAME) -> dict[str, str]:
    """Re-hash every object in the manifest; raise ChecksumMismatchError naming each object whose
    content changed, FileNotFoundError for one that is gone. Returns the verified mapping."""
    store = open_store(uri_prefix)
    expected = load_manifest(uri_prefix, name)
    mismatches = {}
    for key, want in sorted(expected.items()):
        actual = sha256_of(store, key)
        if actual != want:
            mismatches[store.uri(key)] = (want, actual)
    if mismatches:
        raise ChecksumMismatchError(mismatches)
    return expected
