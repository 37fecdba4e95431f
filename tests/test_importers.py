"""ShardWriter and `alignlab data import` (COCO, TSV, webdataset, JSONL): round trips, skipped items, training.

Each source is built from SynthCaps pairs re-exported into that format, plus broken items of every kind;
the import must write every good pair unchanged and record every bad item with the right reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignlab.cli import main as cli_main
from alignlab.config import validate_config
from alignlab.data import importers
from alignlab.data.shards import WebDatasetIndex
from alignlab.data.writer import (DuplicateKeyError, ShardWriter, check_key, sanitize_key, tar_archive,
                                  tar_member)
from alignlab.training.trainer import train
from conftest import tiny_config_tree
from s3_server import s3_env, s3_server  # noqa: F401  (pytest fixtures)

TINY_SYNTH = dict(seed=5, num_train=24, shard_size=10, num_retrieval_test=2, num_retrieval_val=2,
                  zeroshot_per_class_train=1, zeroshot_per_class_val=1, zeroshot_per_class_test=1, shift_per_class=1)
NOT_AN_IMAGE = b"this is not an image at all"
NON_UTF8 = b"a caf\xe9 with a red square"  # Latin-1, not UTF-8


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[tuple[str, bytes, str]]:
    """(sample_id, PNG bytes, caption) of a tiny SynthCaps train split."""
    from alignlab.data.synth import SynthCapsConfig, generate_synthcaps

    root = tmp_path_factory.mktemp("synth") / "data"
    generate_synthcaps(root, SynthCapsConfig(**TINY_SYNTH))
    index = WebDatasetIndex(root / "train")
    return [(index[i]["__key__"], index[i]["png"], index[i]["txt"]) for i in range(len(index))]


def _truncated(png: bytes) -> bytes:
    return png[: len(png) // 2]


def _read_output(out: Path) -> dict[str, tuple[bytes, str, dict]]:
    index = WebDatasetIndex(out / "train")
    assert index.skipped == [] and index.truncated_shards == []
    result = {}
    for i in range(len(index)):
        sample = index[i]
        image = sample.get("png", sample.get("jpg"))
        result[sample["__key__"]] = (image, sample["txt"], sample["json"])
    return result


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _check_accounting(manifest: dict, expected_skips: Counter, items_read: int) -> None:
    """The skipped list, its per-reason counts and the written count add up to the items read."""
    assert Counter(s["reason"] for s in manifest["skipped"]) == expected_skips
    assert manifest["skipped_counts"] == dict(sorted(expected_skips.items()))
    assert manifest["counts"]["train"] + len(manifest["skipped"]) == items_read
    # every shard is listed with its real checksum, and the hash covers them
    out_files = manifest["files"]
    assert manifest["counts"]["train_shards"] == len(out_files)


def _check_files(out: Path, manifest: dict) -> None:
    for relpath, digest in manifest["files"].items():
        assert hashlib.sha256((out / relpath).read_bytes()).hexdigest() == digest
    lines = "".join(f"{p}\t{h}\n" for p, h in sorted(manifest["files"].items()))
    assert manifest["dataset_hash"] == hashlib.sha256(lines.encode()).hexdigest()


def _skipped(manifest: dict, reason: str) -> list[str]:
    return sorted(s["item"] for s in manifest["skipped"] if s["reason"] == reason)


# ---- ShardWriter ------------------------------------------------------------------------------------------

def test_writer_shards_manifest_and_reader_round_trip(pairs, tmp_path):
    out = tmp_path / "out"
    with ShardWriter(out, shard_size=5) as writer:
        for key, png, caption in pairs[:12]:
            writer.add(key, png, caption, {"extra": key})
        writer.skip("somewhere:1", "missing_file", "gone")
        manifest = writer.close(source={"format": "test"})
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"shard-{n:06d}.tar" for n in range(3)]
    assert [len(WebDatasetIndex(out / "train" / f"shard-{n:06d}.tar")) for n in range(3)] == [5, 5, 2]
    assert manifest["counts"] == {"train": 12, "train_shards": 3, "skipped": 1, "images": {"png": 12}}
    assert manifest["skipped"] == [{"item": "somewhere:1", "reason": "missing_file", "detail": "gone"}]
    assert manifest["source"] == {"format": "test"} and _manifest(out) == manifest
    _check_files(out, manifest)
    written = _read_output(out)
    assert list(written) == [key for key, _, _ in pairs[:12]]  # order kept
    for key, png, caption in pairs[:12]:
        assert written[key][:2] == (png, caption)
        assert written[key][2] == {"extra": key, "sample_id": key, "source": "alignlab-import"}


def test_writer_is_deterministic_and_shares_the_synthcaps_tar_format(pairs, tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, shard_size=100) as writer:
            for key, png, caption in pairs[:3]:
                writer.add(key, png, caption)
    a, b = ((tmp_path / n / "train/shard-000000.tar").read_bytes() for n in ("a", "b"))
    assert a == b and len(a) % tarfile.RECORDSIZE == 0
    with tarfile.open(tmp_path / "a/train/shard-000000.tar") as tar:
        assert [m.name for m in tar][:3] == [f"{pairs[0][0]}.png", f"{pairs[0][0]}.txt", f"{pairs[0][0]}.json"]
        assert {(m.mtime, m.uid, m.mode) for m in tar} == {(0, 0, 0o644)}
    archive = tar_archive([tar_member("x.txt", b"hi")])
    assert len(archive) == tarfile.RECORDSIZE and archive[512:514] == b"hi"


def test_writer_rejects_bad_keys_duplicates_and_non_images(pairs, tmp_path):
    key, png, caption = pairs[0]
    with ShardWriter(tmp_path / "out") as writer:
        for bad in ("a.b", "a/b", "", "_meta", "x" * 81, "spa ce"):
            with pytest.raises(ValueError, match="invalid sample key"):
                writer.add(bad, png, caption)
        writer.add(key, png, caption)
        with pytest.raises(DuplicateKeyError, match="already written"):
            writer.add(key, png, caption)
        with pytest.raises(ValueError, match="neither PNG nor JPEG"):
            writer.add("other", b"GIF89a...", caption)
    assert _manifest(tmp_path / "out")["counts"]["train"] == 1
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        ShardWriter(tmp_path / "out")


def test_sanitize_key_gives_valid_unique_deterministic_keys():
    assert sanitize_key("COCO_val2014_0001.jpg") == "COCO_val2014_0001_jpg"
    assert sanitize_key("images/sub dir/1.png") == "images_sub_dir_1_png"
    assert sanitize_key("12345_7") == "12345_7"
    weird = ["__meta__", "", ".hidden", "é" * 3, "x" * 200, "y" * 200]
    keys = [sanitize_key(raw) for raw in weird]
    assert all(check_key(k) == k for k in keys)
    assert len(set(keys)) == len(keys) and keys == [sanitize_key(raw) for raw in weird]


def test_interrupted_writer_leaves_no_manifest_and_no_half_shard(pairs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, shard_size=4) as writer:
            for key, png, caption in pairs[:6]:
                writer.add(key, png, caption)
            raise RuntimeError("killed")
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.tar"]  # the complete one only
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileExistsError, match="interrupted run"):
        ShardWriter(out)

    # a failure while the shard is being stored (reading it back fails half-way) leaves nothing under its name
    import alignlab.data.writer as writer_module

    class FailingFile(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 0:
                raise OSError("disk full")
            return super().read(100)

    monkeypatch.setattr(writer_module.tempfile, "TemporaryFile", lambda **kwargs: FailingFile())
    with pytest.raises(OSError, match="disk full"):
        with ShardWriter(tmp_path / "out2", shard_size=2) as writer:
            for key, png, caption in pairs[:2]:
                writer.add(key, png, caption)
    assert list((tmp_path / "out2" / "train").iterdir()) == []


def test_writer_to_s3(pairs, tmp_path, s3_env):  # noqa: F811  (the fixture)
    bucket = s3_env.make_bucket("importtest")
    from alignlab import storage

    uri = f"s3://{bucket}/ds"
    with ShardWriter(uri, shard_size=2) as writer:
        for key, png, caption in pairs[:3]:
            writer.add(key, png, caption)
    assert storage.list_prefix(uri) == [f"{uri}/manifest.json", f"{uri}/train/shard-000000.tar",
                                        f"{uri}/train/shard-000001.tar"]
    manifest = json.loads(storage.read_bytes(f"{uri}/manifest.json"))
    for relpath, digest in manifest["files"].items():
        storage.read_bytes(f"{uri}/{relpath}", expected_sha256=digest)
    local = tmp_path / "copy" / "train"
    for relpath in manifest["files"]:
        storage.download_file(f"{uri}/{relpath}", tmp_path / "copy" / relpath)
    assert [WebDatasetIndex(local)[i]["txt"] for i in range(3)] == [c for _, _, c in pairs[:3]]


# ---- checks ---------------------------------------------------------------------------------------------------

def test_check_image_keeps_png_and_jpeg_bytes_and_reencodes_others(pairs):
    png = pairs[0][1]
    assert importers.check_image(png)[0] is png
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png)).save(jpeg, format="JPEG")
    assert importers.check_image(jpeg.getvalue())[:2] == (jpeg.getvalue(), "JPEG")
    bmp = io.BytesIO()
    Image.open(io.BytesIO(png)).save(bmp, format="BMP")
    data, image_format, _ = importers.check_image(bmp.getvalue())
    assert image_format == "BMP" and data[:4] == b"\x89PNG"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(Image.open(io.BytesIO(png))))
    for broken in (NOT_AN_IMAGE, _truncated(png), b""):
        assert importers.check_image(broken)[0] is None


def test_check_caption():
    assert importers.check_caption("  a dog  ") == ("a dog", None)
    assert importers.check_caption("é".encode()) == ("é", None)
    assert importers.check_caption(NON_UTF8)[1][0] == "non_utf8_caption"
    assert importers.check_caption("bad \udce9")[1][0] == "non_utf8_caption"
    for empty in (None, "", " \t\n", b"  "):
        assert importers.check_caption(empty)[1][0] == "empty_caption"


# ---- sources ---------------------------------------------------------------------------------------------------

def _write_images(folder: Path, pairs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, png, _ in pairs:
        (folder / f"{key}.png").write_bytes(png)


def test_import_tsv(pairs, tmp_path):
    good = pairs[:8]
    _write_images(tmp_path / "images", good)
    (tmp_path / "images/broken.png").write_bytes(NOT_AN_IMAGE)
    (tmp_path / "images/truncated.png").write_bytes(_truncated(pairs[8][1]))
    (tmp_path / "images/9.png").write_bytes(pairs[9][1])
    (tmp_path / "images/10.png").write_bytes(pairs[10][1])
    rows = [b"image\tcaption"] + [f"images/{k}.png\t{c}".encode() for k, _, c in good]
    rows += [b"images/missing.png\ta caption", b"images/broken.png\ta caption", b"images/truncated.png\ta caption",
             b"images/9.png\t   ", b"images/10.png\t" + NON_UTF8, f"images/{good[0][0]}.png\tagain".encode(),
             b"only one column", b"https://example.com/x.jpg\ta caption"]
    (tmp_path / "pairs.tsv").write_bytes(b"\r\n".join(rows) + b"\r\n")
    out = tmp_path / "out"
    assert cli_main(["data", "import", "tsv", str(tmp_path / "pairs.tsv"), "--out", str(out), "--shard-size", "3"]) == 0
    manifest = _manifest(out)
    _check_accounting(manifest, Counter(missing_file=2, undecodable_image=2, empty_caption=1, non_utf8_caption=1,
                                        duplicate_key=1, malformed_record=1), items_read=len(rows) - 1)
    assert _skipped(manifest, "duplicate_key") == ["pairs.tsv: line 15"]
    assert _skipped(manifest, "non_utf8_caption") == ["pairs.tsv: line 14"]
    _check_files(out, manifest)
    written = _read_output(out)
    assert {k: v[:2] for k, v in written.items()} == {f"images_{k}": (png, c) for k, png, c in good}


def test_import_coco_annotations(pairs, tmp_path):
    good = pairs[:6]
    _write_images(tmp_path / "imgs", good + [pairs[6]])
    (tmp_path / "imgs/broken.png").write_bytes(NOT_AN_IMAGE)
    images = [{"id": 100 + i, "file_name": f"{k}.png"} for i, (k, _, _) in enumerate(good)]
    images += [{"id": 200, "file_name": "missing.png"}, {"id": 201, "file_name": "broken.png"},
               {"id": 202, "file_name": f"{pairs[6][0]}.png"}, {"id": 203}]
    annotations = [{"id": 2 * i + j, "image_id": 100 + i, "caption": f"{c} (caption {j})" if j else c}
                   for i, (_, _, c) in enumerate(good) for j in range(2)]
    annotations += [{"id": 50, "image_id": 200, "caption": "x"}, {"id": 51, "image_id": 201, "caption": "x"},
                    {"id": 52, "image_id": 100, "caption": " "}, {"id": 53, "image_id": 101, "caption": "bad \udce9"},
                    {"id": 0, "image_id": 100, "caption": "same annotation id again"},
                    {"id": 54, "image_id": 999, "caption": "no such image"}]
    # image 202 has no caption at all
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    out = tmp_path / "out"
    code = cli_main(["data", "import", "coco", "--annotations", str(tmp_path / "captions.json"),
                     "--image-root", str(tmp_path / "imgs"), "--out", str(out)])
    assert code == 0
    manifest = _manifest(out)
    _check_accounting(manifest, Counter(missing_file=1, undecodable_image=1, empty_caption=2, non_utf8_caption=1,
                                        duplicate_key=1, malformed_record=2), items_read=12 + 6 + 1 + 1)
    assert manifest["pairing"] == "one sample per (image, caption)"
    written = _read_output(out)
    expected = {f"{100 + i}_{2 * i + j}": (png, f"{c} (caption {j})" if j else c)
                for i, (_, png, c) in enumerate(good) for j in range(2)}
    assert {k: v[:2] for k, v in written.items()} == expected
    assert written["101_3"][2]["image_id"] == 101 and written["101_3"][2]["caption_id"] == 3


def test_import_coco_karpathy_split(pairs, tmp_path):
    _write_images(tmp_path / "coco/train2014", pairs[:4])
    _write_images(tmp_path / "coco/val2014", pairs[4:8])
    splits = ["train", "restval", "val", "test", "train", "restval", "val", "test"]
    entries = [{"filepath": "train2014" if i < 4 else "val2014", "filename": f"{k}.png", "cocoid": 10 + i,
                "split": splits[i], "sentences": [{"raw": c, "sentid": 100 + i}, {"raw": c.upper(), "sentid": 200 + i}]}
               for i, (k, _, c) in enumerate(pairs[:8])]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    out = tmp_path / "out"
    assert cli_main(["data", "import", "coco", "--karpathy", str(tmp_path / "dataset_coco.json"), "--image-root",
                     str(tmp_path / "coco"), "--out", str(out)]) == 0
    manifest = _manifest(out)
    assert manifest["source"]["images_excluded_by_split"] == {"test": 2, "val": 2}
    assert manifest["skipped"] == []
    chosen = [i for i, s in enumerate(splits) if s in ("train", "restval")]
    expected = {}
    for i in chosen:
        _, png, c = pairs[i]
        expected |= {f"{10 + i}_{100 + i}": (png, c), f"{10 + i}_{200 + i}": (png, c.upper())}
    assert {k: v[:2] for k, v in _read_output(out).items()} == expected

    # with --annotations, the captions come from the COCO file (matched on cocoid); the split still decides
    coco = {"images": [{"id": 10 + i, "file_name": f"{k}.png"} for i, (k, _, _) in enumerate(pairs[:7])],
            "annotations": [{"id": 500 + i, "image_id": 10 + i, "caption": f"coco caption {i}"} for i in range(7)]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "out2"
    assert cli_main(["data", "import", "coco", "--karpathy", str(tmp_path / "dataset_coco.json"), "--annotations",
                     str(tmp_path / "captions.json"), "--split", "train", "--image-root", str(tmp_path / "coco"),
                     "--out", str(out)]) == 0
    manifest = _manifest(out)
    assert manifest["source"]["images_excluded_by_split"] == {"restval": 2, "test": 2, "val": 2}
    assert manifest["skipped_counts"] == {}
    assert {k: v[:2] for k, v in _read_output(out).items()} == {
        f"{10 + i}_{500 + i}": (pairs[i][1], f"coco caption {i}") for i in (0, 4)}


def _tar(path: Path, members: list[tuple[str, bytes]], truncate: bool = False) -> None:
    data = tar_archive([tar_member(name, content) for name, content in members])
    path.write_bytes(data[:700] if truncate else data)


def test_import_webdataset_reshards_and_validates(pairs, tmp_path):
    shards = tmp_path / "src"
    shards.mkdir()
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(pairs[5][1])).save(jpeg, format="JPEG", quality=90)

    def sample(key, png, caption, meta=None):
        return [(f"{key}.png", png), (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps(meta or {"sample_id": key, "url": f"http://x/{key}"}).encode())]

    first = [m for k, png, c in pairs[:4] for m in sample(k, png, c)]
    first += [("jpgsample.jpg", jpeg.getvalue()), ("jpgsample.txt", b"a jpeg pair")]
    first += [("noimage.txt", b"caption without image"), ("nocaption.png", pairs[6][1])]
    first += [("broken.png", _truncated(pairs[7][1])), ("broken.txt", b"a caption")]
    second = [("empty.png", pairs[8][1]), ("empty.txt", b" "), ("latin.png", pairs[9][1]), ("latin.txt", NON_UTF8)]
    second += sample(pairs[0][0], pairs[0][1], "duplicate key in another shard")
    second += [("badjson.png", pairs[10][1]), ("badjson.txt", b"ok"), ("badjson.json", b"{not json")]
    second += [(f"{k}.png", png) for k, png, _ in pairs[4:5]] + [(f"{pairs[4][0]}.txt", pairs[4][2].encode())]
    _tar(shards / "part-000.tar", first)
    _tar(shards / "part-001.tar", second)
    _tar(shards / "part-002.tar", sample("lost", pairs[11][1], "x") * 3, truncate=True)
    out = tmp_path / "out"
    assert cli_main(["data", "import", "webdataset", str(shards), "--out", str(out), "--shard-size", "2"]) == 0
    manifest = _manifest(out)
    skips = Counter(missing_file=1, undecodable_image=1, empty_caption=2, non_utf8_caption=1, duplicate_key=1,
                    malformed_record=1, truncated_shard=2)
    _check_accounting(manifest, skips, items_read=8 + 5 + 2)
    assert _skipped(manifest, "truncated_shard") == [f"{shards / 'part-002.tar'}", f"{shards / 'part-002.tar'}: lost"]
    written = _read_output(out)
    expected = {k: (png, c) for k, png, c in pairs[:5]} | {"jpgsample": (jpeg.getvalue(), "a jpeg pair")}
    assert {k: v[:2] for k, v in written.items()} == expected
    assert written[pairs[0][0]][2]["url"] == f"http://x/{pairs[0][0]}"  # source metadata kept
    assert written[pairs[0][0]][2]["source_shard"] == str(shards / "part-000.tar")


def test_import_jsonl_and_train_two_steps(pairs, tmp_path):
    good = pairs[:10]
    _write_images(tmp_path / "img", good + pairs[10:12])
    (tmp_path / "img/broken.png").write_bytes(NOT_AN_IMAGE)
    bmp = io.BytesIO()
    Image.open(io.BytesIO(pairs[12][1])).save(bmp, format="BMP")
    (tmp_path / "img/pic.bmp").write_bytes(bmp.getvalue())
    lines = [json.dumps({"id": k, "image": f"img/{k}.png", "text": c}).encode() for k, _, c in good]
    lines += [json.dumps({"id": "multi", "image": f"img/{pairs[10][0]}.png", "text": ["first", "second"]}).encode(),
              json.dumps({"id": "bmp", "image": "img/pic.bmp", "caption": "a bitmap"}).encode(),
              json.dumps({"id": "gone", "image": "img/missing.png", "text": "x"}).encode(),
              json.dumps({"id": "broken", "image": "img/broken.png", "text": "x"}).encode(),
              json.dumps({"id": "blank", "image": f"img/{pairs[11][0]}.png", "text": ""}).encode(),
              b'{"id": "latin", "image": "img/' + pairs[11][0].encode() + b'.png", "text": "' + NON_UTF8 + b'"}',
              json.dumps({"id": good[0][0], "image": f"img/{good[1][0]}.png", "text": "same id"}).encode(),
              b'{"id": "cut", "image": ',
              json.dumps({"id": "tok", "image": f"img/{good[0][0]}.png", "tokens": [1, 2, 3]}).encode(),
              b"", b"  "]
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert cli_main(["data", "import", "jsonl", str(tmp_path / "train.jsonl"), "--out", str(out)]) == 0
    manifest = _manifest(out)
    _check_accounting(manifest, Counter(missing_file=1, undecodable_image=1, empty_caption=2, non_utf8_caption=1,
                                        duplicate_key=1, malformed_record=1), items_read=10 + 2 + 1 + 7)
    assert manifest["reencoded"] == {"BMP": 1}
    written = _read_output(out)
    expected = {k: (png, c) for k, png, c in good}
    expected |= {"multi_0": (pairs[10][1], "first"), "multi_1": (pairs[10][1], "second")}
    assert {k: v[:2] for k, v in written.items() if k != "bmp"} == expected
    bmp_png, caption, meta = written["bmp"]
    assert caption == "a bitmap" and meta["reencoded_from"] == "BMP"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(bmp_png))), np.asarray(Image.open(io.BytesIO(pairs[12][1]))))

    # the imported dataset trains as it is: data.format=webdataset, data.train=train
    tree = tiny_config_tree(out, tmp_path / "runs", max_steps=2, batch_size=4)
    tree["data"] |= {"format": "webdataset", "train": "train"}
    result = train(validate_config(tree), tmp_path / "run")
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in result.history)


def test_import_errors_are_clear(tmp_path, capsys):
    assert cli_main(["data", "import", "tsv", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "o")]) == 2
    assert "TSV file" in capsys.readouterr().err
    assert cli_main(["data", "import", "coco", "--out", str(tmp_path / "o")]) == 2
    assert "--annotations" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"images": []}))
    assert cli_main(["data", "import", "coco", "--annotations", str(tmp_path / "c.json"), "--out",
                     str(tmp_path / "o")]) == 2
    assert "'annotations'" in capsys.readouterr().err
    (tmp_path / "bad.tsv").write_bytes(b"img/a.png\tcap\n")
    assert cli_main(["data", "import", "tsv", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "no pair was written" in captured.err and "skipped: missing_file" in captured.out
