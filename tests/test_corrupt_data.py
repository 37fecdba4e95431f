"""Corrupt training data (issue "Nothing lost, nothing silently wrong"): every kind of bad sample is skipped,
counted and named, the clean samples keep their order, and too many stop the run with one clear line.

One dataset is planted with 227 corrupt samples of 12 kinds among 220 clean ones over 5 shards, three of
which end early (cut inside a member, cut between two members of a sample, cut between two samples). Its
reference twin holds, in the same shards and order, only what the index keeps: the clean samples and those
whose corruption only shows when read. Training on the two must see the same samples in every batch row.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from alignlab.cli import main as cli_main
from alignlab.config import validate_config
from alignlab.data import importers
from alignlab.data.dataset import ResumableBatchSampler, loader_for_sampler
from alignlab.data.shards import WebDatasetIndex, iter_webdataset
from alignlab.data.skips import CorruptSampleError, SkipLog, TooManyCorruptSamples
from alignlab.data.writer import tar_archive, tar_member
from alignlab.experiment import run_experiment
from alignlab.training import builders
from alignlab.training.trainer import train
from conftest import tiny_config_tree

NUM_SHARDS, BATCH = 5, 32
LOST_TAIL = 5  # clean samples after each cut: physically gone, so neither indexed nor counted as skipped


def _png(rng: np.random.Generator) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


# kind -> (how many, reason recorded, found by the header scan?, members(key, png, caption, rng))
PLANTED = {
    "no image": (20, "missing_image", True, lambda k, p, c, r: [(f"{k}.txt", c), (f"{k}.json", b"{}")]),
    "no caption": (20, "missing_caption", True, lambda k, p, c, r: [(f"{k}.png", p), (f"{k}.json", b"{}")]),
    "image as .gif": (10, "wrong_extension", True, lambda k, p, c, r: [(f"{k}.gif", p), (f"{k}.txt", c)]),
    "caption as .caption": (10, "wrong_extension", True, lambda k, p, c, r: [(f"{k}.png", p), (f"{k}.caption", c)]),
    "zero-byte image": (25, "empty_image", True, lambda k, p, c, r: [(f"{k}.png", b""), (f"{k}.txt", c)]),
    "zero-byte caption": (15, "empty_caption", True, lambda k, p, c, r: [(f"{k}.png", p), (f"{k}.txt", b"")]),
    "20 KB caption": (20, "caption_too_long", True, lambda k, p, c, r: [(f"{k}.png", p), (f"{k}.txt", b"word " * 4000)]),
    "two .txt": (5, "duplicate_member", True, lambda k, p, c, r: [(f"{k}.png", p), (f"{k}.txt", c), (f"{k}.txt", c)]),
    "garbage image": (25, "undecodable_image", False, lambda k, p, c, r: [(f"{k}.png", r.bytes(300)), (f"{k}.txt", c)]),
    "truncated PNG": (25, "undecodable_image", False, lambda k, p, c, r: [(f"{k}.png", p[:len(p) // 2]), (f"{k}.txt", c)]),
    "Latin-1 caption": (25, "non_utf8_caption", False, lambda k, p, c, r: [(f"{k}.png", p), (f"{k}.txt", b"caf\xe9 au lait")]),
    "whitespace caption": (15, "empty_caption", False, lambda k, p, c, r: [(f"{k}.png", p), (f"{k}.txt", b" \n\t ")]),
    "bad .json": (10, "malformed_metadata", False, lambda k, p, c, r: [(f"{k}.png", p), (f"{k}.txt", c),
                                                                       (f"{k}.json", b"{not json")]),
}
NUM_CLEAN = 220  # kept: with the 100 read-time corrupt ones the index holds 320 = 10 batches of 32


def _clean(key: str, png: bytes, caption: bytes) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png), (f"{key}.txt", caption), (f"{key}.json", json.dumps({"sample_id": key}).encode())]


def _write(path: Path, samples: list[list[tuple[str, bytes]]]) -> bytes:
    data = tar_archive([tar_member(name, content) for members in samples for name, content in members])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _offset_of(samples: list[list[tuple[str, bytes]]], upto: int, member: int = 0) -> int:
    """Byte offset of member `member` of sample `upto` in the archive of `samples`."""
    before = [m for s in samples[:upto] for m in s] + samples[upto][:member]
    return sum(len(tar_member(name, content)) for name, content in before)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """corrupt/train and reference/train (see the module docstring), plus what was planted where."""
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("corrupt")
    entries = [("clean", f"c{n:04d}") for n in range(NUM_CLEAN)]
    entries += [(kind, f"{kind.split()[0][:4]}{n:03d}x{i}") for i, (kind, (count, *_)) in enumerate(PLANTED.items())
                for n in range(count)]
    entries = [entries[i] for i in rng.permutation(len(entries))]
    shards = [entries[s::NUM_SHARDS] for s in range(NUM_SHARDS)]
    last_clean = max(i for i, (kind, _) in enumerate(shards[4]) if kind == "clean")
    shards[4].append(shards[4].pop(last_clean))  # the sample a cut between samples ends on is complete
    expected, header_keys, load_bad, cuts = [], set(), set(), {}
    for s, shard in enumerate(shards):
        name = f"shard-{s:06d}.tar"
        written, kept = [], []
        for kind, key in shard:
            png, caption = _png(rng), f"a picture numbered {key}".encode()
            if kind == "clean":
                members = _clean(key, png, caption)
            else:
                count, reason, by_header, build = PLANTED[kind]
                members = build(key, png, caption, rng)
                expected.append((name, key, reason))
                (header_keys if by_header else load_bad).add(key)
            written.append(members)
            if kind == "clean" or key in load_bad:
                kept.append(members)
        _write(root / "reference" / "train" / name, kept)
        if s >= 2:  # three shards end early, each followed by a lost tail of clean samples
            victim = [] if s == 4 else [_clean(f"victim{s}", _png(rng), b"a caption")]
            tail = [_clean(f"lost{s}-{n}", _png(rng), b"a caption") for n in range(LOST_TAIL)]
            full = written + victim + tail
            cut = {2: _offset_of(full, len(written), 0) + 512 + 40,  # inside the victim's .png body
                   3: _offset_of(full, len(written), 1),  # between the victim's .png and .txt
                   4: _offset_of(full, len(written), 0)}[s]  # between two samples
            data = tar_archive([tar_member(n, c) for m in full for n, c in m])
            (root / "corrupt" / "train" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "corrupt" / "train" / name).write_bytes(data[:cut])
            if victim:
                expected.append((name, f"victim{s}", "truncated_shard"))
            cuts[name] = (cut, sum(1 for m in written if m in kept), kept and kept[-1][0][0].split(".")[0])
        else:
            _write(root / "corrupt" / "train" / name, written)
    return {"root": root, "expected": expected, "header_keys": header_keys, "load_bad": load_bad, "cuts": cuts}


def _records(records: list[dict]) -> set[tuple[str, str, str]]:
    return {(Path(r["shard"]).name, r["key"], r["reason"]) for r in records}


def test_index_leaves_out_what_headers_show_and_reads_fail_for_the_rest(planted):
    index = WebDatasetIndex(planted["root"] / "corrupt" / "train")
    reference = WebDatasetIndex(planted["root"] / "reference" / "train")
    expected = set(planted["expected"])
    header_expected = {r for r in expected if r[1] in planted["header_keys"] or r[2] == "truncated_shard"}
    assert len(index) == len(reference) == NUM_CLEAN + len(planted["load_bad"]) == 10 * BATCH
    assert list(index._keys) == list(reference._keys)  # same samples at the same positions
    assert _records(index.skipped) == header_expected and len(index.skipped) == len(header_expected) == 127
    cuts = {Path(t["shard"]).name: (t["at_byte"], t["samples_kept"], t["last_kept"]) for t in index.truncated_shards}
    assert cuts == planted["cuts"]
    details = {Path(t["shard"]).name: t["detail"] for t in index.truncated_shards}
    assert "inside member 'victim2.png'" in details["shard-000002.tar"]
    assert "between two members, without the end-of-archive marker" in details["shard-000003.tar"]
    assert "between two members" in details["shard-000004.tar"]

    # What only the bytes show fails when read, naming the sample and the reason planted.
    load_expected = {r for r in expected if r[1] in planted["load_bad"]}
    failures = set()
    for i in range(len(index)):
        try:
            index.get(i)
        except CorruptSampleError as err:
            failures.add((Path(err.record["shard"]).name, err.record["key"], err.record["reason"]))
    assert failures == load_expected and len(failures) == 100

    # Streaming reads the same shards with the same grouper and checks (images are not decoded there).
    skipped = []
    streamed = list(iter_webdataset([str(p) for p in index.shard_paths], skipped=skipped))
    caption_and_json = {r for r in load_expected if r[2] != "undecodable_image"}
    assert _records(skipped) == header_expected | caption_and_json
    assert [s["__key__"] for s in streamed] == [k.decode() for k in index._keys if k.decode() not in
                                                {key for _, key, _ in caption_and_json}]


def _dataset(root: Path, tmp_path: Path):
    cfg = validate_config(tiny_config_tree(root, tmp_path))
    tokenizer = builders.tokenizer_from_config(cfg.model, cfg.data, root)
    transform, _ = builders.transforms_from_config(cfg.data)
    return builders.train_dataset_from_config(cfg.data, root, tokenizer, transform)


def test_loader_keeps_every_clean_sample_in_its_row_and_substitutes_read_failures(planted, tmp_path):
    corrupt, reference = _dataset(planted["root"] / "corrupt", tmp_path), _dataset(planted["root"] / "reference", tmp_path)
    corrupt.skip_log = SkipLog(tmp_path / "skips")
    keys = [k.decode() for k in corrupt.source._keys]
    sampler = ResumableBatchSampler(len(corrupt), BATCH, seed=3)
    sampler.set_epoch(1)
    planned = [[index for index, _ in batch] for batch in sampler]
    got = [b[2].tolist() for b in loader_for_sampler(corrupt, sampler, num_workers=2)]  # workers: subprocesses
    want = [b[2].tolist() for b in loader_for_sampler(reference, sampler, num_workers=0)]
    assert got == want  # the same sample in every row as the data without the header-corrupt samples
    substituted = 0
    for rows, planned_rows in zip(got, planned):
        assert len(rows) == BATCH  # fixed size
        for row, planned_index in zip(rows, planned_rows):
            if keys[planned_index] in planted["load_bad"]:  # substituted by a readable sample from another batch
                assert keys[row] not in planted["load_bad"] and row not in planned_rows
                substituted += 1
            else:
                assert row == planned_index  # a clean sample never moves
    assert substituted == 100  # one epoch visits every read-time corrupt sample once
    # Two ranks substitute alone, yet their rows put together are the 1-rank batch (no rank waits for another).
    halves = []
    for rank in (0, 1):
        rank_sampler = ResumableBatchSampler(len(corrupt), BATCH, seed=3, rank=rank, world_size=2)
        rank_sampler.set_epoch(1)
        halves.append([b[2].tolist() for b in loader_for_sampler(corrupt, rank_sampler)])
    assert [first + second for first, second in zip(*halves)] == got
    # The order of the clean samples is the epoch order without the corrupt positions.
    clean_order = [i for batch in planned for i in batch if keys[i] not in planted["load_bad"]]
    assert [r for rows, p in zip(got, planned) for r, i in zip(rows, p) if keys[i] not in planted["load_bad"]] == clean_order
    # Records written by the worker processes are all there, once each.
    load_expected = {r for r in planted["expected"] if r[1] in planted["load_bad"]}
    assert _records(corrupt.skip_log.read()) == load_expected


def _tree(root: Path, out: Path, **data) -> dict:
    tree = tiny_config_tree(root, out, checkpoint_every=4)
    tree["data"].update(data)
    return tree


def test_training_on_corrupt_shards_reports_every_skip_and_trains_like_clean_data(planted, tmp_path):
    tree = _tree(planted["root"] / "corrupt", tmp_path, max_skip_fraction=0.6, num_workers=2)
    tree["tracking"] = {"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "corrupt"}
    run_dir = tmp_path / "run"
    metrics = run_experiment(validate_config(tree), run_dir)
    report = json.loads((run_dir / "skips.json").read_text())
    expected = planted["expected"]
    assert report["counts"] == dict(sorted(Counter(reason for _, _, reason in expected).items()))
    assert report["counts"] == {"caption_too_long": 20, "duplicate_member": 5, "empty_caption": 30, "empty_image": 25,
                                "malformed_metadata": 10, "missing_caption": 20, "missing_image": 20,
                                "non_utf8_caption": 25, "truncated_shard": 2, "undecodable_image": 50,
                                "wrong_extension": 20}
    assert report["skipped"] == len(expected) == 227 and report["samples_found"] == 320 + 127
    assert _records(report["samples"]) == set(expected)
    assert {Path(t["shard"]).name for t in report["truncated_shards"]} == set(planted["cuts"])
    assert metrics["data_skipped"] == 227

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tree["tracking"]["tracking_uri"])
    run = client.get_run((run_dir / "mlflow_run_id.txt").read_text())
    assert run.data.metrics["data/skipped/undecodable_image"] == 50 and run.data.metrics["data/skipped/empty_caption"] == 30
    assert "skips.json" in [a.path for a in client.list_artifacts(run.info.run_id)]

    reference = train(validate_config(_tree(planted["root"] / "reference", tmp_path, max_skip_fraction=0.6)),
                      tmp_path / "reference")
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == reference.steps == 10
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference.history], rel=1e-6)


def test_too_many_corrupt_samples_stop_the_run_with_one_line(planted, tmp_path, capsys):
    root = planted["root"] / "corrupt"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_tree(root, tmp_path)))
    assert cli_main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2  # default max_skip_fraction 0.01
    # The whole message is the last line of stderr (log handlers other tests leave behind may write above it).
    error = capsys.readouterr().err.rstrip("\n").rsplit("\n", 1)[-1]
    assert error.startswith("alignlab: error: ") and error.endswith("or raise data.max_skip_fraction")
    assert (f"{root / 'train'}: 127 of 447 training samples are corrupt (28.41% > data.max_skip_fraction=0.01): "
            "caption_too_long 20, duplicate_member 5, empty_caption 15, empty_image 25, missing_caption 20, "
            "missing_image 20, truncated_shard 2, wrong_extension 20; first: ") in error
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the first step

    # Past the index, read-time corruption counts too: checked at each checkpoint.
    with pytest.raises(TooManyCorruptSamples, match=r"of 447 training samples are corrupt \(.*> data.max_skip_"
                                                    r"fraction=0.3\): .*non_utf8_caption \d+.*undecodable_image \d+"):
        train(validate_config(_tree(root, tmp_path, max_skip_fraction=0.3)), tmp_path / "run-load")
    assert json.loads((tmp_path / "run-load" / "skips.json").read_text())["skipped"] > 0.3 * 447


@pytest.mark.parametrize("cut_at, lost", [("between_members", "sample s0003 cut"), ("between_samples", "no sample cut")])
def test_import_reports_a_shard_cut_between_two_members(cut_at, lost, tmp_path):
    rng = np.random.default_rng(5)
    samples = [_clean(f"s{n:04d}", _png(rng), f"caption {n}".encode()) for n in range(6)]
    data = tar_archive([tar_member(n, c) for m in samples for n, c in m])
    cut = _offset_of(samples, 3, 1 if cut_at == "between_members" else 0)
    shard = tmp_path / "src" / "part-000.tar"
    shard.parent.mkdir()
    shard.write_bytes(data[:cut])
    candidates = list(importers.webdataset_candidates([str(shard)]))
    good = [c.key for c in candidates if c.problem is None]
    problems = [(c.item, *c.problem) for c in candidates if c.problem is not None]
    assert good == ["s0000", "s0001", "s0002"]
    shard_record = (str(shard), "truncated_shard", f"the data ends at byte {cut}, between two members, without the "
                    f"end-of-archive marker: 3 complete sample(s) read (last: s0002), {lost}, any later samples lost")
    if cut_at == "between_members":
        assert problems == [(f"{shard}: s0003", "truncated_shard", "the shard ends inside this sample (members read: .png)"),
                            shard_record]
    else:
        assert problems == [shard_record]
