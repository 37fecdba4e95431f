"""Local-filesystem store. Every write goes to a temporary file in the target folder, is fsynced and
then renamed over the target (`os.replace` is atomic on POSIX), so a reader sees either the old
complete file or the new complete file, never a half-written one, even if the writer dies mid-way.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterable

from alignlab.storage.base import MiB, ObjectInfo, check_key, check_range, checked_range

PARTIAL_MARKER = ".partial-"
CHUNK = MiB


def _is_partial(name: str) -> bool:
    return name.startswith(".") and PARTIAL_MARKER in name


def write_atomically(path: str | Path, chunks: Iterable[bytes]) -> Path:
    """Write `chunks` to `path` through `.<name>.partial-<uuid>` + fsync + os.replace.

    If iterating `chunks` or writing fails, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{PARTIAL_MARKER}{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself lives in the folder's metadata: fsync it so the new name survives a power cut.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def iter_chunks(stream: BinaryIO, size: int = CHUNK) -> Iterable[bytes]:
    while chunk := stream.read(size):
        yield chunk


class LocalStore:
    """A folder on the local filesystem; keys are `/`-separated paths relative to it."""

    def __init__(self, root: str | Path):
        self.root = str(Path(root))

    def __repr__(self) -> str:
        return f"LocalStore(root={self.root!r})"

    def _path(self, key: str) -> Path:
        return Path(self.root, *check_key(key).split("/"))

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        write_atomically(self._path(key), [data])

    def write_stream(self, key: str, stream: BinaryIO) -> None:
        write_atomically(self._path(key), iter_chunks(stream))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self) -> list[str]:
        """Every file under the root, recursively, as sorted keys; leftovers of interrupted writes are
        skipped. A missing root folder is an error (a typo should not look like an empty dataset)."""
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"cannot list {self.root}: no such folder")
        keys = []
        for folder, _, names in os.walk(root):
            rel = Path(folder).relative_to(root)
            keys += [(rel / name).as_posix() for name in names if not _is_partial(name)]
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the file; a missing key is not an error (as on S3)."""
        self._path(key).unlink(missing_ok=True)

    def upload_file(self, local_path: str | Path, key: str) -> None:
        with open(local_path, "rb") as source:
            write_atomically(self._path(key), iter_chunks(source))

    def download_file(self, key: str, local_path: str | Path) -> None:
        with open(self._path(key), "rb") as source:
            write_atomically(local_path, iter_chunks(source))

    def open_read(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def stat(self, key: str) -> ObjectInfo:
        """Size of the file (FileNotFoundError names it when missing); local files have no ETag."""
        return ObjectInfo(size=self._path(key).stat().st_size)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly `length` bytes from offset `start`; OSError naming the file if it ends before that."""
        uri = self.uri(key)
        check_range(uri, start, length)
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            return checked_range(uri, os.pread(fd, length, start), start, length)
        finally:
            os.close(fd)
