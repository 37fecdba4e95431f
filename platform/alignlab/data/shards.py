"""Webdataset tar shards: random access for training, from local disk or straight from S3.

A shard holds one sample per key: `<key>.png` (or jpg/jpeg/webp), `<key>.txt` (caption) and
`<key>.json` (metadata); see docs/data-formats.md, "SynthCaps on-disk layout". The key follows the
webdataset convention: the member name up to the first dot of its basename (directory included), and
a sample is a run of consecutive members with the same key.

Training addresses samples by index (ResumableBatchSampler), so `WebDatasetIndex` scans the tar
headers once, keeps member offsets in memory and reads a sample by seeking to them. Corrupt samples
(no image or caption, zero bytes, a caption too long, a shard cut short, ...; see alignlab.data.skips)
are left out of the index, counted and named in `skipped`; a shard that ends early keeps the samples
before the cut and is listed in `truncated_shards`. What only the bytes show (an image PIL cannot
decode, a caption that is not UTF-8) raises CorruptSampleError when the sample is read.

Shards in S3 (`s3://bucket/prefix/train`, a brace pattern or a glob of s3:// URIs) are never
downloaded whole. Building the index costs one HEAD per shard (size and ETag), then either one GET of
a sidecar index `<shard>.index.json` (`write_shard_index` writes one) or a walk of the tar headers
with ranged GETs that skip member bodies (`alignlab.storage.RangedReader`: 1 KiB per header when
members are large, growing up to 64 KiB per GET when they are small enough to read through). A
sample is then one ranged GET spanning its members, conditional on the ETag seen at indexing time, so
a shard overwritten mid-run fails loudly instead of yielding bytes from the wrong offsets. The S3
client is opened lazily in each process (DataLoader workers after fork build their own; a pickled
index carries no store and no credentials).

Integrity with a manifest (`manifest=`, SynthCaps' manifest.json with `files: {relpath: sha256}`):
hashing every shard would cost a full read of the dataset before the first step, so the index only
does the cheap checks: every shard the manifest lists in a folder the spec names must exist
(FileNotFoundError naming the URI), shards the manifest does not list are counted in
`unlisted_shards` and logged, each object's size bounds the header walk (a truncated shard is found
as on local disk), a sidecar index is used only if its recorded size and ETag match the object, and
every read checks it got the bytes it asked for. For the full sha256 check run
`alignlab.storage.verify_manifest(root, name="manifest.json")` once, e.g. after uploading.
"""

import fnmatch
import glob
import json
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from alignlab import storage
from alignlab.data.sample_checks import (IMAGE_EXTENSIONS, decode_caption, decode_image, decode_metadata,
                                         header_problem)
from alignlab.data.skips import DEFAULT_MAX_CAPTION_BYTES, CorruptSampleError
from alignlab.data.tar_samples import TarCut, TarMember, TarSample, TarWalk, iter_tar_samples
from alignlab.storage.base import S3_SCHEME, ObjectInfo, split_s3_uri
from alignlab.storage.ranged import DEFAULT_READAHEAD, MIN_READAHEAD, RangedReader

import numpy as np
from braceexpand import braceexpand
from PIL import Image

log = logging.getLogger(__name__)

_MEMBERS = ("image", "txt", "json")
_GLOB_CHARS = "*?["
SIDECAR_SUFFIX = ".index.json"  # shard-000000.tar -> shard-000000.tar.index.json
SIDECAR_FORMAT = "alignlab.tar-index"
SIDECAR_VERSION = 1


def is_remote(path) -> bool:
    return isinstance(path, str) and path.startswith(S3_SCHEME)


def expand_shards(spec) -> list[str]:
    """Shard paths from a directory (its *.tar), a glob, a brace pattern or a list of any of these.

    Brace patterns follow webdataset: `train/shard-{000000..000009}.tar`. Every path must exist.
    `s3://` URIs work the same way: a URI not ending in .tar names a folder (its *.tar objects), and
    globs are matched against a listing of the folder they start in (`*` does not cross a `/`).
    """
    return [path for path, _ in _expand_with_info(spec, folders=[])]


