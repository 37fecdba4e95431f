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
