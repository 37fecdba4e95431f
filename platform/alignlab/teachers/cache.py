"""The teacher feature cache: teacher targets computed once per image and stored compactly (docs/methods.md "DiHT
concept distillation": DiHT
keeps the renormalised top-10 of two concept heads, ~80 bytes per image; docs/methods.md "S-SMKE": logits and CLS
vectors
can be cached per image id for one or a few augmented views, and which ones must be recorded).

Layout (any `alignlab.storage` URI, local or s3://):

    <out>/<key>/shard-000000/objects.ids.npy      [n, V, k]     uint8 / uint16 / uint32 class ids (by K)
    <out>/<key>/shard-000000/objects.probs.npy    [n, V, k-1]   uint16 fixed point p * 65535
    <out>/<key>/shard-000000/logits.npy           [n, V, C]     float16   (when asked)
    <out>/<key>/shard-000000/embedding.npy        [n, V, D]     float16   (when asked)
    <out>/<key>/keys.json                         the source's sample keys, in index order
    <out>/<key>/storage-manifest.json             sha256 of every file above
    <out>/<key>/cache.json                        what was cached and how; written LAST

n = samples in the shard, V = views (view 0 = the eval transform; view v >= 1 = the train transform with
aug seed `sample_aug_seed(view_seed, v, index)`), k = top-k. The top-k probabilities are renormalised to
sum to 1 and sorted in decreasing order, so the last one is stored implicitly (1 - sum of the others); the
others are unsigned 16-bit fixed point, which is finer than float16 on [0, 1] (step 1.5e-5 everywhere,
float16 has 4.9e-4 near 1). With K <= 65,536 classes that is 2k + 2(k - 1) bytes per head and view:
76 bytes per image for k = 10 and two heads (DiHT: 80), 56 bytes when K <= 256 (uint8 ids).

`key` is the content address: a hash of (teacher weights_hash, dataset hash, transform descriptions,
targets, k, views, format version). A build whose cache.json exists computes nothing; a crashed build
never writes cache.json, so `TeacherCache.open` refuses what it left behind.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from alignlab.data.dataset import open_train_source, sample_aug_seed
from alignlab.data.skips import CorruptSampleError
from alignlab.data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform
from alignlab.storage import MANIFEST_NAME, load_manifest, open_store, write_manifest
from alignlab.storage.base import S3_SCHEME

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHE_JSON = "cache.json"
KEYS_JSON = "keys.json"
TOPK_TARGETS = ("objects", "attributes")
DENSE_TARGETS = ("logits", "embedding")
CACHE_TARGETS = TOPK_TARGETS + DENSE_TARGETS
PROB_SCALE = 65535.0
KEY_CHARS = 20


# ---------------------------------------------------------------------------------------------------------
# Encoding of top-k distributions


def id_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds class ids 0..num_classes-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"{num_classes} classes do not fit a uint32 class id")


def encode_topk(logits: torch.Tensor, k: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of softmax(logits) renormalised to sum 1: (ids [..., k], first k-1 probabilities as uint16)."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(k, dim=-1)  # sorted, largest first
    values = values / values.sum(dim=-1, keepdim=True)
    quantised = torch.round(values[..., :-1] * PROB_SCALE).to(torch.int32)
    return ids.numpy().astype(id_dtype(num_classes)), quantised.numpy().astype(np.uint16)


def decode_topk(ids: np.ndarray, quantised: np.ndarray, num_classes: int) -> torch.Tensor:
    """Dense float32 [B, K] distributions from `encode_topk`'s output (zeros outside the top-k)."""
    head = torch.from_numpy(quantised.astype(np.float32)) / PROB_SCALE
    last = (1.0 - head.sum(dim=-1, keepdim=True)).clamp_(min=0.0)
    values = torch.cat([head, last], dim=-1)
    dense = torch.zeros(ids.shape[0], num_classes, dtype=torch.float32)
    return dense.scatter_(1, torch.from_numpy(ids.astype(np.int64)), values)


def topk_bytes_per_sample(k: int, num_classes: int) -> int:
    """Bytes one view of one head takes: k ids + k-1 uint16 probabilities."""
    k = min(k, num_classes)
    return k * id_dtype(num_classes).itemsize + (k - 1) * 2


# ---------------------------------------------------------------------------------------------------------
# Identity of the inputs: dataset, transforms, key