def _expand_with_info(spec, folders: list[str]) -> list[tuple[str, ObjectInfo | None]]:
    """(path, ObjectInfo for s3:// shards else None) per shard; s3 folders listed go into `folders`."""
    if isinstance(spec, (list, tuple)):
        return [found for item in spec for found in _expand_with_info(item, folders)]
    spec = os.fspath(spec)
    if is_remote(spec):
        return _expand_remote(spec, folders)
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        paths = []
        for pattern in braceexpand(spec):
            is_glob = any(char in pattern for char in _GLOB_CHARS)
            paths.extend(sorted(glob.glob(pattern)) if is_glob else [pattern])
    _check_found(spec, paths)
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, first: {missing[0]}")
    return [(path, None) for path in paths]


def _check_found(spec: str, paths: list[str]) -> None:
    if not paths:
        raise FileNotFoundError(
            f"no .tar shards match {spec!r}; pass a directory holding *.tar files, a glob such as "
            "'train/*.tar' or a brace pattern such as 'train/shard-{000000..000009}.tar'"
        )


def _list_tars(folder: str) -> list[str]:
    """URIs of the .tar objects directly inside the S3 folder `folder` (not in sub-folders)."""
    store = storage.open_store(folder)
    return [store.uri(key) for key in store.list() if "/" not in key and key.endswith(".tar")]


def _expand_remote(spec: str, folders: list[str]) -> list[tuple[str, ObjectInfo]]:
    uris = []
    for pattern in braceexpand(spec):
        pattern = pattern.rstrip("/")
        split_s3_uri(pattern)  # a clear error for s3:// without a bucket
        glob_at = next((i for i, char in enumerate(pattern) if char in _GLOB_CHARS), None)
        if glob_at is not None:
            folder = pattern[:glob_at].rpartition("/")[0]
            depth = pattern.count("/")
            uris.extend(sorted(uri for uri in _list_tars_below(folder)
                               if uri.count("/") == depth and fnmatch.fnmatchcase(uri, pattern)))
        elif pattern.endswith(".tar"):
            uris.append(pattern)
        else:
            folders.append(pattern)
            uris.extend(_list_tars(pattern))
    _check_found(spec, uris)
    infos, missing = [], []
    for uri in uris:
        try:
            infos.append((uri, storage.stat(uri)))
        except FileNotFoundError as err:
            missing.append((uri, err))
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, first: {missing[0][0]} "
                                f"({missing[0][1]})")
    return infos


def _list_tars_below(folder: str) -> list[str]:
    """URIs of every .tar object under the S3 folder `folder`, at any depth."""
    store = storage.open_store(folder)
    return [store.uri(key) for key in store.list() if key.endswith(".tar")]


def _scan_shard(path: str, fileobj=None) -> tuple[list[TarSample], TarCut | None]:
    """The samples of one tar from its headers, and where it ends early (None when intact). `fileobj`
    (a seekable file with a `size`, such as a RangedReader) replaces opening `path`, which errors name."""
    if fileobj is not None:
        walk = TarWalk(fileobj, path, size=fileobj.size)
        return list(iter_tar_samples(walk)), walk.cut
    with open(path, "rb") as handle:
        walk = TarWalk(handle, path, size=os.fstat(handle.fileno()).st_size)
        return list(iter_tar_samples(walk)), walk.cut


