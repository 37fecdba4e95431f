"""PSD training integration: alpha schedules and the aligned/unaligned partition of each batch."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.training.psd_partition import aligned_mask, alpha_at
from dist_utils import run_on_gloo_ranks

BATCH = torch.arange(1000, 1064)


def test_alpha_schedules_match_their_formulas():
    total = 101
    for step in (0, 25, 50, 75, 100):
        t = step / 100
        assert alpha_at(step, total, "cosine", 0.8, 0.2) == pytest.approx(0.2 + 0.6 * 0.5 * (1 + math.cos(math.pi * t)))
        assert alpha_at(step, total, "linear", 0.8, 0.2) == pytest.approx(0.8 - 0.6 * t)
        assert alpha_at(step, total, "constant", 0.5, 0.2) == 0.5
    assert alpha_at(0, total, "cosine", 0.8, 0.2) == pytest.approx(0.8)
    assert alpha_at(100, total, "cosine", 0.8, 0.2) == pytest.approx(0.2)


def test_alpha_hold_trains_infonce_first_then_runs_the_whole_schedule():
    """loss.psd.alpha_hold = 0.25 of 101 steps: alpha = 1 for steps 0-24, then cosine 0.8 -> 0.2 over steps
    25-100, as the unheld schedule runs over 76 steps."""
    assert [alpha_at(step, 101, "cosine", 0.8, 0.2, hold=0.25) for step in (0, 24)] == [1.0, 1.0]
    for step in (25, 50, 100):
        assert alpha_at(step, 101, "cosine", 0.8, 0.2, hold=0.25) == pytest.approx(
            alpha_at(step - 25, 76, "cosine", 0.8, 0.2))
    assert alpha_at(25, 101, "cosine", 0.8, 0.2, hold=0.25) == pytest.approx(0.8)
    assert alpha_at(100, 101, "cosine", 0.8, 0.2, hold=0.25) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        alpha_at(0, 10, "exponential", 0.8, 0.2)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.51, 0.8, 1.0])
def test_exactly_floor_alpha_n_rows_are_aligned(alpha):
    mask = aligned_mask(BATCH, alpha, seed=0, epoch=0, partition="dynamic")
    assert mask.dtype == torch.bool and int(mask.sum()) == math.floor(alpha * len(BATCH))


def test_dynamic_partition_is_refreshed_every_epoch_and_static_is_not():
    dyn = [aligned_mask(BATCH, 0.5, seed=1, epoch=e, partition="dynamic") for e in range(3)]
    static = [aligned_mask(BATCH, 0.5, seed=1, epoch=e, partition="static") for e in range(3)]
    assert not torch.equal(dyn[0], dyn[1]) and not torch.equal(dyn[1], dyn[2])
    assert torch.equal(static[0], static[1]) and torch.equal(static[1], static[2])
    # reproducible from the seed, different for another seed
    assert torch.equal(dyn[0], aligned_mask(BATCH, 0.5, seed=1, epoch=0, partition="dynamic"))
    assert not torch.equal(dyn[0], aligned_mask(BATCH, 0.5, seed=2, epoch=0, partition="dynamic"))


def test_static_partition_nests_as_alpha_decays():
    high = aligned_mask(BATCH, 0.8, seed=0, epoch=0, partition="static")
    low = aligned_mask(BATCH, 0.2, seed=0, epoch=0, partition="static")
    assert bool((low & ~high).sum() == 0)  # every sample aligned at 0.2 is also aligned at 0.8


def test_the_partition_depends_on_sample_identity_not_batch_position():
    mask = aligned_mask(BATCH, 0.5, seed=0, epoch=0, partition="dynamic")
    order = torch.randperm(len(BATCH), generator=torch.Generator().manual_seed(0))
    shuffled = aligned_mask(BATCH[order], 0.5, seed=0, epoch=0, partition="dynamic")
    assert torch.equal(shuffled, mask[order])


def _rank_masks(rank: int):
    half = len(BATCH) // 2
    return aligned_mask(BATCH[rank * half:(rank + 1) * half], 0.3, seed=4, epoch=2, partition="dynamic")


def test_two_ranks_split_the_global_batch_partition(tmp_path):
    single = aligned_mask(BATCH, 0.3, seed=4, epoch=2, partition="dynamic")
    ranks = run_on_gloo_ranks(_rank_masks, tmp_path)
    assert torch.equal(torch.cat(ranks), single)


def test_psd_training_logs_its_alpha_schedule_and_aligned_fraction(synth_root, tmp_path):
    from alignlab.config import validate_config
    from alignlab.training.trainer import train
    from conftest import tiny_config_tree

    tree = tiny_config_tree(synth_root, tmp_path, max_steps=5)
    tree["loss"] = {"name": "psd", "psd": {"alpha_schedule": "linear", "alpha_start": 0.8, "alpha_end": 0.2}}
    history = train(validate_config(tree), tmp_path / "psd").history
    assert [h["psd/alpha"] for h in history] == pytest.approx([0.8, 0.65, 0.5, 0.35, 0.2])
    assert [h["psd/aligned_fraction"] for h in history] == pytest.approx(
        [math.floor(a * 32) / 32 for a in (0.8, 0.65, 0.5, 0.35, 0.2)])
    assert all(math.isfinite(h["loss"]) for h in history)
    for key in ("psd/target_diag_mass", "psd/target_entropy"):  # the targets' informativeness, every step
        assert all(0 < h[key] <= 1 for h in history), key

