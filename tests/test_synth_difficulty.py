"""SynthCaps difficulty settings (object_scale, max_objects) and the model-config fixes they need."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from alignlab.data.synth import SynthCapsConfig
from alignlab.data.synth.render import render_scene
from alignlab.data.synth.scene import RADIUS, object_radius, sample_scene, sample_single_object_scene


def _ink(image) -> int:
    """Pixels that are not gray (object colours are saturated; backgrounds are gray)."""
    a = np.asarray(image).astype(int)
    return int(((a.max(axis=2) - a.min(axis=2)) > 60).sum())


# sha256 of the first scenes drawn by the generator before the difficulty settings existed (computed with
# platform/alignlab/data/synth/scene.py at commit f9bc6cc): the defaults must keep every existing dataset.
SCENES_BEFORE_DIFFICULTY = "c092274274fdcf078809c8213d56ec946464fa29537a6f60894e2b7bdf69e6b8"


def test_default_difficulty_draws_the_scenes_of_earlier_versions():
    scenes = ([sample_scene(np.random.default_rng(i), object_scale=1.0, max_objects=3) for i in range(300)]
              + [sample_single_object_scene(np.random.default_rng(i), object_scale=1.0) for i in range(100)])
    digest = hashlib.sha256(json.dumps(scenes, sort_keys=True).encode()).hexdigest()
    assert digest == SCENES_BEFORE_DIFFICULTY


def test_object_scale_scales_radii_and_drawn_area():
    small, large = [], []
    for i in range(40):
        base = sample_single_object_scene(np.random.default_rng(i), shape="square", size="small")
        big = sample_single_object_scene(np.random.default_rng(i), shape="square", size="small", object_scale=1.4)
        assert object_radius(big["objects"][0]) == pytest.approx(1.4 * RADIUS["small"])
        small.append(_ink(render_scene(base, 64)))
        large.append(_ink(render_scene(big, 64)))
    assert np.mean(large) / np.mean(small) == pytest.approx(1.4**2, rel=0.15)


@pytest.mark.parametrize("scale", [0.5, 1.2, 1.4])
def test_scaled_scenes_stay_inside_the_image(scale):
    for i in range(1500):
        for obj in sample_scene(np.random.default_rng(i), object_scale=scale)["objects"]:
            r = object_radius(obj)
            assert r <= obj["x"] + 1e-3 and obj["x"] + r <= 1 + 1e-3
            assert r <= obj["y"] + 1e-3 and obj["y"] + r <= 1 + 1e-3


def test_max_objects_caps_the_count():
    counts = [len(sample_scene(np.random.default_rng(i), max_objects=2)["objects"]) for i in range(500)]
    assert max(counts) == 2 and min(counts) == 1
    assert all(len(sample_scene(np.random.default_rng(i), max_objects=1)["objects"]) == 1 for i in range(100))


def test_difficulty_is_part_of_the_dataset_identity():
    base = SynthCapsConfig().dataset_fields()
    assert SynthCapsConfig(object_scale=1.4).dataset_fields() != base
    assert SynthCapsConfig(max_objects=2).dataset_fields() != base
    with pytest.raises(ValueError, match="object_scale"):
        SynthCapsConfig(object_scale=3.0)


def test_changing_the_image_tower_drops_the_presets_kwargs():
    from alignlab.config import validate_config

    cfg = validate_config({"model": {"preset": "tiny", "image": {"name": "resnet18"}}})
    assert cfg.model.image.kwargs == {}
    kept = validate_config({"model": {"preset": "tiny", "image": {"kwargs": {"depth": 2}}}})
    assert kept.model.image.kwargs["depth"] == 2 and kept.model.image.kwargs["patch_size"] == 8


def test_image_tower_width_uses_head_hidden_size():
    from alignlab.models.towers import ImageTower

    tower = ImageTower("mobilenetv3_small_050")
    assert tower(torch.zeros(2, 3, 64, 64)).shape == (2, tower.num_features)
