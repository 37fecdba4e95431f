"""The teacher feature cache (SPEC 3.2, 4.2): cached targets equal the online teacher's, content addressing
and reuse, refusal of other data, interrupted builds, s3://, the CLI, and lookup speed."""

from __future__ import annotations

import json
import random
import time
import uuid

import numpy as np
import pytest
import timm
import torch
from torch import nn

from alignlab.data.dataset import sample_aug_seed
from alignlab.data.shards import WebDatasetIndex
from alignlab.data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform
from alignlab.teachers import Teacher
from alignlab.teachers.cache import (CacheError, TeacherCache, build_teacher_cache, decode_topk, encode_topk,
                                     topk_bytes_per_sample)
from alignlab.teachers.registry import TimmBackbone
from s3_server import s3_env, s3_server  # noqa: F401  (pytest fixtures)

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
ALL_TARGETS = ("objects", "attributes", "logits", "embedding")


def tiny_teacher(seed: int = 0, objects: int = 30, attributes: int = 5) -> Teacher:
    """A 1-block ViT with a 7-class classifier and random concept heads (timm's 0.5 mean/std: it re-normalises)."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=7, **TINY_VIT)
    heads = {"objects": nn.Linear(48, objects), "attributes": nn.Linear(48, attributes)}
    concepts = {"objects": [f"o{i}" for i in range(objects)], "attributes": [f"a{i}" for i in range(attributes)]}
    return Teacher(TimmBackbone(model), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), image_size=32, has_logits=True,
                   heads=heads, concepts=concepts, source=f"tiny-{seed}")


class CountingTeacher(nn.Module):
    """Forwards to a teacher, counting calls; raises after `fail_after` calls (a crashing build)."""

    def __init__(self, teacher: Teacher, fail_after: int | None = None):
        super().__init__()
        self.teacher, self.calls, self.fail_after = teacher, 0, fail_after
        for name in ("mean", "std", "image_size", "weights_hash", "target_names", "source"):
            setattr(self, name, getattr(teacher, name))

    def forward(self, images, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("teacher process killed")
        self.calls += 1
        return self.teacher(images, **kwargs)


def online_dense_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force: softmax, keep the k largest, renormalise, zeros elsewhere."""
    probs = torch.softmax(logits, dim=-1)
    keep = probs.topk(k, dim=-1).indices
    dense = torch.zeros_like(probs).scatter_(1, keep, probs.gather(1, keep))
    return dense / dense.sum(dim=1, keepdim=True)


def test_encode_decode_top_k_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    ids, quantised = encode_topk(logits, 2, 4)
    assert ids.dtype == np.uint8 and ids.tolist() == [[1, 3]]
    assert quantised.dtype == np.uint16 and quantised.tolist() == [[round(0.4 / 0.7 * 65535)]]
    dense = decode_topk(ids, quantised, 4)
    torch.testing.assert_close(dense, torch.tensor([[0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]]), atol=2e-5, rtol=0)
    assert topk_bytes_per_sample(10, 10_000) == 10 * 2 + 9 * 2  # DiHT-size vocabulary: uint16 ids
    assert topk_bytes_per_sample(10, 200) == 10 + 9 * 2 and topk_bytes_per_sample(10, 4) == 4 + 3 * 2


