"""`alignlab data filter` (SPEC 3.1): DiHT Table A.3 counts against a brute-force recount, the kept shards,
the removed examples, training on the output, text spotting and the CLIP-score stage."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from alignlab.cli import main as cli_main
from alignlab.config import validate_config
from alignlab.data.shards import WebDatasetIndex
from alignlab.data.text.semantic_parser import load_spacy_model, parse_captions
from alignlab.training.trainer import train
from conftest import tiny_config_tree

NOISY_SYNTH = dict(seed=11, num_train=100, shard_size=40, num_retrieval_test=2, num_retrieval_val=4,
                   captions_per_image=3, zeroshot_per_class_train=1, zeroshot_per_class_val=1,
                   zeroshot_per_class_test=1, shift_per_class=1, mismatch=0.1, uninformative=0.2, product=0.2,
                   text_in_image=0.2)


def _generate(root: Path, **fields) -> Path:
    from alignlab.data.synth import SynthCapsConfig, generate_synthcaps

    generate_synthcaps(root, SynthCapsConfig(**fields))
    return root


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("noisy") / "data", **NOISY_SYNTH)


def _samples(root: Path) -> list[dict]:
    index = WebDatasetIndex(root / "train")
    return [index[i] for i in range(len(index))]


def _first_failed_stage(graph, stages, min_complexity=1, min_actions=1):
    """Brute force: the first stage (in order) a caption fails, or None if it passes all."""
    for stage in stages:
        if stage == "complexity" and graph.complexity < min_complexity:
            return stage
        if stage == "action" and graph.num_actions < min_actions:
            return stage
    return None


def _expected_rows(verdicts: list, stages: tuple, labels: tuple) -> list[dict]:
    total, rows, left = len(verdicts), [], len(verdicts)
    rows.append({"filters": "none", "count": total, "percent": 100.0})
    for n, stage in enumerate(stages):
        left -= sum(v == stage for v in verdicts)
        rows.append({"filters": "+".join(labels[: n + 1]), "count": left, "percent": 100.0 * left / total})
    return rows


@pytest.fixture(scope="module")
def filtered(noisy, tmp_path_factory):
    """The noisy set filtered with complexity,action, and the brute-force verdict per sample."""
    out = tmp_path_factory.mktemp("filtered") / "out"
    code = cli_main(["data", "filter", "--data", str(noisy), "--out", str(out), "--stages", "complexity,action",
                     "--max-examples", "3", "--shard-size", "7"])
    assert code == 0
    samples = _samples(noisy)
    graphs = parse_captions([s["txt"] for s in samples], load_spacy_model())
    verdicts = [_first_failed_stage(g, ("complexity", "action")) for g in graphs]
    return out, samples, verdicts


def test_table_matches_a_brute_force_recount(filtered, capsys):
    out, samples, verdicts = filtered
    stats = json.loads((out / "filter_stats.json").read_text())
    expected = _expected_rows(verdicts, ("complexity", "action"), ("C1", "A"))
    assert stats["rows"] == expected  # same formula for %, so exact
    assert [r["filters"] for r in expected] == ["none", "C1", "C1+A"]
    # the noise knobs make every stage remove something, and something survives
    assert expected[0]["count"] > expected[1]["count"] > expected[2]["count"] > 0
    assert stats["removed_by"] == {"complexity": verdicts.count("complexity"), "action": verdicts.count("action")}
    assert stats["total"] == len(samples) and stats["kept"] == verdicts.count(None) == stats["written"]
    markdown = (out / "filter_stats.md").read_text()
    for row in expected:
        assert f"| {row['filters']} | {row['count']:,} | {row['percent']:.2f} |" in markdown


def test_kept_shards_hold_exactly_the_kept_pairs_unchanged(filtered, noisy):
    out, samples, verdicts = filtered
    kept = [s for s, v in zip(samples, verdicts) if v is None]
    written = _samples(out)
    assert [s["__key__"] for s in written] == [s["__key__"] for s in kept]
    for new, old in zip(written, kept):
        assert new["png"] == old["png"] and new["txt"] == old["txt"]
        assert {k: v for k, v in new["json"].items() if k != "source"} == old["json"]
    assert len(list((out / "train").glob("*.tar"))) == -(-len(kept) // 7)
    manifest = json.loads((out / "manifest.json").read_text())
    source_manifest = json.loads((noisy / "manifest.json").read_text())
    assert manifest["source"]["dataset_hash"] == source_manifest["dataset_hash"]
    assert manifest["filter"] == {"stages": ["complexity", "action"], "min_complexity": 1, "min_actions": 1}
    assert manifest["filter_stats"] == json.loads((out / "filter_stats.json").read_text())["rows"]
    assert manifest["counts"]["train"] == len(kept) and manifest["skipped"] == []


def test_removed_examples_name_the_stage_caption_and_image(filtered):
    out, samples, verdicts = filtered
    by_key = {s["__key__"]: (s, v) for s, v in zip(samples, verdicts)}
    rows = [json.loads(line) for line in (out / "removed_samples.jsonl").read_text().splitlines()]
    assert Counter(r["stage"] for r in rows) == {"complexity": 3, "action": 3}
    for row in rows:
        sample, verdict = by_key[row["sample_id"]]
        assert row["stage"] == verdict and row["caption"] == sample["txt"]
        assert row["image"] == f"removed/{verdict}/{row['sample_id']}.png"
        assert (out / row["image"]).read_bytes() == sample["png"]
    first_removed = [s["__key__"] for s, v in zip(samples, verdicts) if v == "complexity"][:3]
    assert [r["sample_id"] for r in rows if r["stage"] == "complexity"] == first_removed


def test_filtered_output_trains(filtered, tmp_path):
    out, _, verdicts = filtered
    tree = tiny_config_tree(out, tmp_path / "runs", max_steps=2, batch_size=4)
    result = train(validate_config(tree), tmp_path / "run")
    assert [h["step"] for h in result.history] == [1, 2] and all(np.isfinite(h["loss"]) for h in result.history)
    assert result.final_checkpoint is not None and Path(result.final_checkpoint).is_file()


def test_stage_order_and_thresholds_follow_the_options(noisy, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["data", "filter", "--data", str(noisy), "--out", str(out), "--stages", "action,complexity",
                     "--min-complexity", "2", "--max-examples", "0"]) == 0
    samples = _samples(noisy)
    graphs = parse_captions([s["txt"] for s in samples], load_spacy_model())
    verdicts = [_first_failed_stage(g, ("action", "complexity"), min_complexity=2) for g in graphs]
    stats = json.loads((out / "filter_stats.json").read_text())
    assert stats["rows"] == _expected_rows(verdicts, ("action", "complexity"), ("A", "C2"))
    assert (out / "removed_samples.jsonl").read_text() == "" and not (out / "removed").exists()


def test_coco_source_gives_one_pair_per_caption(noisy, tmp_path):
    out = tmp_path / "out"
    captions = noisy / "retrieval/val/captions.json"
    assert cli_main(["data", "filter", "--data", str(noisy), "--format", "coco", "--train",
                     "retrieval/val/captions.json", "--out", str(out), "--stages", "complexity"]) == 0
    coco = json.loads(captions.read_text())
    texts, keys, files = [], [], []
    for image in coco["images"]:
        mine = [a["caption"] for a in coco["annotations"] if a["image_id"] == image["id"]]
        texts += mine
        keys += [f"{image['id']}_{j}" for j in range(len(mine))]
        files += [noisy / "retrieval/val/images" / image["file_name"]] * len(mine)
    graphs = parse_captions(texts, load_spacy_model())
    kept = [(k, t, f) for k, t, f, g in zip(keys, texts, files, graphs) if g.complexity >= 1]
    stats = json.loads((out / "filter_stats.json").read_text())
    assert [r["count"] for r in stats["rows"]] == [len(texts), len(kept)]
    written = _samples(out)
    assert [(s["__key__"], s["txt"], s["png"]) for s in written] == [(k, t, f.read_bytes()) for k, t, f in kept]


def test_text_spotting_matches_direct_ocr(tmp_path):
    from alignlab.filtering.text_spotting import require_tesseract, spot_text, text_matches_caption

    try:
        require_tesseract()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"tesseract not available: {err}")
    root = _generate(tmp_path / "data", seed=2, num_train=8, shard_size=8, num_retrieval_test=1, num_retrieval_val=1,
                     zeroshot_per_class_train=1, zeroshot_per_class_val=1, zeroshot_per_class_test=1,
                     shift_per_class=1, text_in_image=0.6)
    out = tmp_path / "out"
    assert cli_main(["data", "filter", "--data", str(root), "--out", str(out), "--stages", "text_spotting"]) == 0
    samples = _samples(root)
    index = WebDatasetIndex(root / "train")
    spotted = [text_matches_caption(spot_text(index.get(i)[0]), s["txt"]) for i, s in enumerate(samples)]
    assert any(spotted) and not all(spotted)  # the set exercises both outcomes
    stats = json.loads((out / "filter_stats.json").read_text())
    assert [r["count"] for r in stats["rows"]] == [8, spotted.count(False)]
    assert [s["__key__"] for s in _samples(out)] == [s["__key__"] for s, hit in zip(samples, spotted) if not hit]
    removed = [json.loads(line) for line in (out / "removed_samples.jsonl").read_text().splitlines()]
    assert {r["sample_id"] for r in removed} == {s["__key__"] for s, hit in zip(samples, spotted) if hit}
    assert all((out / r["image"]).is_file() and r["stage"] == "text_spotting" for r in removed)


def test_clip_score_stage_loads_an_alignlab_checkpoint(filtered, noisy, tmp_path):
    import torch

    from alignlab.filtering.clip_score import clip_scores
    from alignlab.filtering.dataset import load_clip_scorer
    from alignlab.data.shards import WebDatasetIndex as Index

    out, _, _ = filtered
    tree = tiny_config_tree(out, tmp_path / "runs", max_steps=1, batch_size=4)
    checkpoint = train(validate_config(tree), tmp_path / "run").final_checkpoint
    model, tokenizer, transform = load_clip_scorer(Path(checkpoint), "cpu")
    index = Index(noisy / "train")
    images, texts = zip(*[index.get(i)[:2] for i in range(len(index))])
    with torch.no_grad():
        scores = clip_scores(model, tokenizer, transform, list(images), list(texts)).tolist()
    threshold = float(np.median(scores))
    result = tmp_path / "clip"
    assert cli_main(["data", "filter", "--data", str(noisy), "--out", str(result), "--stages", "clip_score",
                     "--clip-checkpoint", str(checkpoint), "--clip-threshold", repr(threshold),
                     "--device", "cpu"]) == 0
    stats = json.loads((result / "filter_stats.json").read_text())
    expected_kept = [index[i]["__key__"] for i, s in enumerate(scores) if s >= threshold]
    assert stats["labels"] == [f"CLIP>={threshold:g}"] and stats["kept"] == len(expected_kept)
    assert [s["__key__"] for s in _samples(result)] == expected_kept
    manifest = json.loads((result / "manifest.json").read_text())
    assert manifest["filter"]["clip_checkpoint"] == str(checkpoint)

    # DiHT sized its CLIP filter like CAT's: keep a fraction instead of a fixed cosine
    sized = tmp_path / "clip-30"
    assert cli_main(["data", "filter", "--data", str(noisy), "--out", str(sized), "--stages", "clip_score",
                     "--clip-checkpoint", str(checkpoint), "--clip-keep-fraction", "0.3", "--device", "cpu"]) == 0
    stats = json.loads((sized / "filter_stats.json").read_text())
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[: -(-3 * len(scores) // 10)]
    cut = min(scores[i] for i in top)
    assert stats["filter"]["clip_keep_fraction"] == 0.3 and stats["filter"]["clip_threshold"] == pytest.approx(cut)
    assert {s["__key__"] for s in _samples(sized)} == {index[i]["__key__"] for i, x in enumerate(scores)
                                                        if x >= cut - 1e-6}
    assert stats["kept"] >= len(top) and stats["kept"] <= len(top) + 2  # ties at the cut only


def test_bad_options_fail_clearly(noisy, tmp_path, capsys):
    base = ["data", "filter", "--data", str(noisy), "--out", str(tmp_path / "o")]
    assert cli_main(base + ["--stages", "complexity,colour"]) == 2
    assert "choose from" in capsys.readouterr().err
    assert cli_main(base + ["--stages", "clip_score"]) == 2
    assert "--clip-checkpoint" in capsys.readouterr().err
    assert cli_main(base + ["--stages", "complexity", "--clip-keep-fraction", "0.2"]) == 2
    assert "clip_keep_fraction" in capsys.readouterr().err
    assert cli_main(base + ["--stages", "clip_score", "--clip-keep-fraction", "1.5", "--clip-checkpoint", "x"]) == 2
    assert "clip" in capsys.readouterr().err
    assert cli_main(["data", "filter", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(base + ["--stages", "clip_score", "--clip-checkpoint", str(tmp_path / "x.pt")]) == 2
    assert "x.pt does not exist" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/manifest.json").write_text("{}")
    assert cli_main(["data", "filter", "--data", str(noisy), "--out", str(tmp_path / "taken"),
                     "--stages", "complexity"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
