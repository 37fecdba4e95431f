"""Shared fixtures: a small SynthCaps dataset generated once per test session, and a tiny config."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread per test process (and per subprocess it starts, through OMP_NUM_THREADS, which the
# trainer honours): pytest-xdist runs two processes on two cores, and more threads than cores makes small
# tensor loops many times slower.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

SMALL_SYNTH = {
    "seed": 7,
    "num_train": 256,
    "shard_size": 100,
    "num_retrieval_test": 40,
    "num_retrieval_val": 20,
    "zeroshot_per_class_train": 4,
    "zeroshot_per_class_val": 2,
    "zeroshot_per_class_test": 3,
    "shift_per_class": 3,
}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from alignlab.data.synth import SynthCapsConfig, generate_synthcaps

    root = tmp_path_factory.mktemp("synthcaps") / "data"
    generate_synthcaps(root, SynthCapsConfig(**SMALL_SYNTH))
    return root


def tiny_config_tree(data_root, output_dir, **train) -> dict:
    """A config small enough to train a few steps in seconds on a CPU."""
    return {
        "name": "test",
        "seed": 3,
        "output_dir": str(output_dir),
        "data": {"root": str(data_root), "num_workers": 0, "image_size": 32},
        "model": {
            "preset": "tiny",
            "embed_dim": 32,
            "image": {"kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}},
            "text": {"width": 32, "layers": 1, "heads": 2},
            "tokenizer": {"context_length": 16},
        },
        "train": {"batch_size": 32, "epochs": 1, "lr": 1e-3, "log_every": 1, "checkpoint_every": 3,
                  "progress": False, **train},
        "eval": {"enabled": False},
        "tracking": {"enabled": False},
    }


# A frozen ViT teacher for the thesis' knowledge-extraction tests (7 logits, CLS width 24), saved once.
KD_TEACHER_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 24, "num_heads": 2}
# A 4-block ViT (width 24, no head) for the layer-averaged distillation, VQ and classifier tests.
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 24, "num_heads": 2}


def _saved_vit(folder, num_classes: int, kwargs: dict):
    import timm

    torch.manual_seed(0)
    path = folder / "teacher.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **kwargs).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    return _saved_vit(tmp_path_factory.mktemp("teacher"), 7, KD_TEACHER_KWARGS)


@pytest.fixture(scope="session")
def vit_teacher(tmp_path_factory):
    return _saved_vit(tmp_path_factory.mktemp("vit"), 0, TINY_VIT)


class Crash(RuntimeError):
    """Raised from `on_metrics` to stop a training run as a crash would."""


def crash_at(at: int, message: str = "simulated crash"):
    """An `on_metrics` callback that raises `Crash` once step `at` is logged."""
    def on_metrics(metrics, step):
        if step == at:
            raise Crash(f"{message} at step {at}")
    return on_metrics


def crash_and_resume(cfg, tmp_path, at: int = 4, keys: tuple[str, ...] = ("step", "loss")):
    """Train `cfg` uninterrupted, then again with a crash after step `at` and `--resume`; assert both give the
    same history (`keys` of every row) and the same state dict, bit for bit. Returns (full, resumed)."""
    from alignlab.training.trainer import train

    full = train(cfg, tmp_path / "full")
    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", on_metrics=crash_at(at))
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    assert [tuple(h[k] for k in keys) for h in resumed.history] == [tuple(h[k] for k in keys) for h in full.history]
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for name, value in full_state.items():
        assert torch.equal(value, resumed_state[name]), name
    return full, resumed