def test_cached_targets_equal_online_teacher(synth_root, tmp_path):
    teacher = tiny_teacher()
    uri = build_teacher_cache(teacher, synth_root, tmp_path / "cache", targets=ALL_TARGETS, k=10, views=2,
                              batch_size=64, image_size=32, view_seed=5, shard_size=100)
    cache = TeacherCache.open(uri, expected_dataset_hash=json.loads((synth_root / "manifest.json").read_text())
                              ["dataset_hash"], source=WebDatasetIndex(synth_root / "train"))
    assert (cache.targets, cache.k, cache.views, cache.embedding_dim) == (ALL_TARGETS, 10, 2, 48)
    assert cache.num_classes == {"objects": 30, "attributes": 5, "logits": 7} and len(cache) == 256
    assert [v["kind"] for v in cache.view_records] == ["eval", "train"] and cache.view_records[1]["view_seed"] == 5
    # per view: objects 10 uint8 ids + 9 uint16; attributes (5 classes < k) 5 + 4 * 2; logits 7 and embedding 48 fp16
    assert cache.bytes_per_sample == 2 * ((10 + 18) + (5 + 8) + 7 * 2 + 48 * 2)
    assert len(cache.meta["shards"]) == 3

    source = WebDatasetIndex(synth_root / "train")
    indices = torch.tensor([0, 99, 100, 255, 17, 200])  # across the three shards
    eval_t, train_t = build_image_transform(32, train=False), build_image_transform(32, train=True)
    for view in (0, 1):
        images = []
        for i in indices.tolist():
            generator = random.Random(sample_aug_seed(5, view, i)) if view else None
            images.append((eval_t if view == 0 else train_t)(source.get(i)[0], generator))
        online = teacher(torch.stack(images), input_mean=CLIP_MEAN, input_std=CLIP_STD)
        cached = cache.lookup(indices, view=view)
        for name in ("objects", "attributes"):
            expected = online_dense_topk(online[name], min(10, online[name].shape[1]))
            assert torch.equal(cached[name] > 0, expected > 0), name  # the same class ids, exactly
            torch.testing.assert_close(cached[name], expected, atol=1e-4, rtol=0)
            torch.testing.assert_close(cached[name].sum(1), torch.ones(len(indices)), atol=1e-4, rtol=0)
        for name in ("logits", "embedding"):
            torch.testing.assert_close(cached[name], online[name].half().float(), atol=0, rtol=0)
    # a per-sample view tensor picks each row's view
    mixed = cache.lookup(indices[:2], view=torch.tensor([0, 1]))
    torch.testing.assert_close(mixed["embedding"][0], cache.lookup(indices[:1], view=0)["embedding"][0])
    torch.testing.assert_close(mixed["embedding"][1], cache.lookup(indices[1:2], view=1)["embedding"][0])
    with pytest.raises(IndexError, match="outside the cache's 256 samples"):
        cache.lookup(torch.tensor([256]))
    with pytest.raises(IndexError, match="view 2"):
        cache.lookup(indices, view=2)


def test_reuse_computes_nothing_and_inputs_change_the_key(synth_root, tmp_path):
    out = tmp_path / "cache"
    counting = CountingTeacher(tiny_teacher())
    first = build_teacher_cache(counting, synth_root, out, k=10, batch_size=128, image_size=32)
    assert counting.calls == 2  # 256 samples / 128
    again = CountingTeacher(tiny_teacher())
    assert build_teacher_cache(again, synth_root, out, k=10, batch_size=64, image_size=32) == first
    assert again.calls == 0  # found complete: nothing computed (batch size is not part of the key)

    other_k = build_teacher_cache(tiny_teacher(), synth_root, out, k=5, batch_size=128, image_size=32)
    other_teacher = build_teacher_cache(tiny_teacher(seed=1), synth_root, out, k=10, batch_size=128, image_size=32)
    other_size = build_teacher_cache(tiny_teacher(), synth_root, out, k=10, batch_size=128, image_size=16)
    keys = {u.rsplit("/", 1)[1] for u in (first, other_k, other_teacher, other_size)}
    assert len(keys) == 4 and all(len(k) == 20 for k in keys)
    assert TeacherCache.open(other_k).k == 5
    with pytest.raises(CacheError, match="holds 4 teacher caches"):
        TeacherCache.open(out)

    forced = CountingTeacher(tiny_teacher())
    assert build_teacher_cache(forced, synth_root, out, k=10, batch_size=128, image_size=32, force=True) == first
    assert forced.calls == 2


def test_other_data_is_refused(synth_root, tmp_path):
    uri = build_teacher_cache(tiny_teacher(), synth_root, tmp_path / "cache", targets=("embedding",), image_size=32,
                              batch_size=128)
    with pytest.raises(CacheError, match="built for dataset .* but the training data has hash 0000"):
        TeacherCache.open(uri, expected_dataset_hash="0" * 64)
    first_shard = WebDatasetIndex(str(synth_root / "train" / "shard-000000.tar"))
    with pytest.raises(CacheError, match="100 samples vs 256 cached"):
        TeacherCache.open(uri, source=first_shard)
    with pytest.raises(ValueError, match="has no .*'objects'.* output"):
        build_teacher_cache(load_plain_timm(), synth_root, tmp_path / "c2", targets=("objects",), image_size=32)


