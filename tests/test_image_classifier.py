"""The thesis' probe and fine-tune of a distilled image tower (Eq 42): mean of the patch tokens (CLS dropped)
-> LN -> Linear, layer-wise lr decay from timm, the encoder frozen in the probe, and both protocols run as
the evaluation of a unimodal image-distillation run."""

from __future__ import annotations

import pytest
import timm
import torch

from alignlab.config import validate_config
from alignlab.evaluate.image_classifier import PatchMeanClassifier
from alignlab.experiment import evaluate_checkpoint
from alignlab.task_config import ImageClassifierConfig
from alignlab.training.trainer import train
from conftest import TINY_VIT
from test_unimodal_kd import image_tree


def test_the_head_reads_the_mean_of_the_patch_tokens_and_lr_decays_by_layer():
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT)
    model = PatchMeanClassifier(encoder, 5).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = encoder.forward_features(images)
    assert torch.allclose(model(images), model.head(model.norm(tokens[:, 1:].mean(dim=1))))
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=0.01, layer_decay=0.81)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = len(encoder.blocks)  # layers: 0 = embeddings, 1..depth = blocks, depth + 1 = head and final norm
    assert scale[id(named["encoder.patch_embed.proj.weight"])] == 0.81 ** (depth + 1)
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.81 ** depth
    assert scale[id(named["encoder.blocks.3.mlp.fc2.weight"])] == 0.81
    assert scale[id(named["head.weight"])] == scale[id(named["norm.weight"])] == 1.0


def test_probe_and_finetune_evaluate_a_distilled_tower(synth_root, tmp_path, vit_teacher):
    tree = image_tree(synth_root, tmp_path, vit_teacher, max_steps=2)
    small = {"epochs": 2, "batch_size": 32, "lr": 1e-3, "task": "shape"}
    tree["eval"] = {"enabled": True, "batch_size": 64, "image_classifier": small | {"protocol": "probe"}}
    cfg = validate_config(tree)
    run = train(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in run.model.student.state_dict().items()}
    from alignlab.experiment import evaluate_trained_model

    probe = evaluate_trained_model(cfg, run.model, None, tmp_path / "eval")
    assert all(torch.equal(before[k], v) for k, v in run.model.student.state_dict().items())  # a copy is trained
    assert 0 <= probe["image_classifier/top1"] <= 100 and probe["image_classifier/best_epoch"] in (1.0, 2.0)
    assert probe["kd/val_loss"] > 0
    finetune_cfg = validate_config(tree | {"eval": tree["eval"] | {"image_classifier": small | {"protocol": "finetune"}}})
    finetune = evaluate_trained_model(finetune_cfg, run.model, None, tmp_path / "eval-ft")
    assert finetune["kd/val_loss"] == probe["kd/val_loss"]  # same tower, same val data
    assert finetune["image_classifier/top1"] != probe["image_classifier/top1"] or \
        finetune["image_classifier/val_top1"] != probe["image_classifier/val_top1"]
    # the checkpoint path rebuilds the run (teacher loaded again, not stored) and gives the same numbers
    again = evaluate_checkpoint(tmp_path / "run" / "final.pt", tmp_path / "eval-again")
    assert again == probe


def test_bad_classifier_settings_are_one_line_errors():
    from pydantic import ValidationError

    for field, value in (("layer_decay", 0.0), ("rand_augment", "m9"), ("crop_scale", [0.5, 0.1])):
        with pytest.raises(ValidationError, match=field):
            ImageClassifierConfig(**{field: value})


def _posterize_op(transform):
    return next(op for step in transform.transforms for op in getattr(step, "ops", [])
                if op.name == "PosterizeIncreasing")


def test_randaugment_posterize_at_magnitude_10_gives_a_black_image_instead_of_raising():
    """timm's default RandAugment (rand-m9-mstd0.5-inc1) reaches magnitude 10 on ~2 % of draws: 0 bits kept,
    which Pillow 13 refuses (it killed the first thesis fine-tune). The classifier's transform answers as Pillow
    < 13 did, an all-black image, and keeps every other bit count as timm's op does."""
    from PIL import Image
    from timm.data import create_transform

    from alignlab.evaluate.image_classifier import with_pillow_safe_posterize

    image = Image.new("RGB", (16, 16), (200, 120, 40))
    plain = _posterize_op(create_transform(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1"))
    safe = _posterize_op(with_pillow_safe_posterize(
        create_transform(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")))
    for op in (plain, safe):
        op.prob, op.magnitude_std = 1.0, 0.0
    plain.magnitude = safe.magnitude = 10
    with pytest.raises(ValueError, match="bits"):  # Pillow 13 (the pin) refuses 0 bits; older Pillow gave black
        plain(image)
    assert set(safe(image).getdata()) == {(0, 0, 0)}
    plain.magnitude = safe.magnitude = 5  # 2 bits kept: the same image from both
    assert list(safe(image).getdata()) == list(plain(image).getdata())
    assert set(safe(image).getdata()) == {(192, 64, 0)}  # 200, 120, 40 keep their top 2 bits


def test_one_seed_gives_one_result_whatever_pythons_and_numpys_generators_held(synth_root, tmp_path, vit_teacher,
                                                                               monkeypatch):
    """timm's random crops and RandAugment draw from Python's `random`, Mixup from numpy: the classifier seeds both
    (and gives their states back), so the images it trains on and its scores depend on its seed only."""
    import random

    import numpy as np

    from alignlab.evaluate import image_classifier
    from alignlab.experiment import evaluate_trained_model

    tree = image_tree(synth_root, tmp_path, vit_teacher, max_steps=1)
    tree["eval"] = {"enabled": True, "batch_size": 64,
                    "image_classifier": {"epochs": 1, "batch_size": 32, "task": "shape", "protocol": "finetune"}}
    cfg = validate_config(tree)
    run = train(cfg, tmp_path / "run")
    seen: list[list[float]] = []
    original = image_classifier._Folder.__getitem__

    def recording(self, index):
        image, label = original(self, index)
        seen[-1].append(float(image.sum()))  # every image the classifier trains and is scored on, in order
        return image, label

    monkeypatch.setattr(image_classifier._Folder, "__getitem__", recording)
    scores = []
    for state in (1, 2):
        random.seed(state)
        np.random.seed(state)
        seen.append([])
        scores.append(evaluate_trained_model(cfg, run.model, None, tmp_path / f"eval-{state}"))
        after = (random.random(), float(np.random.rand()))
        random.seed(state)
        np.random.seed(state)
        assert after == (random.random(), float(np.random.rand()))  # the caller's generators are given back
    assert seen[0] == seen[1] and len(seen[0]) > 0
    assert scores[0]["image_classifier/top1"] == scores[1]["image_classifier/top1"]
