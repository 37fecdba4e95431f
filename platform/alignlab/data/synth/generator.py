"""Write the SynthCaps benchmark to disk in the layout of docs/data-formats.md ("SynthCaps on-disk layout").

Determinism: every sample draws from its own generator, seeded by (config.seed, stream, index), where
`stream` names the split. The bytes written therefore depend on the config only: not on `workers`, not
on job order. A training sample draws its scene, then its clean caption, then its noise; as the first
two never depend on the noise fractions, two configs that differ only in noise share every scene and
clean caption, which is what a noise ablation wants. Tar members carry fixed metadata (mtime 0, uid 0),
so shards are byte-identical across runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import struct
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from alignlab.data.synth import captions as cap
from alignlab.data.synth.config import SynthCapsConfig
from alignlab.data.synth.render import (draw_text_banner, render_cluttered, render_scene, render_sketch,
                                        render_textured)
from alignlab.data.synth.scene import COLORS, SHAPES, sample_scene, sample_single_object_scene
from alignlab.data.writer import tar_archive, tar_member  # one tar writer for SynthCaps and imports

GENERATOR_VERSION = "1.0.0"
CLASSIFICATION_TASKS = ("shape", "color", "shape_color")
CLASSIFICATION_SPLITS = ("train", "val", "test")
SHIFTS = ("sketch", "texture", "clutter", "resample")
TRAIN_STREAM, RETRIEVAL_STREAMS = 0, {"test": 1, "val": 2}
PNG_COMPRESS_LEVEL = 1

log = logging.getLogger(__name__)


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _classification_stream(task: str, split: str) -> int:
    return 10 + 3 * CLASSIFICATION_TASKS.index(task) + CLASSIFICATION_SPLITS.index(split)


def _shift_stream(name: str) -> int:
    return 30 + SHIFTS.index(name)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(image: Image.Image) -> bytes:
    """8-bit RGB PNG, every row with filter type 0 (None), zlib level PNG_COMPRESS_LEVEL.

    Written by hand because PIL's encoder tries every row filter and takes over half of the time
    per training pair at 64 x 64; the files are ordinary PNGs (PIL, browsers and webdataset read them).
    """
    image = image.convert("RGB")
    width, height = image.size
    pixels, stride = image.tobytes(), 3 * width
    rows = b"".join(b"\0" + pixels[y * stride:(y + 1) * stride] for y in range(height))  # 0 = filter None
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 = RGB
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows, PNG_COMPRESS_LEVEL)) + _png_chunk(b"IEND", b""))


def _write(root: Path, relpath: str, data: bytes) -> tuple[str, str]:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return relpath, hashlib.sha256(data).hexdigest()


def classnames(task: str) -> list[str]:
    """Class names of a classification task ("shape", "color", "shape_color": "red circle", ...)."""
    if task == "shape":
        return list(SHAPES)
    if task == "color":
        return list(COLORS)
    if task == "shape_color":
        return [f"{color} {shape}" for color in COLORS for shape in SHAPES]
    raise ValueError(f"unknown classification task {task!r}; expected one of {CLASSIFICATION_TASKS}")


def train_sample(seed: int, index: int, image_size: int, fractions: dict[str, float],
                 layout: dict | None = None) -> tuple[bytes, str, dict]:
    """One training pair: (PNG bytes, caption, metadata JSON of the contract). `layout` holds the scene
    difficulty settings (`SynthCapsConfig.layout()`: object_scale, max_objects)."""
    rng = _rng(seed, TRAIN_STREAM, index)
    scene = sample_scene(rng, **(layout or {}))
    clean = cap.sample_caption(scene, rng)
    flags = cap.draw_noise_flags(fractions, rng)  # noise draws come last: see the module docstring
    caption, applied = cap.noisy_caption(scene, clean, flags, rng)
    image = render_scene(scene, image_size)
    rendered_text = None
    if flags["text_in_image"]:
        rendered_text = draw_text_banner(image, cap.banner_words(caption, rng))
        applied.append("text_in_image")
    sample_id = f"{index:09d}"
    meta = {"sample_id": sample_id, "index": index, "objects": scene["objects"], "relations": scene["relations"],
            "action": scene["action"], "background": scene["background"], "clean_caption": clean,
            "caption": caption, "noise": applied, "rendered_text": rendered_text}
    return _png(image), caption, meta


def _train_shard(root: Path, config: SynthCapsConfig, shard: int) -> dict:
    noise_counts: Counter = Counter()
    members = []
    start, stop = shard * config.shard_size, min((shard + 1) * config.shard_size, config.num_train)
    for index in range(start, stop):
        png, caption, meta = train_sample(config.seed, index, config.image_size, config.noise_fractions(),
                                          config.layout())
        noise_counts.update(meta["noise"])
        key = meta["sample_id"]
        members += [tar_member(f"{key}.png", png), tar_member(f"{key}.txt", caption.encode()),
                    tar_member(f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())]
    relpath, digest = _write(root, f"train/shard-{shard:06d}.tar", tar_archive(members))
    return {"files": {relpath: digest}, "noise_counts": noise_counts}


def _retrieval_chunk(root: Path, config: SynthCapsConfig, split: str, start: int, stop: int) -> dict:
    files, images, annotations = {}, [], []
    k = config.captions_per_image
    for index in range(start, stop):
        rng = _rng(config.seed, RETRIEVAL_STREAMS[split], index)
        scene = sample_scene(rng, **config.layout())
        texts = cap.sample_caption_set(scene, rng, k)
        file_name = f"{index:06d}.png"
        relpath, digest = _write(root, f"retrieval/{split}/images/{file_name}",
                                 _png(render_scene(scene, config.image_size)))
        files[relpath] = digest
        images.append({"id": index, "file_name": file_name})
        annotations += [{"id": index * k + j, "image_id": index, "caption": text} for j, text in enumerate(texts)]
    return {"files": files, "retrieval": {"split": split, "images": images, "annotations": annotations}}


def _class_folder(class_index: int, classname: str) -> str:
    return f"{class_index:03d}_{classname.replace(' ', '_')}"


def _classes_json(task: str) -> bytes:
    return json.dumps({"task": task, "classnames": classnames(task),
                       "templates": list(cap.CLASS_TEMPLATES[task])}, indent=2).encode()


def _classification_split(root: Path, config: SynthCapsConfig, task: str, split: str) -> dict:
    per_class = getattr(config, f"zeroshot_per_class_{split}")
    stream, files = _classification_stream(task, split), {}
    for class_index, name in enumerate(classnames(task)):
        fixed = {"shape": {"shape": name}, "color": {"color": name},
                 "shape_color": dict(zip(("color", "shape"), name.split()))}[task]
        for n in range(per_class):
            scene = sample_single_object_scene(_rng(config.seed, stream, class_index * per_class + n), **fixed,
                                               object_scale=config.object_scale)
            relpath = f"classification/{task}/{split}/{_class_folder(class_index, name)}/{n:05d}.png"
            files.update([_write(root, relpath, _png(render_scene(scene, config.image_size)))])
    if split == CLASSIFICATION_SPLITS[0]:
        files.update([_write(root, f"classification/{task}/classes.json", _classes_json(task))])
    return {"files": files}


def _shift_set(root: Path, config: SynthCapsConfig, name: str) -> dict:
    """Shape-classification test sets under distribution shift. `texture` uses large objects only, so
    that the pattern covers enough pixels to be seen; `resample` is a fresh draw of the clean
    distribution from its own seed stream."""
    stream, per_class, files = _shift_stream(name), config.shift_per_class, {}
    for class_index, shape in enumerate(SHAPES):
        for n in range(per_class):
            index = class_index * per_class + n
            size = "large" if name == "texture" else None
            style_rng = _rng(config.seed, stream, index)
            scene = sample_single_object_scene(style_rng, shape=shape, size=size, object_scale=config.object_scale)
            image = {"sketch": lambda: render_sketch(scene, config.image_size),
                     "texture": lambda: render_textured(scene, config.image_size, style_rng),
                     "clutter": lambda: render_cluttered(scene, config.image_size, style_rng),
                     "resample": lambda: render_scene(scene, config.image_size)}[name]()
            relpath = f"shift/{name}/test/{_class_folder(class_index, shape)}/{n:05d}.png"
            files.update([_write(root, relpath, _png(image))])
    files.update([_write(root, f"shift/{name}/classes.json", _classes_json("shape"))])
    return {"files": files}


def _run_job(job: tuple) -> dict:
    function, args = job
    return function(*args)


def _jobs(root: Path, config: SynthCapsConfig) -> list[tuple]:
    num_shards = -(-config.num_train // config.shard_size)
    jobs = [(_train_shard, (root, config, shard)) for shard in range(num_shards)]
    for split, total in (("test", config.num_retrieval_test), ("val", config.num_retrieval_val)):
        jobs += [(_retrieval_chunk, (root, config, split, start, min(start + config.shard_size, total)))
                 for start in range(0, total, config.shard_size)]
    jobs += [(_classification_split, (root, config, task, split))
             for task in CLASSIFICATION_TASKS for split in CLASSIFICATION_SPLITS]
    return jobs + [(_shift_set, (root, config, name)) for name in SHIFTS]


def _counts(config: SynthCapsConfig) -> dict:
    k = config.captions_per_image
    return {
        "train": config.num_train,
        "train_shards": -(-config.num_train // config.shard_size),
        "retrieval": {split: {"images": n, "captions": n * k}
                      for split, n in (("test", config.num_retrieval_test), ("val", config.num_retrieval_val))},
        "classification": {task: {"classes": len(classnames(task)),
                                  **{split: len(classnames(task)) * getattr(config, f"zeroshot_per_class_{split}")
                                     for split in CLASSIFICATION_SPLITS}} for task in CLASSIFICATION_TASKS},
        "shift": {name: {"classes": len(SHAPES), "test": len(SHAPES) * config.shift_per_class} for name in SHIFTS},
    }


def _generate_into(root: Path, config: SynthCapsConfig, progress: bool) -> dict:
    jobs = _jobs(root, config)
    files, noise_counts, retrieval = {}, Counter({kind: 0 for kind in cap.NOISE_KINDS}), {"test": [], "val": []}
    with contextlib.ExitStack() as stack:
        if config.workers == 1:
            results = map(_run_job, jobs)
        else:  # spawn, not fork: safe when the caller already runs threads (torch, mlflow); a worker that
            # dies raises BrokenProcessPool here instead of hanging the pool
            pool = stack.enter_context(ProcessPoolExecutor(min(config.workers, len(jobs)),
                                                           mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(_run_job, jobs)
        if progress:
            results = tqdm(results, total=len(jobs), desc="synthcaps", unit="job")
        for result in results:
            files.update(result["files"])
            noise_counts.update(result.get("noise_counts", {}))
            if "retrieval" in result:
                retrieval[result["retrieval"]["split"]].append(result["retrieval"])
    for split, chunks in retrieval.items():
        chunks.sort(key=lambda chunk: chunk["images"][0]["id"])
        coco = {"images": [im for c in chunks for im in c["images"]],
                "annotations": [a for c in chunks for a in c["annotations"]]}
        files.update([_write(root, f"retrieval/{split}/captions.json", json.dumps(coco, indent=1).encode())])
    files = dict(sorted(files.items()))
    manifest = {"generator": "synthcaps", "generator_version": GENERATOR_VERSION, "seed": config.seed,
                "config": config.dataset_fields(), "counts": _counts(config),
                "noise_counts": dict(sorted(noise_counts.items())), "files": files,
                "dataset_hash": hashlib.sha256("".join(f"{p}\t{h}\n" for p, h in files.items()).encode()).hexdigest()}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _reuse(out: Path, config: SynthCapsConfig) -> dict:
    """The existing dataset at `out` if it was generated from the same settings, else a clear error."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{out} exists but has no manifest.json, so it is not a complete SynthCaps "
                                f"dataset; delete it or choose another output directory")
    manifest = json.loads(manifest_path.read_text())
    wanted = config.dataset_fields()
    if manifest.get("config") != wanted or manifest.get("generator_version") != GENERATOR_VERSION:
        found = manifest.get("config", {})
        differences = [f"{key}: {found.get(key)!r} on disk vs {value!r} requested"
                       for key, value in wanted.items() if found.get(key) != value]
        if manifest.get("generator_version") != GENERATOR_VERSION:
            differences.append(f"generator_version: {manifest.get('generator_version')!r} on disk vs "
                               f"{GENERATOR_VERSION!r} here")
        raise ValueError(f"{out} holds SynthCaps generated with different settings ({'; '.join(differences)}); "
                         f"delete it or choose another output directory")
    log.info("reusing SynthCaps at %s (same config, dataset_hash %s)", out, manifest["dataset_hash"][:12])
    return manifest


def generate_synthcaps(out_dir: str | Path, config: SynthCapsConfig, progress: bool = False) -> dict:
    """Generate SynthCaps into `out_dir` and return its manifest; reuse it if it already holds the same
    config. Written into `<out_dir>.tmp-<pid>` and renamed at the end, so an interrupted run never
    leaves a complete-looking dataset behind."""
    out = Path(out_dir)
    if out.exists():
        return _reuse(out, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crashed run that had this pid
    started = time.perf_counter()
    try:
        manifest = _generate_into(tmp, config, progress)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp)  # a concurrent run finished first: use its dataset if its config matches
            return _reuse(out, config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("generated SynthCaps at %s in %.1f s (dataset_hash %s)", out, time.perf_counter() - started,
             manifest["dataset_hash"][:12])
    return manifest
