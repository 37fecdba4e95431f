"""What every store shares: the `Store` interface, URI parsing, checksum errors and the retry loop.

A store is rooted at a folder (`/data/run1` or `s3://bucket/run1`) and takes keys relative to that
root, always written with `/`. Backends: `alignlab.storage.local.LocalStore` and
`alignlab.storage.s3.S3Store`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("alignlab.storage")

S3_SCHEME = "s3://"
MiB = 1024 * 1024
# S3 requires parts of at least 5 MiB; 64 MiB keeps a 1 TB object under the 10,000-part limit.
DEFAULT_PART_SIZE = 64 * MiB
DEFAULT_ATTEMPTS = 5

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD (or os.stat) tells about an object: its size and, on S3, its ETag (unquoted).
    Local files have no ETag (None)."""

    size: int
    etag: str | None = None


class Store(Protocol):
    """The operations datasets, caches, checkpoints and reports need from a storage backend."""

    root: str

    def uri(self, key: str) -> str: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def write_stream(self, key: str, stream: BinaryIO) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def upload_file(self, local_path: str | Path, key: str) -> None: ...
    def download_file(self, key: str, local_path: str | Path) -> None: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def read_range(self, key: str, start: int, length: int) -> bytes: ...


class ChecksumMismatchError(ValueError):
    """Objects whose sha256 differs from the manifest; `mismatches` maps URI -> (expected, actual)."""

    def __init__(self, mismatches: dict[str, tuple[str, str]]):
        self.mismatches = mismatches
        lines = [f"  {uri}: expected sha256 {want}, got {got}" for uri, (want, got) in mismatches.items()]
        super().__init__(f"{len(mismatches)} object(s) fail checksum verification (corrupted or "
                         "overwritten since the manifest was written; re-upload them):\n" + "\n".join(lines))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`); the key may be empty (the bucket itself)."""
    if not uri.startswith(S3_SCHEME):
        raise ValueError(f"{uri!r} is not an S3 URI; expected s3://bucket/key")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket name; expected s3://bucket/key")
    return bucket, key


def check_key(key: str) -> str:
    """Reject keys that are empty, absolute, or climb out of the store root with `..`."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid storage key {key!r}: use a relative path like 'train/shard-000000.tar' "
                         "without empty, '.' or '..' components")
    return key


def check_range(uri: str, start: int, length: int) -> None:
    """Reject a negative start or length before any request is made."""
    if start < 0 or length < 0:
        raise ValueError(f"read_range({uri!r}, start={start}, length={length}): start and length must be >= 0")


def checked_range(uri: str, data: bytes, start: int, length: int) -> bytes:
    """`data` if it holds exactly the `length` bytes asked for; a short read means the object ends
    before `start + length` (it is smaller than whoever computed the range believed)."""
    if len(data) != length:
        raise OSError(f"{uri}: read {len(data)} of {length} bytes at offset {start}: the object is shorter "
                      "than expected (truncated, or changed since it was indexed); re-upload it or rebuild the index")
    return data


class RetryPolicy(BaseModel):
    """Exponential backoff with full jitter: before retry n (n = 1, 2, ...) sleep
    uniform(0, min(max_delay, base_delay * 2 ** (n - 1))) seconds (AWS Architecture Blog,
    "Exponential Backoff And Jitter", 2015). `attempts` counts the first try."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    attempts: int = Field(DEFAULT_ATTEMPTS, ge=1)
    base_delay: float = Field(0.2, ge=0)
    max_delay: float = 10.0

    @model_validator(mode="after")
    def _ordered(self) -> "RetryPolicy":
        if self.max_delay < self.base_delay:
            raise ValueError(f"RetryPolicy needs base_delay <= max_delay, got base_delay={self.base_delay}, "
                             f"max_delay={self.max_delay}")
        return self

    def delay_cap(self, retry: int) -> float:
        """Upper bound of the sleep before retry number `retry` (1-based)."""
        return min(self.max_delay, self.base_delay * 2 ** (retry - 1))


def call_with_retries(operation: Callable[[], T], describe: str, is_transient: Callable[[BaseException], bool],
                      policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep,
                      uniform: Callable[[float, float], float] = random.uniform) -> T:
    """Run `operation()`, retrying transient failures per `policy`; anything else is raised at once.

    After the last attempt the last exception is re-raised unchanged, so callers can translate it.
    `describe` (a URI plus the action) is what the log lines name; it must never contain secrets.
    """
    for attempt in range(1, policy.attempts):
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = uniform(0.0, policy.delay_cap(attempt))
            log.info("%s: transient %s on attempt %d/%d, retrying in %.2fs",
                     describe, type(exc).__name__, attempt, policy.attempts, delay)
            sleep(delay)
    try:
        return operation()
    except Exception as exc:
        if policy.attempts > 1 and is_transient(exc):
            log.warning("%s: giving up after %d attempts (%s)", describe, policy.attempts, type(exc).__name__)
        raise