class WebDatasetIndex:
    """Random access to the samples of webdataset shards (SynthCaps train split and similar).

    `index[i]` -> {"__key__", "__url__" (shard path), "png"|"jpg"|... bytes, "txt" str, "json" dict
    (when present)}, the same dict `iter_webdataset` yields for that sample. `get(i)` -> (RGB PIL
    image, caption, metadata) for PairDataset. Files are opened lazily per process (so DataLoader
    workers never share a file position after fork), at most `max_open_files` at a time.
    Samples whose headers show them corrupt (`sample_checks.header_problem`; captions over
    `max_caption_bytes` included) are left out of the index and listed in `skipped` as {"shard", "key",
    "reason", "detail"}; shards that end early are listed in `truncated_shards`. Reading a sample whose
    bytes are corrupt raises CorruptSampleError (alignlab.data.skips).

    `shard_paths` may name s3:// shards (see the module docstring): `readahead` is the largest
    ranged GET of the header walk, `manifest` the URI or path of a SynthCaps-style manifest.json to
    check the shards against (cheap checks only; ignored when it does not exist). `num_sidecars` and
    `stale_sidecars` count the sidecar indexes used and the ones ignored because their shard changed;
    `unlisted_shards` names shards the manifest does not record. `get_many` (what PairDataset uses for
    a batch) overlaps the GETs of s3:// samples on `fetch_threads` threads per process.
    """

    def __init__(self, shard_paths, max_open_files: int = 64, readahead: int = DEFAULT_READAHEAD,
                 manifest: str | os.PathLike | None = None, fetch_threads: int = 8,
                 max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES):
        if readahead < MIN_READAHEAD:
            raise ValueError(f"readahead={readahead} is too small: one GET must cover tarfile's 1-byte probe and "
                             f"the 512-byte header after it; use >= {MIN_READAHEAD}")
        listed_folders: list[str] = []
        found = _expand_with_info(shard_paths, listed_folders)
        self.shard_paths = [path for path, _ in found]
        # ETag per s3:// shard ("" when the server gave none), None for a local file.
        self._etags = [None if info is None else info.etag or "" for _, info in found]
        self.max_open_files, self.fetch_threads = max_open_files, fetch_threads
        self._pid, self._fds = None, OrderedDict()
        self._stores_pid, self._stores, self._pool = None, {}, None
        self.num_sidecars, self.stale_sidecars = 0, []
        self.unlisted_shards = self._check_manifest(manifest, listed_folders) if manifest is not None else []
        keys, shard_ids, offsets, sizes, image_exts = [], [], [], [], []
        self.skipped: list[dict] = []
        self.truncated_shards: list[dict] = []
        for shard_id, (path, info) in enumerate(found):
            samples, cut = _scan_shard(path) if info is None else self._scan_remote(shard_id, info, readahead)
            kept = len(keys)
            for sample in samples:
                problem = header_problem(sample, max_caption_bytes)
                if problem is not None:
                    self.skipped.append(CorruptSampleError(problem[0], path, sample.key, problem[1]).record)
                    continue
                image_ext = next(ext for ext in IMAGE_EXTENSIONS if ext in sample.members)
                located = [sample.members[image_ext], sample.members["txt"], sample.members.get("json")]
                keys.append(sample.key.encode("utf-8"))
                shard_ids.append(shard_id)
                offsets.append([-1 if member is None else member.offset for member in located])
                sizes.append([0 if member is None else member.size for member in located])
                image_exts.append(IMAGE_EXTENSIONS.index(image_ext))
            if cut is not None:
                self.truncated_shards.append(_truncation_record(path, cut, keys[kept:]))
        # numpy arrays instead of per-sample Python objects: compact, and fork-friendly for workers.
        self._keys = np.array(keys, dtype=bytes)
        self._shard_ids = np.array(shard_ids, dtype=np.int32)
        self._offsets = np.array(offsets, dtype=np.int64).reshape(-1, len(_MEMBERS))
        self._sizes = np.array(sizes, dtype=np.int64).reshape(-1, len(_MEMBERS))
        self._image_exts = np.array(image_exts, dtype=np.int8)
        self._log_skipped()

    def _log_skipped(self) -> None:
        for record in self.truncated_shards:
            log.warning("%s ends early: %s; kept its %d complete sample(s) before the cut (last: %s), the rest of "
                        "the shard is lost; re-write or re-upload it", record["shard"], record["detail"],
                        record["samples_kept"], record["last_kept"])
        if self.skipped:
            counts = Counter(record["reason"] for record in self.skipped)
            first = self.skipped[0]
            log.warning("%d corrupt sample(s) left out of %d shard(s): %s; first: %s:%s (%s)", len(self.skipped),
                        len(self.shard_paths), ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())),
                        first["shard"], first["key"], first["detail"])

    # ---- s3:// shards ----------------------------------------------------------------------------

    def _check_manifest(self, manifest, listed_folders: list[str]) -> list[str]:
        """Cheap checks against a SynthCaps-style manifest (see the module docstring); returns the
        shards it does not list. Raises FileNotFoundError naming a listed shard that is missing."""
        manifest = os.fspath(manifest)
        base, _, name = manifest.rpartition("/")
        try:
            files = storage.load_manifest(base, name=name)  # validates the files -> sha256 mapping
        except FileNotFoundError:
            log.info("no manifest at %s: shards not checked against one", manifest)
            return []
        recorded = {f"{base}/{relpath}" for relpath in files if relpath.endswith(".tar")}
        present = set(self.shard_paths)
        missing = sorted(uri for uri in recorded if uri.rpartition("/")[0] in listed_folders and uri not in present)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shard(s) listed in {manifest} do not exist, first: {missing[0]}; upload the "
                "missing shard(s) again (or regenerate the manifest if they were removed on purpose)")
        unlisted = [path for path in self.shard_paths if path not in recorded]
        if unlisted:
            log.warning("%d of %d shard(s) are not listed in %s (added after it was written?), first: %s",
                        len(unlisted), len(self.shard_paths), manifest, unlisted[0])
        return unlisted

    def _store(self, bucket: str):
        """This process's store for `bucket`, opened on first use (credentials from the environment)."""
        if self._stores_pid != os.getpid():
            self._stores_pid, self._stores, self._pool = os.getpid(), {}, None
        if bucket not in self._stores:
            self._stores[bucket] = storage.open_store(S3_SCHEME + bucket)
        return self._stores[bucket]

    def _read_range(self, shard_id: int, start: int, length: int) -> bytes:
        """`length` bytes of s3:// shard `shard_id`, refused by the server if it changed since indexing."""
        bucket, key = split_s3_uri(self.shard_paths[shard_id])
        return self._store(bucket).read_range(key, start, length, if_match=self._etags[shard_id] or None)

    def _scan_remote(self, shard_id: int, info: ObjectInfo, readahead: int) -> tuple[list[TarSample], TarCut | None]:
        uri = self.shard_paths[shard_id]
        samples = _read_sidecar(uri, info)
        if samples == "stale":
            self.stale_sidecars.append(uri + SIDECAR_SUFFIX)
            log.warning("sidecar index %s%s does not match the shard's size/ETag (shard re-written?): ignored, "
                        "walking the tar headers instead; rewrite it with write_shard_index", uri, SIDECAR_SUFFIX)
        elif samples is not None:
            self.num_sidecars += 1
            return samples, None  # written for an intact shard (write_shard_index refuses a truncated one)
        reader = RangedReader(lambda start, length: self._read_range(shard_id, start, length), info.size, uri,
                              readahead)
        return _scan_shard(uri, fileobj=reader)

    def _read_remote(self, index: int, shard_id: int) -> list[bytes | None]:
        """The sample's members with one ranged GET spanning them (they are consecutive in the tar)."""
        present = [member for member in range(len(_MEMBERS)) if self._offsets[index, member] >= 0]
        start = min(int(self._offsets[index, member]) for member in present)
        end = max(int(self._offsets[index, member] + self._sizes[index, member]) for member in present)
        span = self._read_range(shard_id, start, end - start)
        blobs: list[bytes | None] = [None] * len(_MEMBERS)
        for member in present:
            offset = int(self._offsets[index, member]) - start
            blobs[member] = span[offset:offset + int(self._sizes[index, member])]
        return blobs

    # ---- access ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    def _fd(self, shard_id: int) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._pid, self._fds = os.getpid(), OrderedDict()
        if shard_id in self._fds:
            self._fds.move_to_end(shard_id)
            return self._fds[shard_id]
        if len(self._fds) >= self.max_open_files:
            os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[shard_id] = os.open(self.shard_paths[shard_id], os.O_RDONLY)
        return fd

    def _read(self, fd: int, index: int, member: int) -> bytes:
        size, offset = int(self._sizes[index, member]), int(self._offsets[index, member])
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.shard_paths[self._shard_ids[index]]} is shorter than its index says (changed since?)")
        return data

    def __getitem__(self, index: int) -> dict:
        """The raw sample; a caption that is not UTF-8 or only whitespace, or metadata that is not a JSON
        object, raises CorruptSampleError."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        shard_id = int(self._shard_ids[index])
        shard, key = self.shard_paths[shard_id], self._keys[index].decode("utf-8")
        if self._etags[shard_id] is None:  # local file: pread from a cached descriptor
            fd = self._fd(shard_id)
            image, caption = self._read(fd, index, 0), self._read(fd, index, 1)
            meta = self._read(fd, index, 2) if self._offsets[index, 2] >= 0 else None
        else:
            image, caption, meta = self._read_remote(index, shard_id)
        sample = {"__key__": key, "__url__": shard, IMAGE_EXTENSIONS[self._image_exts[index]]: image,
                  "txt": decode_caption(caption, shard, key, index)}
        if meta is not None:
            sample["json"] = decode_metadata(meta, shard, key, index)
        return sample

    def get(self, index: int) -> tuple[Image.Image, str, dict]:
        """(RGB image, caption, metadata) where metadata is the sample's JSON plus __key__ and __url__;
        CorruptSampleError when the image does not decode (or as `index[i]`)."""
        sample = self[index]
        image_ext = IMAGE_EXTENSIONS[self._image_exts[index]]
        image = decode_image(sample[image_ext], sample["__url__"], sample["__key__"], index)
        meta = {**sample.get("json", {}), "__key__": sample["__key__"], "__url__": sample["__url__"]}
        return image, sample["txt"], meta

    def _get_or_error(self, index: int):
        try:
            return self.get(index)
        except CorruptSampleError as err:
            return err

    def get_many(self, indices, corrupt: str = "raise") -> list:
        """`[get(i) for i in indices]`, in that order; the GETs of s3:// samples run concurrently (they
        are latency-bound: one sample at a time leaves the connection idle most of the time).
        `corrupt="return"` puts a corrupt sample's CorruptSampleError in its place instead of raising it
        (read errors, such as S3 failing after its retries, always raise)."""
        if corrupt not in ("raise", "return"):
            raise ValueError(f"corrupt must be 'raise' or 'return', got {corrupt!r}")
        get = self.get if corrupt == "raise" else self._get_or_error
        indices = [int(i) for i in indices]
        remote = [i for i in indices if 0 <= i < len(self) and self._etags[int(self._shard_ids[i])] is not None]
        if len(remote) < 2 or self.fetch_threads < 2:
            return [get(i) for i in indices]
        for shard_id in {int(self._shard_ids[i]) for i in remote}:  # open stores here, not racing in threads
            self._store(split_s3_uri(self.shard_paths[shard_id])[0])
        if self._pool is None:  # per process: _store() drops a pool inherited through fork
            self._pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="alignlab-s3-read")
        return list(self._pool.map(get, indices))

    def close(self) -> None:
        """Close this process's open shard files (and its S3 fetch threads)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()
        if self._pool is not None and self._stores_pid == os.getpid():
            self._pool.shutdown()
        self._pool = None

    def __getstate__(self) -> dict:
        # Descriptors, S3 clients and threads do not survive pickling (spawned workers): the new process
        # opens its own, with credentials from its environment, so none travel in the pickle.
        return {**self.__dict__, "_pid": None, "_fds": OrderedDict(), "_stores_pid": None, "_stores": {},
                "_pool": None}


