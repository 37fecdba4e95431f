"""Training straight from S3 (issue 4, section 1): ranged reads, the s3:// shard index, and `train`
on an s3:// data root against the same data on local disk, on a real SeaweedFS (tests/s3_server.py)."""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import multiprocessing
import operator
import pickle
import tarfile
import threading
import uuid
from pathlib import Path

import pytest
import torch

import alignlab.storage as storage
from alignlab.config import validate_config
from alignlab.data.shards import SIDECAR_SUFFIX, WebDatasetIndex, expand_shards, write_shard_index
from alignlab.training import builders
from alignlab.data.roots import EVAL_FOLDERS, local_eval_root, resolve_data_root
from conftest import tiny_config_tree
from s3_server import CuttingProxy, s3_env, s3_server, start_seaweedfs  # noqa: F401  (pytest fixtures)

pytest.importorskip("minio")


def _upload_tree(local_root: Path, uri: str, subfolders=("train",)) -> list[str]:
    """Upload manifest.json and the given sub-folders of a SynthCaps folder; returns the keys."""
    keys = ["manifest.json"] + [path.relative_to(local_root).as_posix() for folder in subfolders
                                for path in sorted((local_root / folder).rglob("*")) if path.is_file()]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: storage.upload_file(local_root / key, f"{uri}/{key}"), keys))
    return keys


