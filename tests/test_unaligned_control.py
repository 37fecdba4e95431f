"""The thesis' unaligned control (Table 10): two unrelated towers, compared raw (identity projections) and
never trained (`train.epochs: 0`), retrieve at chance on SynthCaps, and the arm of the shipped
`ablations/thesis_shre_mlp.yaml` runs through `alignlab run` on kfp's local runner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from alignlab.cli import main
from alignlab.config import ConfigError, validate_config
from alignlab.experiment import run_experiment
from alignlab.training.checkpoint import load_checkpoint
from conftest import SMALL_SYNTH, tiny_config_tree

REPO = Path(__file__).resolve().parents[1]
VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
EVAL = {"enabled": True, "batch_size": 64, "zeroshot_tasks": ["shape"], "linear_probe_task": None, "shifts": [],
        "histogram": False}


def _chance_avg_r(images: int, captions_per_image: int) -> float:
    """Avg R of a random ranking: T->I R@K = K/N; I->T R@K = P(one of the image's captions in the top K)."""
    captions = images * captions_per_image
    recalls = [100.0 * k / images for k in (1, 5, 10)]
    for k in (1, 5, 10):
        miss = 1.0
        for i in range(k):
            miss *= (captions - captions_per_image - i) / (captions - i)
        recalls.append(100.0 * (1.0 - miss))
    return sum(recalls) / 6


def test_untrained_unrelated_towers_retrieve_at_chance(synth_root, tmp_path):
    torch.manual_seed(0)
    tower = timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT).state_dict()
    torch.save(tower, tmp_path / "tower.pth")
    tree = tiny_config_tree(synth_root, tmp_path, epochs=0)
    tree["model"] |= {"projection": "identity"}
    tree["model"]["image"]["pretrained"] = str(tmp_path / "tower.pth")
    tree["model"]["text"] = {"width": 48, "layers": 1, "heads": 2, "pool": "first", "causal": False}
    results = run_experiment(validate_config(tree | {"eval": EVAL}), tmp_path / "run")

    final = load_checkpoint(tmp_path / "run" / "final.pt")
    assert final["step"] == 0 and (tmp_path / "run" / "metrics.jsonl").read_text() == ""
    for name, tensor in tower.items():  # the image tower as loaded, untouched
        assert torch.equal(final["model"][f"image_tower.model.{name}"], tensor), name
    assert not any(key.startswith(("image_proj", "text_proj")) for key in final["model"])
    images = results["retrieval/num_images"]
    chance = _chance_avg_r(int(images), int(results["retrieval/num_captions"] // images))
    assert results["retrieval/avg_R"] < 2 * chance  # 40 test images: one random draw is noisy
    random_amr = (images + 1) / 2
    for direction in ("image_to_text", "text_to_image"):
        assert 0.6 * random_amr < results[f"retrieval/{direction}_amr"] < 1.4 * random_amr


def test_control_settings_are_named(synth_root, tmp_path):
    tree = tiny_config_tree(synth_root, tmp_path, epochs=0, max_steps=3)
    with pytest.raises(ConfigError, match="train: .*epochs=0 .* max_steps=3"):
        validate_config(tree)
    tree = tiny_config_tree(synth_root, tmp_path, epochs=0)
    tree["model"] |= {"projection": "identity"}
    with pytest.raises(ValueError, match="model.projection=identity .* widths differ \\(image 48, text 32\\)"):
        run_experiment(validate_config(tree), tmp_path / "run")
    tree["model"]["student"] = {"shared": "mlp", "out_dim": 8}
    with pytest.raises(ConfigError, match="projection=identity applies to the dual encoder"):
        validate_config(tree)


def test_the_control_arm_of_thesis_shre_mlp_runs_through_the_spec_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((REPO / "ablations" / "thesis_shre_mlp.yaml").read_text())
    base = tiny_config_tree(tmp_path / "data", tmp_path / "runs", epochs=1)
    base["data"]["synth"] = dict(SMALL_SYNTH, num_train=64)
    vit = dict(VIT, depth=2, embed_dim=32)
    base["model"]["image"] = {"name": "vit_tiny_patch16_224", "kwargs": vit, "blocks": 1,
                              "pretrained": "teachers/thesis-vit/backbone.pth"}
    base["model"]["text"] = {"width": 32, "layers": 1, "heads": 2, "pool": "first", "causal": False}
    base["model"]["student"] = {"shared": "block", "out_dim": 32, "heads": 2}
    base["distill"] = {"teacher": "teachers/thesis-vit", "knowledge": {"kind": "ssmke"}}
    base["eval"] = dict(EVAL, zeroshot_tasks=["shape_color"])  # a report metric of the spec
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    teacher_synth, teacher_train = shipped["prepare"]
    teacher_synth["synth"]["config"] = dict(SMALL_SYNTH, seed=1, num_train=64)
    teacher_train["teacher_train"]["config"].update(kwargs=vit, epochs=1, batch_size=32)
    spec = shipped | {"base": "base.yaml", "seeds": [0], "overrides": {},
                      "arms": {"unaligned-control": shipped["arms"]["unaligned-control"]}}
    spec["paper"] = dict(spec["paper"], claims=[], rows={"unaligned-control": spec["paper"]["rows"]["unaligned-control"]})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    assert main(["run", "spec.yaml"]) == 0
    run_dir = tmp_path / "runs" / "thesis_shre_mlp" / "unaligned-control" / "seed-0"
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["train"]["epochs"] == 0 and stored["model"]["projection"] == "identity"
    assert stored["model"]["student"] is None and stored["model"]["image"]["blocks"] is None
    teacher_tower = torch.load(tmp_path / "teachers" / "thesis-vit" / "backbone.pth", weights_only=True)
    final = load_checkpoint(run_dir / "final.pt")["model"]
    assert all(torch.equal(final[f"image_tower.model.{k}"], v) for k, v in teacher_tower.items())  # all 2 blocks
    results = json.loads((run_dir / "results.json").read_text())
    rows = list(csv.DictReader((tmp_path / "runs" / "thesis_shre_mlp" / "report.csv").open()))
    assert {(r["arm"], r["n"]) for r in rows if r["metric"] == "retrieval/avg_R"} == {("unaligned-control", "1")}
    images = results["retrieval/num_images"]
    chance = _chance_avg_r(int(images), int(results["retrieval/num_captions"] // images))
    assert results["retrieval/avg_R"] < 2 * chance
    assert "unaligned-control" in capsys.readouterr().out