def _truncation_record(shard: str, cut: TarCut, kept_keys: list[bytes]) -> dict:
    return {"shard": shard, "at_byte": cut.offset, "detail": cut.detail, "samples_kept": len(kept_keys),
            "last_kept": kept_keys[-1].decode("utf-8") if kept_keys else None}


def _sidecar_samples(samples: list[TarSample]) -> list:
    return [[sample.key, {ext: [member.offset, member.size] for ext, member in sample.members.items()}]
            + ([sample.problems] if sample.problems else []) for sample in samples]


def _read_sidecar(uri: str, info: ObjectInfo):
    """The samples recorded in `<uri>.index.json`; None when there is none, "stale" when it was
    written for another version of the shard (size or ETag differ)."""
    sidecar = uri + SIDECAR_SUFFIX
    try:
        body = json.loads(storage.read_bytes(sidecar))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"{sidecar} is not valid JSON ({err}); delete it or rewrite it with "
                         "write_shard_index") from None
    if not isinstance(body, dict) or body.get("format") != SIDECAR_FORMAT or body.get("version") != SIDECAR_VERSION:
        raise ValueError(f"{sidecar} is not a {SIDECAR_FORMAT} v{SIDECAR_VERSION} file; delete it or rewrite it "
                         "with write_shard_index")
    if body.get("size") != info.size or (body.get("etag") or "") != (info.etag or ""):
        return "stale"
    try:
        samples = [TarSample(entry[0], {ext: TarMember(f"{entry[0]}.{ext}", int(offset), int(size))
                                        for ext, (offset, size) in entry[1].items()},
                             [str(problem) for problem in entry[2]] if len(entry) > 2 else [])
                   for entry in body["samples"]]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"{sidecar}: malformed 'samples' ({err!r}); rewrite it with write_shard_index") from None
    beyond = [s.key for s in samples if any(m.offset < 0 or m.offset + m.size > info.size for m in s.members.values())]
    if beyond:
        raise ValueError(f"{sidecar}: member offsets of {beyond[0]!r} lie outside the {info.size}-byte shard; "
                         "rewrite it with write_shard_index")
    return samples


