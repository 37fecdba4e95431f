"""Training-time statistics that show collapse and duplicate captions, against brute force."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignlab.training.distributed import compute_threads
from alignlab.training.trainer import duplicate_fraction, mean_pairwise_cosine


def test_mean_pairwise_cosine_matches_brute_force():
    features = F.normalize(torch.randn(37, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    brute = torch.stack([features[i] @ features[j] for i in range(37) for j in range(37) if i != j]).mean()
    assert torch.allclose(mean_pairwise_cosine(features), brute, atol=1e-5)
    collapsed = F.normalize(torch.ones(8, 4), dim=-1)
    assert torch.allclose(mean_pairwise_cosine(collapsed), torch.tensor(1.0), atol=1e-6)


def test_duplicate_fraction_counts_repeated_captions():
    tokens = torch.tensor([[1, 2, 0], [1, 2, 0], [3, 4, 0], [1, 2, 0], [5, 0, 0]])
    assert duplicate_fraction(tokens) == 1 - 3 / 5


def test_compute_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert compute_threads(None, num_workers=1) == 3
    assert compute_threads(None, num_workers=8) == 1
    assert compute_threads(5, num_workers=1) == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert compute_threads(None, num_workers=0) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert compute_threads(None, num_workers=0) == 1