def describe_transform(transform: Callable) -> str:
    """A stable text for a transform from `build_image_transform` (function + keyword values), or the
    `description` attribute of any other callable; it goes into the content address."""
    if isinstance(transform, functools.partial):
        func = transform.func
        keywords = json.dumps(transform.keywords, sort_keys=True, default=list)
        return f"{func.__module__}.{func.__qualname__}{keywords}"
    description = getattr(transform, "description", None)
    if isinstance(description, str) and description:
        return description
    raise ValueError(f"cannot describe transform {transform!r} for the cache key: use build_image_transform, "
                     "or give the callable a `description` string attribute that changes whenever its output does")


def transform_stats(transform: Callable) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the transform normalises with (what the teacher must undo); CLIP's if it does not say."""
    keywords = transform.keywords if isinstance(transform, functools.partial) else vars(transform)
    mean, std = keywords.get("mean", CLIP_MEAN), keywords.get("std", CLIP_STD)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def sample_keys(source) -> list[str]:
    """The sample keys of a training source in index order (webdataset keys, COCO image ids, JSONL ids)."""
    if hasattr(source, "_keys"):  # WebDatasetIndex keeps them as a numpy bytes array
        return [key.decode("utf-8") for key in source._keys.tolist()]
    for name in ("sample_ids", "image_ids"):
        if hasattr(source, name):
            return [str(key) for key in getattr(source, name)]
    if hasattr(source, "keys"):
        return [str(key) for key in source.keys()]
    raise ValueError(f"cannot read the sample keys of {type(source).__name__}: give it a `keys()` method "
                     "returning one string per index")