def write_shard_index(shard: str | os.PathLike, readahead: int = DEFAULT_READAHEAD) -> str:
    """Walk the headers of one shard (local path or s3:// URI) and write its sidecar index
    `<shard>.index.json` next to it: {"format", "version", "size", "etag", "samples": [[key, {ext:
    [offset, size]}, (problems, if any)]]}. WebDatasetIndex then builds its index of an s3:// shard from
    one GET of the sidecar instead of the header walk, as long as size and ETag still match. A shard that
    ends early is refused (re-upload it first). Returns the sidecar's URI."""
    shard = os.fspath(shard)
    info = storage.stat(shard)
    if is_remote(shard):
        bucket, key = split_s3_uri(shard)
        store = storage.open_store(S3_SCHEME + bucket)
        reader = RangedReader(lambda start, length: store.read_range(key, start, length, if_match=info.etag),
                              info.size, shard, readahead)
        samples, cut = _scan_shard(shard, fileobj=reader)
    else:
        samples, cut = _scan_shard(shard)
    if cut is not None:
        raise ValueError(f"{shard} ends early ({cut.detail}); re-write or re-upload it before indexing it")
    body = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "size": info.size, "etag": info.etag,
            "samples": _sidecar_samples(samples)}
    storage.write_bytes(shard + SIDECAR_SUFFIX, json.dumps(body, separators=(",", ":")).encode())
    return shard + SIDECAR_SUFFIX