@pytest.fixture(scope="module")
def s3_synth(s3_server, synth_root):
    """The whole tiny SynthCaps (train shards, evaluation folders, manifest) uploaded once to s3://<bucket>/synth."""
    bucket = s3_server.make_bucket(f"st-{uuid.uuid4().hex[:12]}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_server.env().items():
            patch.setenv(name, value)
        _upload_tree(synth_root, f"s3://{bucket}/synth", ("train",) + EVAL_FOLDERS)
    return f"s3://{bucket}/synth"


def _without_url(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k != "__url__"}


# ---- storage: ranged reads ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_read_range_is_exact_and_checks_the_length(backend, request, tmp_path):
    root = str(tmp_path / "root")
    if backend == "s3":
        server = request.getfixturevalue("s3_env")
        root = f"s3://{server.make_bucket(f'rr-{uuid.uuid4().hex[:12]}')}/root"
    payload = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable
    store = storage.open_store(root)
    store.write_bytes("a/blob.bin", payload)
    assert store.read_range("a/blob.bin", 0, 10) == payload[:10]
    assert store.read_range("a/blob.bin", 1000, 3000) == payload[1000:4000]
    assert storage.read_range(f"{root}/a/blob.bin", 10239, 1) == payload[-1:]
    assert store.read_range("a/blob.bin", 500, 0) == b""
    assert store.stat("a/blob.bin").size == len(payload)
    assert (store.stat("a/blob.bin").etag is None) == (backend == "local")
    uri = store.uri("a/blob.bin")
    with pytest.raises(OSError, match=rf"{uri}: read 240 of 300 bytes at offset 10000.*shorter than expected"):
        store.read_range("a/blob.bin", 10000, 300)
    with pytest.raises(ValueError, match="start and length must be >= 0"):
        store.read_range("a/blob.bin", -1, 5)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        store.read_range("a/missing.bin", 0, 5)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        store.stat("a/missing.bin")


def test_s3_range_read_refuses_an_object_changed_since_its_etag(s3_env):
    from alignlab.storage.s3 import S3Store

    store = storage.open_store(f"s3://{s3_env.make_bucket(f'et-{uuid.uuid4().hex[:12]}')}")
    assert isinstance(store, S3Store)
    store.write_bytes("k.bin", b"first version")
    etag = store.stat("k.bin").etag
    assert store.read_range("k.bin", 6, 7, if_match=etag) == b"version"
    store.write_bytes("k.bin", b"second version")
    with pytest.raises(OSError, match=rf"{store.uri('k.bin')} changed since it was indexed"):
        store.read_range("k.bin", 6, 7, if_match=etag)
    with pytest.raises(OSError, match="range starts past the end"):
        store.read_range("k.bin", 100, 5)


def test_pickled_s3_store_carries_no_credentials(s3_env, monkeypatch):
    store = storage.open_store(f"s3://{s3_env.make_bucket(f'pk-{uuid.uuid4().hex[:12]}')}/p")
    store.write_bytes("x", b"payload")
    blob = pickle.dumps(store)
    assert s3_env.secret_key.encode() not in blob and s3_env.access_key.encode() not in blob
    assert pickle.loads(blob).read_bytes("x") == b"payload"  # credentials re-read from the environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(PermissionError, match=r"s3://pk-.*/p/x refused"):
        pickle.loads(blob).read_bytes("x")


# ---- the shard index over s3:// ------------------------------------------------------------------


def test_s3_index_returns_the_local_samples_byte_for_byte(s3_env, s3_synth, synth_root):
    local = WebDatasetIndex(synth_root / "train")
    remote = WebDatasetIndex(f"{s3_synth}/train", manifest=f"{s3_synth}/manifest.json")
    assert len(remote) == len(local) == 256 and remote.skipped == local.skipped == []
    assert remote.shard_paths == [f"{s3_synth}/train/shard-{i:06d}.tar" for i in range(3)]
    assert remote.unlisted_shards == [] and remote.num_sidecars == 0
    for i in range(len(local)):
        want, got = local[i], remote[i]
        assert _without_url(got) == _without_url(want), i
        assert got["__url__"] == f"{s3_synth}/train/{Path(want['__url__']).name}"
    image, caption, meta = remote.get(17)
    local_image, local_caption, _ = local.get(17)
    assert image.tobytes() == local_image.tobytes() and caption == local_caption
    assert meta["__url__"].startswith("s3://")
    # Brace patterns and globs expand against the bucket as they do on disk.
    assert expand_shards(f"{s3_synth}/train/shard-{{000000..000001}}.tar") == remote.shard_paths[:2]
    assert expand_shards(f"{s3_synth}/train/*.tar") == remote.shard_paths
    assert expand_shards([f"{s3_synth}/train/shard-000002.tar"]) == remote.shard_paths[2:]


def test_header_walk_skips_bodies_and_sidecar_index_replaces_it(s3_env, tmp_path, monkeypatch):
    """A shard with large members: the walk fetches headers, not bodies; a sidecar index gives the same
    offsets without any ranged read; a sidecar left behind by an older shard version is ignored."""
    from alignlab.storage.s3 import S3Store

    shard = tmp_path / "big-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            members = {"png": bytes([i]) * 200_000, "txt": f"caption {i}".encode(), "json": b'{"i": %d}' % i}
            if i == 3:
                del members["txt"]  # incomplete: counted, not indexed
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    uri = f"s3://{s3_env.make_bucket(f'hw-{uuid.uuid4().hex[:12]}')}/big/{shard.name}"
    storage.upload_file(shard, uri)

    ranges = []
    original = S3Store.read_range

    def counting(self, key, start, length, if_match=None):
        ranges.append(length)
        return original(self, key, start, length, if_match=if_match)

    monkeypatch.setattr(S3Store, "read_range", counting)
    local, remote = WebDatasetIndex(shard), WebDatasetIndex(uri)
    walk_bytes = sum(ranges)
    assert len(remote) == len(local) == 5
    assert [(r["shard"], r["key"], r["reason"]) for r in remote.skipped] == [(uri, "0003", "missing_caption")]
    assert (remote._offsets == local._offsets).all() and (remote._sizes == local._sizes).all()
    assert walk_bytes < 0.1 * shard.stat().st_size, (walk_bytes, shard.stat().st_size)

    ranges.clear()
    assert _without_url(remote[4]) == _without_url(local[4])
    assert len(ranges) == 1  # one GET spans the sample's members

    assert write_shard_index(uri) == uri + SIDECAR_SUFFIX
    ranges.clear()
    with_sidecar = WebDatasetIndex(uri)
    assert ranges == [] and with_sidecar.num_sidecars == 1
    assert (with_sidecar._offsets == local._offsets).all() and with_sidecar.skipped == remote.skipped

    # The shard is rewritten (one sample fewer): the old sidecar is stale and must not be trusted.
    smaller = tmp_path / "smaller.tar"
    with tarfile.open(shard) as source, tarfile.open(smaller, "w") as sink:
        for member in source.getmembers()[:6]:  # samples 0000 and 0001
            sink.addfile(member, source.extractfile(member))
    storage.upload_file(smaller, uri)
    rebuilt = WebDatasetIndex(uri)
    assert rebuilt.stale_sidecars == [uri + SIDECAR_SUFFIX] and rebuilt.num_sidecars == 0 and len(rebuilt) == 2
    # ... and an index built before the rewrite refuses to read it, instead of returning wrong bytes.
    with pytest.raises(OSError, match=f"{uri} changed since it was indexed"):
        remote[1]

    # Truncated uploads: cut inside a body, or exactly at a header (which tarfile alone takes for the end).
    # Found as on local disk: the sample before the cut is kept, the cut one is named, the shard is listed.
    data = shard.read_bytes()
    sample_1_header = int(local._offsets[1, 0]) - 512
    for cut, lost, detail in ((sample_1_header + 5000, [(uri, "0001", "truncated_shard")], "inside member '0001.png'"),
                              (sample_1_header, [], "between two members, without the end-of-archive marker")):
        storage.write_bytes(uri, data[:cut])
        cut_index = WebDatasetIndex(uri)
        assert len(cut_index) == 1 and _without_url(cut_index[0]) == _without_url(local[0])
        assert [(r["shard"], r["key"], r["reason"]) for r in cut_index.skipped] == lost
        [truncated] = cut_index.truncated_shards
        assert (truncated["at_byte"], truncated["samples_kept"], truncated["last_kept"]) == (cut, 1, "0000")
        assert detail in truncated["detail"]
        with pytest.raises(ValueError, match=f"{uri} ends early"):
            write_shard_index(uri)


def test_pickled_index_has_no_credentials_and_reopens_in_a_spawned_process(s3_env, s3_synth):
    remote = WebDatasetIndex(f"{s3_synth}/train/shard-000000.tar")
    expected = remote[0]["txt"]  # the parent has an open client now
    blob = pickle.dumps(remote)
    assert s3_env.secret_key.encode() not in blob and s3_env.access_key.encode() not in blob
    # operator.getitem, not a helper of this module, so the child imports alignlab only (faster).
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(operator.getitem, remote, 0).result(timeout=120)["txt"] == expected


# ---- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_from_s3_matches_local_bit_for_bit(s3_env, s3_synth, synth_root, tmp_path, num_workers):
    histories, states = [], []
    for name, root in (("local", synth_root), ("s3", s3_synth)):
        from alignlab.training.trainer import train

        tree = tiny_config_tree(root, tmp_path / name, max_steps=3, checkpoint_every=100)
        tree["data"]["num_workers"] = num_workers
        result = train(validate_config(tree), tmp_path / name / "run")
        histories.append([(h["step"], h["loss"], h["logit_scale"]) for h in result.history])
        states.append(result.model.state_dict())
    assert len(histories[0]) == 3 and histories[0] == histories[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_server_killed_mid_read_is_retried_or_fails_clearly_never_short(synth_root, tmp_path, monkeypatch, caplog):
    """R3: the S3 server is SIGKILLed while a training sample's ranged GET is half-way through its body (a
    relay cuts the response after 64 body bytes). Restarted, the read is retried and training matches an
    uninterrupted local run bit for bit; never back, the run fails naming the shard, nothing is skipped."""
    from alignlab.training.trainer import train

    server = start_seaweedfs(tmp_path / "weed")  # its own server: this one gets killed
    proxy = CuttingProxy(("127.0.0.1", int(server.endpoint.rsplit(":", 1)[1])))
    try:
        for name, value in {**server.env(), "AWS_ENDPOINT_URL": proxy.endpoint}.items():
            monkeypatch.setenv(name, value)
        root = f"s3://{server.make_bucket('outage')}/synth"
        for key in _upload_tree(synth_root, root)[1:]:
            write_shard_index(f"{root}/{key}")  # so that every ranged GET below reads a training sample
        tree = tiny_config_tree(synth_root, tmp_path / "local", max_steps=4)
        tree["data"]["num_workers"] = 0
        reference = [h["loss"] for h in train(validate_config(tree), tmp_path / "local").history]
        tree["data"]["root"] = root

        def restart():  # a load balancer holds new connections while the server comes back
            proxy.set_mode("hold")
            server.process.kill()
            threading.Thread(target=lambda: (server.restart(), proxy.set_mode("relay")), daemon=True).start()

        proxy.cut_after(40, 64, restart)  # batch 2 of 4 (32 samples, one GET each)
        with caplog.at_level(logging.INFO, logger="alignlab.storage"):
            resumed = train(validate_config(tree), tmp_path / "restart")
        assert proxy._cut is None and "transient ProtocolError on attempt 1/5, retrying" in caplog.text
        assert [h["loss"] for h in resumed.history] == reference
        assert json.loads((tmp_path / "restart" / "skips.json").read_text())["skipped"] == 0

        def kill():
            proxy.set_mode("refuse")
            server.process.kill()

        proxy.cut_after(40, 64, kill)
        with pytest.raises(OSError, match=rf"read {root}/train/shard-00000\d.tar failed after 5 attempt\(s\) "
                                          rf"against {proxy.endpoint}: ProtocolError"):
            train(validate_config(tree), tmp_path / "kill")
        assert json.loads((tmp_path / "kill" / "skips.json").read_text())["skipped"] == 0  # not taken for corrupt
    finally:
        proxy.close()
        server.stop()


def test_s3_root_resolves_to_the_uri_and_refuses_synth_generation():
    data = validate_config(tiny_config_tree("s3://bucket/data/", "/tmp/out")).data
    assert resolve_data_root(data) == "s3://bucket/data"
    assert builders._train_spec(data, "s3://bucket/data") == "s3://bucket/data/train"
    tree = tiny_config_tree("s3://bucket/data", "/tmp/out")
    tree["data"]["synth"] = {"num_train": 64}
    synth = validate_config(tree).data
    with pytest.raises(ValueError, match="generate it locally, upload the folder"):
        resolve_data_root(synth)


def test_missing_shard_and_wrong_credentials_are_named(s3_env, synth_root, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    root = f"s3://{s3_env.make_bucket(f'ms-{uuid.uuid4().hex[:12]}')}/synth"
    _upload_tree(synth_root, root)
    storage.open_store(root).delete("train/shard-000001.tar")
    gone = f"{root}/train/shard-000001.tar"

    with pytest.raises(FileNotFoundError, match=rf"listed in {root}/manifest.json do not exist, first: {gone}"):
        WebDatasetIndex(f"{root}/train", manifest=f"{root}/manifest.json")
    with pytest.raises(FileNotFoundError, match=rf"do not exist, first: {gone} \({gone} does not exist"):
        WebDatasetIndex(f"{root}/train/shard-{{000000..000002}}.tar")
    from alignlab.training.trainer import train

    cfg = validate_config(tiny_config_tree(root, tmp_path, max_steps=1))
    with pytest.raises(FileNotFoundError, match=gone):
        train(cfg, tmp_path / "run")
    # Without a manifest, the listing decides: the two shards left are read (100 + 56 samples).
    storage.open_store(root).delete("manifest.json")
    assert len(WebDatasetIndex(f"{root}/train", manifest=f"{root}/manifest.json")) == 156

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_env.secret_key)
    messages = []
    for spec in (f"{root}/train", f"{root}/train/shard-000000.tar"):
        with pytest.raises(PermissionError, match=rf"{root}/train.*refused.*AWS_SECRET_ACCESS_KEY") as denied:
            WebDatasetIndex(spec)
        messages.append(str(denied.value))
    with pytest.raises(PermissionError, match=rf"{root}/train"):
        train(cfg, tmp_path / "run-denied")
    for secret in (s3_env.secret_key, s3_env.access_key):
        assert secret not in caplog.text and all(secret not in message for message in messages)


# ---- evaluation: a local, content-addressed copy of the small folders ---------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_eval_folders_are_cached_by_dataset_hash_and_verified(s3_env, s3_synth, synth_root, tmp_path, monkeypatch):
    from alignlab.storage.s3 import S3Store

    manifest = json.loads((synth_root / "manifest.json").read_text())
    reads = []
    original = S3Store.read_bytes
    monkeypatch.setattr(S3Store, "read_bytes", lambda self, key: reads.append(key) or original(self, key))
    cached = local_eval_root(s3_synth, cache_dir=tmp_path / "cache")
    assert cached == tmp_path / "cache" / manifest["dataset_hash"]
    want = {key: data for key, data in _files(synth_root).items() if key.split("/")[0] in EVAL_FOLDERS}
    assert {k: v for k, v in _files(cached).items() if k != "manifest.json"} == want and len(want) > 800
    assert not any(key.startswith("train/") for key in reads)  # shards are streamed, never downloaded
    reads.clear()
    assert local_eval_root(s3_synth, cache_dir=tmp_path / "cache") == cached
    assert reads == ["synth/manifest.json"]  # second time: only the manifest, to learn the content address
    assert local_eval_root(synth_root) == synth_root  # local roots are used in place

    # A corrupted object: nothing is cached (no folder, no leftovers) and the error names it.
    store = storage.open_store(s3_synth)
    key = next(iter(want))
    store.write_bytes(f"copy/{key}", b"not the recorded bytes")
    with pytest.raises(storage.ChecksumMismatchError, match=f"{s3_synth}/copy/{key}"):
        storage.download_tree(f"{s3_synth}/copy", [key], tmp_path / "bad", checksums={key: manifest["files"][key]})
    assert list(tmp_path.glob("*bad*")) == []


def test_run_experiment_on_s3_root_trains_and_evaluates_like_local(s3_env, s3_synth, synth_root, tmp_path, monkeypatch):
    from alignlab.experiment import run_experiment

    monkeypatch.setenv("ALIGNLAB_CACHE_DIR", str(tmp_path / "cache"))
    results = []
    for name, root in (("local", synth_root), ("s3", s3_synth)):
        tree = tiny_config_tree(root, tmp_path / name, max_steps=2)
        tree["eval"] = {"enabled": True, "batch_size": 64, "zeroshot_tasks": ["shape"], "linear_probe_task": "shape",
                        "linear_probe_cs": [1.0], "shifts": ["sketch"], "histogram": False}
        metrics = run_experiment(validate_config(tree), tmp_path / name / "run")
        results.append({k: v for k, v in metrics.items() if "seconds" not in k and "time" not in k})
    evaluated = {"retrieval/num_images", "retrieval/mean_R@1", "zeroshot/shape/top1", "linear_probe/shape/top1",
                 "robustness/shape/sketch/top1"}
    assert evaluated <= set(results[0]) and results[0]["retrieval/num_images"] == 40
    assert results[0] == results[1]
