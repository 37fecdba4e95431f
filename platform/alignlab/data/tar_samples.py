"""Webdataset tars as samples: one member walker and one grouper, shared by training (random access over
the headers, `alignlab.data.shards`) and import (a stream read once, `alignlab.data.importers`).

A sample is a run of consecutive members with the same key: the member name up to the first dot of its
basename, directory included (`a/b.seg.png` -> key `a/b`, extension `seg.png`); members named like
`__meta__` are webdataset's own and skipped, as webdataset skips them.

A tar that ends early is reported, never taken for a shorter archive. `tarfile` reads a file cut at a
member boundary (or one whose next header is garbage) as a normal end, so a cut there would silently
lose the rest of the shard; `TarWalk` therefore requires the zero block that ends every tar after the
last member, and a member whose body runs past the end of the data is the member the cut went through.
Members before the cut are yielded as usual; `TarWalk.cut` says where and how the archive stopped.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_STREAM_TAIL = 4 * tarfile.RECORDSIZE  # tarfile's stream mode reads whole 10 KiB records


@dataclass(frozen=True)
class TarMember:
    """A regular member: its name, where its data starts, its size and (streams only) its bytes."""

    name: str
    offset: int
    size: int
    data: bytes | None = None


@dataclass(frozen=True)
class TarCut:
    """Where an archive stops early: `offset` is the byte at which data ran out (or the bad header sits);
    `member` names the member whose body the cut went through, None for a cut between members."""

    offset: int
    member: str | None
    detail: str


@dataclass
class TarSample:
    """The members of one key, by lower-case extension; `problems` lists what a reader cannot use
    (two members with one extension, a member without extension); `cut` is set on the last sample
    before an early end of the archive (the walk's cut)."""

    key: str
    members: dict[str, TarMember] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    cut: TarCut | None = None


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member, webdataset style: `a/b.seg.png` -> (`a/b`, `seg.png`)."""
    directory, _, basename = name.rpartition("/")
    stem, dot, extension = basename.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def is_meta_member(name: str) -> bool:
    """webdataset's own members (`__meta__`, `__dir__/...`, `__meta__.json`), which hold no sample."""
    stem = name.rpartition("/")[2].partition(".")[0]
    return bool(_META_MEMBER.match(name)) or (len(stem) > 4 and stem.startswith("__") and stem.endswith("__"))


class _Tail(io.RawIOBase):
    """A stream that remembers how many bytes it gave and the last ones, so the block tarfile read as
    "the end" can be looked at afterwards."""

    def __init__(self, raw):
        super().__init__()
        self.raw, self.total, self.tail = raw, 0, b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-_STREAM_TAIL:]
        return data

    def block_at(self, offset: int) -> bytes:
        start = offset - (self.total - len(self.tail))
        return self.tail[start:start + tarfile.BLOCKSIZE] if start >= 0 else b""


class TarWalk:
    """The regular members of one tar, in order, as `TarMember`s; after the iteration `cut` is None
    when the archive ended with its end-of-archive marker, else a `TarCut`.

    `size` given: `fileobj` is seekable (a local file, a RangedReader) and is walked header by header,
    seeking over the bodies ("r:", uncompressed only). `size` None: `fileobj` is a stream read once
    ("r|*"), and `read_data` puts each member's bytes in `TarMember.data`. `name` is what errors show.
    A file that is not a tar at all raises ValueError naming it."""

    def __init__(self, fileobj, name: str, size: int | None = None, read_data: bool = False):
        self.fileobj, self.name, self.size, self.read_data = fileobj, name, size, read_data
        self.cut: TarCut | None = None

    def __iter__(self) -> Iterator[TarMember]:
        if self.size == 0:
            self.cut = TarCut(0, None, "the file is empty (0 bytes)")
            return
        stream = _Tail(self.fileobj) if self.size is None else None
        try:
            tar = tarfile.open(fileobj=stream or self.fileobj, mode="r|*" if stream else "r:")
        except tarfile.ReadError as err:
            if stream is not None and stream.total == 0:
                self.cut = TarCut(0, None, "the stream is empty (0 bytes)")
                return
            if stream is not None:
                raise ValueError(f"{self.name} is not a tar archive ({err})") from None
            raise ValueError(f"{self.name} is not an uncompressed tar ({err}); random access needs plain .tar "
                             "shards (re-pack without compression, or stream it with iter_webdataset)") from None
        with tar:
            yield from self._members(tar, stream)

    def _members(self, tar: tarfile.TarFile, stream: _Tail | None) -> Iterator[TarMember]:
        info = None
        try:
            for info in tar:
                if not info.isreg() or is_meta_member(info.name):
                    continue
                if stream is None and info.offset_data + info.size > self.size:
                    self.cut = self._cut_inside(info, self.size)
                    return
                data = tar.extractfile(info).read() if stream is not None and self.read_data else None
                if data is not None and len(data) != info.size:
                    self.cut = self._cut_inside(info, info.offset_data + len(data))
                    return
                yield TarMember(info.name, info.offset_data, info.size, data)
        except (tarfile.ReadError, EOFError) as err:
            end = stream.total if stream is not None else self.size
            if info is not None and end < info.offset_data + info.size:
                self.cut = self._cut_inside(info, end)
            else:
                self.cut = TarCut(min(end, tar.offset), None, f"the data stops at byte {min(end, tar.offset)}, "
                                  f"where the member after {info.name if info else 'the start'!r} should begin "
                                  f"({err})")
            return
        self.cut = self._end_marker_problem(tar.offset, stream)

    def _cut_inside(self, info: tarfile.TarInfo, end: int) -> TarCut:
        return TarCut(end, info.name, f"the data ends at byte {end}, inside member {info.name!r} (its "
                                      f"{info.size} bytes start at byte {info.offset_data})")

    def _end_marker_problem(self, offset: int, stream: _Tail | None) -> TarCut | None:
        """None if the zero block that ends a tar is at `offset`, else why not."""
        if stream is None:
            self.fileobj.seek(offset)
            block = self.fileobj.read(tarfile.BLOCKSIZE)
        else:
            block = stream.block_at(offset)
        if block == tarfile.NUL * tarfile.BLOCKSIZE:
            return None
        if not block:
            return TarCut(offset, None, f"the data ends at byte {offset}, between two members, without the "
                                        "end-of-archive marker")
        what = "a partial header" if len(block) < tarfile.BLOCKSIZE else "bytes that are not a tar header"
        return TarCut(offset, None, f"byte {offset} holds {what} instead of the next member or the "
                                    "end-of-archive marker")


def iter_tar_samples(walk: TarWalk) -> Iterator[TarSample]:
    """Group the walk's members into samples (consecutive members with one key). The last sample before
    a cut gets `cut` set; a cut inside the first member of a new key yields that key with no members."""
    current: TarSample | None = None
    for member in walk:
        parsed = split_member_name(member.name)
        key, extension = parsed if parsed else (member.name, None)
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = TarSample(key)
        if extension is None:
            current.problems.append(f"member {member.name!r} has no extension")
        elif extension in current.members:
            current.problems.append(f"two .{extension} members")
        else:
            current.members[extension] = member
    cut = walk.cut
    if cut is not None and cut.member is not None:
        parsed = split_member_name(cut.member)
        cut_key = parsed[0] if parsed else cut.member
        if current is None or cut_key != current.key:
            if current is not None:
                yield current
            current = TarSample(cut_key)
    if current is not None:
        current.cut = cut
        yield current