def iter_webdataset(urls, skipped: list[dict] | None = None,
                    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES) -> Iterator[dict]:
    """Stream samples of webdataset shards, each read once (local paths or s3:// URIs, through
    `alignlab.storage.open_read`; `urls` is a brace pattern or a list).

    Yields the dicts `WebDatasetIndex[i]` returns, in shard order, and skips the same corrupt samples
    (same grouping, same checks, same records, appended to `skipped` if a list is passed; a shard that
    ends early yields the samples before the cut). Images are not decoded here, as in `index[i]`."""
    skipped = [] if skipped is None else skipped
    for url in [url for spec in ([urls] if isinstance(urls, str) else urls) for url in braceexpand(os.fspath(spec))]:
        with storage.open_read(url) as stream:
            walk = TarWalk(stream, url, read_data=True)
            for sample in iter_tar_samples(walk):
                try:
                    yield _streamed_sample(url, sample, max_caption_bytes)
                except CorruptSampleError as err:
                    skipped.append(err.record)
            if walk.cut is not None:
                log.warning("%s ends early: %s; the rest of the shard is lost", url, walk.cut.detail)


def _streamed_sample(url: str, sample: TarSample, max_caption_bytes: int) -> dict:
    problem = header_problem(sample, max_caption_bytes)
    if problem is not None:
        raise CorruptSampleError(problem[0], url, sample.key, problem[1])
    image_ext = next(ext for ext in IMAGE_EXTENSIONS if ext in sample.members)
    result = {"__key__": sample.key, "__url__": url, image_ext: sample.members[image_ext].data,
              "txt": decode_caption(sample.members["txt"].data, url, sample.key)}
    if "json" in sample.members:
        result["json"] = decode_metadata(sample.members["json"].data, url, sample.key)
    return result