def dataset_identity(root: str | Path) -> tuple[str, dict]:
    """(dataset hash, manifest) of a dataset folder: SynthCaps' manifest.json `dataset_hash`, else the
    sha256 of a storage-manifest.json (files -> sha256) written by `alignlab.storage.write_manifest`."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if isinstance(manifest.get("dataset_hash"), str):
            return manifest["dataset_hash"], manifest
    if (root / MANIFEST_NAME).is_file():
        files = load_manifest(root)
        text = "".join(f"{path}\t{digest}\n" for path, digest in sorted(files.items()))
        return hashlib.sha256(text.encode()).hexdigest(), {"files": files}
    raise FileNotFoundError(f"dataset {root} has no manifest.json with a 'dataset_hash' (SynthCaps) and no "
                            f"{MANIFEST_NAME}; write one with alignlab.storage.write_manifest, or pass "
                            "dataset_hash= explicitly")


def cache_key(weights_hash: str, dataset_hash: str, views: list[dict], targets: Sequence[str], k: int) -> str:
    """The content address: the first KEY_CHARS hex digits of the sha256 of every input that changes a target."""
    body = {"format": FORMAT_VERSION, "teacher": weights_hash, "dataset": dataset_hash, "views": views,
            "targets": sorted(targets), "k": k}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


def _view_records(transform: Callable, train_transform: Callable | None, views: int, view_seed: int) -> list[dict]:
    records = [{"view": 0, "kind": "eval", "transform": describe_transform(transform)}]
    for view in range(1, views):
        records.append({"view": view, "kind": "train", "transform": describe_transform(train_transform),
                        "view_seed": view_seed,
                        "aug_seed": "alignlab.data.dataset.sample_aug_seed(view_seed, view, index)"})
    return records


# ---------------------------------------------------------------------------------------------------------
# Build


class _Views(Dataset):
    """Sample i -> (views [V, 3, H, W], i): view 0 through `transform`, view v through `train_transform`
    seeded with sample_aug_seed(view_seed, v, i)."""

    def __init__(self, source, transform, train_transform, views: int, view_seed: int):
        self.source, self.transform, self.train_transform = source, transform, train_transform
        self.views, self.view_seed = views, view_seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image = self.source.get(index)[0]
        except CorruptSampleError as err:  # training substitutes it, so its targets are never read
            log.warning("teacher cache: %s; caching a blank image in its row", err)
            image = Image.new("RGB", (8, 8))
        images = [self.transform(image, None)]
        for view in range(1, self.views):
            images.append(self.train_transform(image, random.Random(sample_aug_seed(self.view_seed, view, index))))
        return torch.stack(images), index


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _resolve_data(data, train: str, dataset_hash: str | None) -> tuple[Any, str, dict]:
    """(source, dataset hash, manifest) for a dataset folder or an already opened source."""
    if isinstance(data, (str, Path)):
        found_hash, manifest = dataset_identity(data)
        if dataset_hash is not None and dataset_hash != found_hash:
            raise ValueError(f"dataset {data} has hash {found_hash}, not the dataset_hash={dataset_hash} given")
        return open_train_source("webdataset", str(Path(data) / train)), found_hash, manifest
    source = data
    found = dataset_hash or getattr(source, "dataset_hash", None)
    if found is None:  # no manifest: the ordered sample keys are the next best identity
        found = "keys:" + hashlib.sha256("\n".join(sample_keys(source)).encode()).hexdigest()
        log.warning("source %s has no dataset hash; identifying it by its sample keys only "
                    "(pass dataset_hash= to tie the cache to the data content)", type(source).__name__)
    return source, found, {}


def build_teacher_cache(teacher, data, out_uri: str | Path, targets: Sequence[str] = TOPK_TARGETS, k: int = 10,
                        views: int = 1, batch_size: int = 64, transform: Callable | None = None,
                        train_transform: Callable | None = None, image_size: int | None = None,
                        view_seed: int = 0, shard_size: int = 65536, dataset_hash: str | None = None,
                        train: str = "train", num_workers: int = 0, force: bool = False,
                        progress: bool = False) -> str:
    """Run `teacher` once over every sample (and view) of `data` and store its targets; return the URI of
    the cache folder `<out_uri>/<key>`. If a complete cache with the same key exists, nothing is computed.

    data: a dataset folder (training shards under `<data>/<train>`, identity from its manifest) or a
    training source object (WebDatasetIndex, CocoCaptions, JsonlPairs; `dataset_hash=` ties it to its
    content). transform: the student's eval transform (default `build_image_transform(image_size,
    train=False)`, image_size defaulting to the SynthCaps manifest's); train_transform: for views >= 1
    (default the train transform at the same size). The teacher receives images normalised like the
    transform and re-normalises them itself. force: rebuild even if a complete cache exists (cache.json
    is removed first, so a crash mid-rebuild never leaves a complete-looking cache).
    """
    targets = _check_targets(teacher, targets)
    if k < 1 or views < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(f"k, views, batch_size and shard_size must be >= 1, got {k}, {views}, {batch_size}, "
                         f"{shard_size}")
    source, data_hash, manifest = _resolve_data(data, train, dataset_hash)
    if transform is None or (views > 1 and train_transform is None):
        image_size = image_size or (manifest.get("config") or {}).get("image_size")
        if image_size is None:
            raise ValueError("pass image_size= (the student's data.image_size) or transform=: the dataset's "
                             "manifest does not say its image size")
        transform = transform or build_image_transform(image_size, train=False)
        train_transform = train_transform or build_image_transform(image_size, train=True)
    view_records = _view_records(transform, train_transform, views, view_seed)
    key = cache_key(teacher.weights_hash, data_hash, view_records, targets, k)
    root = str(out_uri).rstrip("/")
    uri = f"{root}/{key}"
    store = open_store(uri)
    if store.exists(CACHE_JSON):
        if not force:
            log.info("teacher cache %s is complete (same teacher, data, transforms, targets, k, views): reused", uri)
            return uri
        store.delete(CACHE_JSON)
    started = time.perf_counter()
    input_mean, input_std = transform_stats(transform)
    keys = sample_keys(source)
    shapes = _run_teacher(teacher, source, store, targets, k, views, view_seed, transform, train_transform,
                          input_mean, input_std, batch_size, shard_size, num_workers, progress)
    store.write_bytes(KEYS_JSON, json.dumps(keys).encode())
    files = [f"{shard['name']}/{name}" for shard in shapes["shards"] for name in shard["files"]] + [KEYS_JSON]
    write_manifest(uri, files)
    seconds = time.perf_counter() - started
    meta = {
        "format_version": FORMAT_VERSION, "key": key, "dataset_hash": data_hash, "num_samples": len(source),
        "targets": list(targets), "k": k, "views": view_records, "num_views": views,
        "num_classes": shapes["num_classes"], "embedding_dim": shapes.get("embedding_dim"),
        "bytes_per_sample": shapes["bytes_per_sample"], "shard_size": shard_size, "shards": shapes["shards"],
        "manifest_sha256": hashlib.sha256(store.read_bytes(MANIFEST_NAME)).hexdigest(),
        "teacher": {"source": getattr(teacher, "source", ""), "weights_hash": teacher.weights_hash,
                    "image_size": teacher.image_size, "mean": list(teacher.mean), "std": list(teacher.std)},
        "input_normalization": {"mean": list(input_mean), "std": list(input_std)},
        "build_seconds": round(seconds, 3), "images_per_second": round(len(source) * views / max(seconds, 1e-9), 1),
    }
    store.write_bytes(CACHE_JSON, json.dumps(meta, indent=1).encode())  # last: marks the cache complete
    log.info("teacher cache %s: %d samples x %d view(s), %d bytes per sample, %.1f s", uri, len(source), views,
             meta["bytes_per_sample"], seconds)
    return uri


def _check_targets(teacher, targets: Sequence[str]) -> tuple[str, ...]:
    targets = tuple(dict.fromkeys(targets))
    if not targets:
        raise ValueError(f"targets is empty; choose from {CACHE_TARGETS}")
    unknown = [t for t in targets if t not in CACHE_TARGETS]
    if unknown:
        raise ValueError(f"unknown cache target(s) {unknown}; choose from {CACHE_TARGETS}")
    missing = [t for t in targets if t not in teacher.target_names]
    if missing:
        raise ValueError(f"teacher {getattr(teacher, 'source', '')!r} has no {missing} output (it gives "
                         f"{list(teacher.target_names)}); concept heads come from `alignlab teacher train`")
    return tuple(t for t in CACHE_TARGETS if t in targets)


def _run_teacher(teacher, source, store, targets, k, views, view_seed, transform, train_transform, input_mean,
                 input_std, batch_size, shard_size, num_workers, progress) -> dict:
    """Forward every batch, encode, and write one shard of arrays per `shard_size` samples."""
    dataset = _Views(source, transform, train_transform, views, view_seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    pending: dict[str, list[np.ndarray]] = {}
    info: dict = {"shards": [], "num_classes": {}}
    filled, start = 0, 0
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="teacher cache", unit="batch")
    for images, indices in loader:
        count = images.shape[0]
        with torch.no_grad():
            out = teacher(images.flatten(0, 1).to(device), input_mean=input_mean, input_std=input_std)
        for name in targets:
            value = out[name].float().cpu().unflatten(0, (count, views))
            if name in TOPK_TARGETS:
                info["num_classes"][name] = value.shape[-1]
                ids, probs = encode_topk(value, min(k, value.shape[-1]), value.shape[-1])
                pending.setdefault(f"{name}.ids", []).append(ids)
                pending.setdefault(f"{name}.probs", []).append(probs)
            else:
                pending.setdefault(name, []).append(value.numpy().astype(np.float16))
                if name == "embedding":
                    info["embedding_dim"] = value.shape[-1]
                else:
                    info["num_classes"][name] = value.shape[-1]
        filled += count
        while filled >= shard_size:
            filled -= shard_size
            start = _flush(store, pending, info, start, shard_size)
    if filled:
        _flush(store, pending, info, start, filled)
    if not info["shards"]:
        raise ValueError("the training source is empty: nothing to cache")
    info["bytes_per_sample"] = sum(info.pop("_row_bytes").values())
    return info


def _flush(store, pending: dict[str, list[np.ndarray]], info: dict, start: int, count: int) -> int:
    """Write the first `count` pending rows (samples start..start+count) as the next shard; keep the rest."""
    name = f"shard-{len(info['shards']):06d}"
    files, row_bytes = {}, {}
    for array_name, chunks in pending.items():
        merged = np.concatenate(chunks)
        head, rest = merged[:count], merged[count:]
        pending[array_name] = [rest] if len(rest) else []
        store.write_bytes(f"{name}/{array_name}.npy", _npy_bytes(head))
        files[f"{array_name}.npy"] = {"dtype": head.dtype.str, "shape": list(head.shape)}
        row_bytes[array_name] = int(head[0].nbytes)
    info["shards"].append({"name": name, "start": start, "stop": start + count, "files": files})
    info["_row_bytes"] = row_bytes
    return start + count


# ---------------------------------------------------------------------------------------------------------
# Read


class CacheError(ValueError):
    """A teacher cache is missing, incomplete, corrupted or built for other data; the message says which."""


class TeacherCache:
    """A complete teacher cache, arrays memory-mapped (local) or loaded (s3://).

    Attributes: `targets`, `k`, `num_classes` (name -> K or C), `embedding_dim`, `views` (number of views),
    `view_records` (how each view was made), `dataset_hash`, `key`, `uri`, `meta` (all of cache.json).
    `lookup(indices)` returns the targets of the source's sample indices (see its docstring).
    """

    def __init__(self, uri: str, meta: dict, arrays: list[dict[str, np.ndarray]], keys: list[str]):
        self.uri, self.meta, self.keys = uri, meta, keys
        self.targets: tuple[str, ...] = tuple(meta["targets"])
        self.k: int = int(meta["k"])
        self.num_classes: dict[str, int] = dict(meta["num_classes"])
        self.embedding_dim: int | None = meta.get("embedding_dim")
        self.views: int = int(meta["num_views"])
        self.view_records: list[dict] = meta["views"]
        self.dataset_hash: str = meta["dataset_hash"]
        self.key: str = meta["key"]
        self.bytes_per_sample: int = int(meta["bytes_per_sample"])
        self._arrays = arrays
        self._stops = np.array([shard["stop"] for shard in meta["shards"]], dtype=np.int64)
        self._starts = np.array([shard["start"] for shard in meta["shards"]], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def __repr__(self) -> str:
        return (f"TeacherCache(uri={self.uri!r}, samples={len(self)}, targets={self.targets}, k={self.k}, "
                f"views={self.views})")

    @classmethod
    def open(cls, uri: str | Path, expected_dataset_hash: str | None = None, *, source=None,
             verify: bool = True) -> "TeacherCache":
        """Open the complete cache at `uri` (`<out>/<key>`, or `<out>` when it holds exactly one cache).

        expected_dataset_hash: refuse a cache built for other data. source: also check that its sample
        keys are the cached ones, in the same order. verify: check every file's sha256 against the manifest.
        """
        uri = _find_cache(str(uri).rstrip("/"))
        store = open_store(uri)
        meta = json.loads(store.read_bytes(CACHE_JSON))
        if meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{uri}: cache format {meta.get('format_version')} is not {FORMAT_VERSION}; rebuild it "
                             "with `alignlab teacher cache`")
        if expected_dataset_hash is not None and meta["dataset_hash"] != expected_dataset_hash:
            raise CacheError(f"teacher cache {uri} was built for dataset {meta['dataset_hash']}, but the training "
                             f"data has hash {expected_dataset_hash}; rebuild it for this data with "
                             "`alignlab teacher cache --data <the training root>`")
        manifest_bytes = store.read_bytes(MANIFEST_NAME)
        if hashlib.sha256(manifest_bytes).hexdigest() != meta["manifest_sha256"]:
            raise CacheError(f"{uri}/{MANIFEST_NAME} changed after {CACHE_JSON} was written; rebuild the cache")
        checksums = json.loads(manifest_bytes)["files"]
        local = not uri.startswith(S3_SCHEME)
        arrays = []
        for shard in meta["shards"]:
            loaded = {}
            for name in shard["files"]:
                file_key = f"{shard['name']}/{name}"
                loaded[name.removesuffix(".npy")] = _load_array(store, file_key, checksums[file_key], local, verify)
            arrays.append(loaded)
        keys = json.loads(_read_checked(store, KEYS_JSON, checksums[KEYS_JSON], verify))
        if len(keys) != meta["num_samples"]:
            raise CacheError(f"{uri}: {len(keys)} keys for {meta['num_samples']} samples; rebuild the cache")
        cache = cls(uri, meta, arrays, keys)
        if source is not None:
            cache.check_source(source)
        return cache

    def check_source(self, source) -> None:
        """Raise CacheError unless `source` has exactly the cached sample keys in the same order."""
        keys = sample_keys(source)
        if keys != self.keys:
            if len(keys) != len(self.keys):
                detail = f"{len(keys)} samples vs {len(self.keys)} cached"
            else:
                first = next(i for i, (a, b) in enumerate(zip(keys, self.keys)) if a != b)
                detail = f"first difference at index {first}: {keys[first]!r} vs cached {self.keys[first]!r}"
            raise CacheError(f"teacher cache {self.uri} does not match the training source ({detail}); rebuild "
                             "it for this data with `alignlab teacher cache`")

    def lookup(self, indices: torch.Tensor | Sequence[int], view: int | torch.Tensor = 0) -> dict[str, torch.Tensor]:
        """Targets of the samples `indices` (the source's sample indices, LongTensor [B]).

        "objects"/"attributes": dense renormalised top-k distributions, float32 [B, K] (zeros outside the
        top-k); "logits": float32 [B, C]; "embedding": float32 [B, D]. `view` picks the cached view (an int
        for all, or a LongTensor [B] per sample; view 0 = the eval transform)."""
        idx = torch.as_tensor(indices, dtype=torch.long).cpu().numpy().reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx[(idx < 0) | (idx >= len(self))][0])
            raise IndexError(f"sample index {bad} is outside the cache's {len(self)} samples ({self.uri})")
        views = torch.as_tensor(view, dtype=torch.long).cpu().numpy()
        if views.size and (views.min() < 0 or views.max() >= self.views):
            raise IndexError(f"view {views.max()} is outside the {self.views} cached view(s) of {self.uri}")
        out = {}
        for name in self.targets:
            if name in TOPK_TARGETS:
                ids, probs = self._gather(f"{name}.ids", idx, views), self._gather(f"{name}.probs", idx, views)
                out[name] = decode_topk(ids, probs, self.num_classes[name])
            else:
                out[name] = torch.from_numpy(self._gather(name, idx, views).astype(np.float32))
        return out

    def _gather(self, name: str, idx: np.ndarray, views: np.ndarray) -> np.ndarray:
        if len(self._arrays) == 1:
            return self._arrays[0][name][idx, views]
        shard_of = np.searchsorted(self._stops, idx, side="right")
        first = self._arrays[0][name]
        out = np.empty((len(idx),) + first.shape[2:], dtype=first.dtype)
        views = np.broadcast_to(views, idx.shape)
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            out[rows] = self._arrays[shard][name][idx[rows] - self._starts[shard], views[rows]]
        return out


def _find_cache(uri: str) -> str:
    """`uri` if it holds cache.json, else the one complete cache below it; CacheError otherwise."""
    store = open_store(uri)
    if store.exists(CACHE_JSON):
        return uri
    try:
        found = sorted(key.rsplit("/", 1)[0] for key in store.list() if key.endswith(f"/{CACHE_JSON}")
                       and key.count("/") == 1)
    except FileNotFoundError:
        found = []
    if len(found) == 1:
        return f"{uri}/{found[0]}"
    if len(found) > 1:
        raise CacheError(f"{uri} holds {len(found)} teacher caches ({', '.join(found)}); open one of them "
                         f"(<out>/<key>)")
    raise CacheError(f"no complete teacher cache at {uri}: {CACHE_JSON} is missing (an interrupted build never "
                     "writes it); build it with `alignlab teacher cache`")


def _read_checked(store, key: str, expected: str, verify: bool) -> bytes:
    data = store.read_bytes(key)
    if verify and hashlib.sha256(data).hexdigest() != expected:
        raise CacheError(f"{store.uri(key)} does not match its sha256 in {MANIFEST_NAME} (corrupted or "
                         "overwritten); rebuild the cache")
    return data


def _load_array(store, key: str, expected: str, local: bool, verify: bool) -> np.ndarray:
    """A local file is verified by streaming it, then memory-mapped; a remote one is loaded into memory."""
    if local:
        path = store.uri(key)
        if verify:
            from alignlab.storage import sha256_of

            if sha256_of(store, key) != expected:
                raise CacheError(f"{path} does not match its sha256 in {MANIFEST_NAME} (corrupted or "
                                 "overwritten); rebuild the cache")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(_read_checked(store, key, expected, verify)), allow_pickle=False)


def cache_teacher_targets(teacher: str, data: str, out: str, *, arch: str | None, arch_kwargs: dict | None,
                          targets: Sequence[str], k: int, views: int, view_seed: int, image_size: int | None,
                          batch_size: int, shard_size: int, num_workers: int, train: str, device: str | None,
                          force: bool, progress: bool = False) -> str:
    """Load the teacher `teacher` (`load_teacher`: timm:<name>, hf:<dir>, a teacher folder or a checkpoint)
    onto `device` (default: cuda when available) and build its cache of `data` under `out`; returns the
    cache's URI. The arguments are `TeacherCacheSettings`' fields (`alignlab teacher cache`, a spec's
    `teacher_cache` prepare step)."""
    from alignlab.teachers.registry import load_teacher

    model = load_teacher(teacher, arch=arch, kwargs=arch_kwargs)
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return build_teacher_cache(model, data if data.startswith(S3_SCHEME) else Path(data), out, targets=list(targets),
                               k=k, views=views, batch_size=batch_size, image_size=image_size, view_seed=view_seed,
                               shard_size=shard_size, train=train, num_workers=num_workers, force=force,
                               progress=progress)
