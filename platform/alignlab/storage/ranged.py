"""A read-only, seekable file over ranged reads, so code written for files (`tarfile`) can walk an
object in S3 without downloading it.

`tarfile.open(fileobj=RangedReader(...), mode="r:")` reads each 512-byte member header and seeks over
the member's body; every read that falls outside the current buffer becomes one ranged GET (clipped
to the object). The size of that GET adapts to the data: it starts at `min_readahead`, doubles (up to
`readahead`) while the reads land within one window of the previous buffer's end (small members: one
GET then covers many headers), and drops back to `min_readahead` when the reader jumps further (large
members: each header costs one small GET and the bodies are never fetched).
"""

from __future__ import annotations

import io
import os
from typing import Callable

from alignlab.storage.base import MiB

DEFAULT_READAHEAD = MiB // 16  # 64 KiB: one GET costs about the same for 512 B and 64 KiB
MIN_READAHEAD = 1024  # a tar header plus tarfile's 1-byte probe just before it


class RangedReader(io.RawIOBase):
    """`read_range(start, length) -> bytes` (exactly `length` bytes) seen as a file of `size` bytes.

    `name` (a URI) is what errors and `repr` show. `requests` and `bytes_fetched` count the ranged
    reads made, for benchmarks and tests.
    """

    def __init__(self, read_range: Callable[[int, int], bytes], size: int, name: str,
                 readahead: int = DEFAULT_READAHEAD, min_readahead: int = MIN_READAHEAD):
        super().__init__()
        if size < 0 or not 1 <= min_readahead <= readahead:
            raise ValueError(f"RangedReader({name!r}): need size >= 0 and 1 <= min_readahead <= readahead, got "
                             f"size={size}, min_readahead={min_readahead}, readahead={readahead}")
        self._read_range, self.size, self.name = read_range, size, name
        self.readahead, self.min_readahead, self._window = readahead, min_readahead, min_readahead
        self._pos, self._buffer, self._buffer_start = 0, b"", 0
        self.requests, self.bytes_fetched = 0, 0

    def __repr__(self) -> str:
        return f"RangedReader({self.name!r}, size={self.size})"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"{self.name}: invalid whence {whence}")
        if base + offset < 0:
            raise ValueError(f"{self.name}: cannot seek to negative position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._pos + size)
        if end <= self._pos:
            return b""
        buffer_end = self._buffer_start + len(self._buffer)
        if not (self._buffer_start <= self._pos and end <= buffer_end):
            if self._buffer:
                gap = self._pos - buffer_end
                jumped = gap > self._window or gap < -len(self._buffer)
                self._window = self.min_readahead if jumped else min(self.readahead, 2 * self._window)
            length = min(self.size - self._pos, max(end - self._pos, self._window))
            self._buffer, self._buffer_start = self._read_range(self._pos, length), self._pos
            self.requests, self.bytes_fetched = self.requests + 1, self.bytes_fetched + length
        data = self._buffer[self._pos - self._buffer_start:end - self._buffer_start]
        self._pos = end
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