def load_plain_timm():
    from alignlab.teachers import load_teacher

    return load_teacher("timm:vit_tiny_patch16_224", kwargs={**TINY_VIT, "num_classes": 0})


def test_interrupted_build_leaves_nothing_open_accepts(synth_root, tmp_path):
    out = tmp_path / "cache"
    crashing = CountingTeacher(tiny_teacher(), fail_after=3)
    with pytest.raises(RuntimeError, match="killed"):
        build_teacher_cache(crashing, synth_root, out, k=10, batch_size=32, shard_size=64, image_size=32)
    leftovers = list(out.rglob("*.npy"))
    assert leftovers  # shards were written before the crash ...
    with pytest.raises(CacheError, match="cache.json is missing"):
        TeacherCache.open(leftovers[0].parent.parent)  # ... but open refuses the folder
    with pytest.raises(CacheError, match="no complete teacher cache"):
        TeacherCache.open(out)

    uri = build_teacher_cache(tiny_teacher(), synth_root, out, k=10, batch_size=128, shard_size=64, image_size=32)
    assert TeacherCache.open(out).uri == uri  # the one complete cache under <out> is found
    # a corrupted shard is caught by its checksum
    shard = next((tmp_path / "cache").rglob("objects.ids.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="does not match its sha256"):
        TeacherCache.open(uri)


def test_cache_on_s3_matches_local(synth_root, tmp_path, s3_env):
    bucket = s3_env.make_bucket(f"tc-{uuid.uuid4().hex[:12]}")
    teacher = tiny_teacher()
    local = TeacherCache.open(build_teacher_cache(teacher, synth_root, tmp_path / "cache", targets=ALL_TARGETS,
                                                  image_size=32, batch_size=128, shard_size=100))
    counting = CountingTeacher(teacher)
    uri = build_teacher_cache(counting, synth_root, f"s3://{bucket}/caches", targets=ALL_TARGETS, image_size=32,
                              batch_size=128, shard_size=100)
    assert uri == f"s3://{bucket}/caches/{local.key}" and counting.calls == 2
    remote = TeacherCache.open(f"s3://{bucket}/caches", expected_dataset_hash=local.dataset_hash)
    indices = torch.tensor([3, 150, 255, 0])
    for name, value in local.lookup(indices).items():
        assert torch.equal(remote.lookup(indices)[name], value), name
    again = CountingTeacher(teacher)
    build_teacher_cache(again, synth_root, f"s3://{bucket}/caches", targets=ALL_TARGETS, image_size=32)
    assert again.calls == 0


def test_cli_cache_and_lookup_speed(synth_root, tmp_path, capsys):
    from alignlab.cli import main

    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=7, **TINY_VIT).state_dict(), tmp_path / "t.pth")
    args = ["teacher", "cache", "--teacher", str(tmp_path / "t.pth"), "--arch", "timm:vit_tiny_patch16_224",
            "--arch-kwargs", json.dumps(TINY_VIT), "--data", str(synth_root), "--out", str(tmp_path / "c"),
            "--targets", "logits,embedding", "--image-size", "32", "--device", "cpu"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 256 and printed["targets"] == ["logits", "embedding"]
    assert printed["bytes_per_sample"] == (7 + 48) * 2
    assert main(args[:-6] + ["--targets", "objects", "--image-size", "32"]) == 2
    assert "has no ['objects'] output" in capsys.readouterr().err

    cache = TeacherCache.open(printed["cache"])
    batch = torch.randint(0, 256, (128,), generator=torch.Generator().manual_seed(0))
    cache.lookup(batch)
    started = time.perf_counter()
    for _ in range(20):
        cache.lookup(batch)
    per_sample = (time.perf_counter() - started) / (20 * 128)
    assert per_sample < 1e-4, f"{per_sample * 1e6:.1f} us per sample"
