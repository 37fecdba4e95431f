"""clip_loss (SPEC section 1) against hand-computed and brute-force references, single- and multi-process."""

import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_on_gloo_ranks

from alignlab.losses import clip_loss, gather_column_values, gather_features, gather_row_values

WORLD_SIZE = 2
GLOBAL_BATCH = 8


def _normalised(n, d, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)


def _loop_reference(image, text, scale):
    """InfoNCE written out from the equation with python floats: mean over both directions and all rows."""
    image, text = image.tolist(), text.tolist()
    n = len(image)

    def row_loss(query, keys, positive):
        logits = [scale * sum(a * b for a, b in zip(query, key)) for key in keys]
        return -(logits[positive] - math.log(sum(math.exp(x) for x in logits)))

    total = sum(row_loss(image[i], text, i) + row_loss(text[i], image, i) for i in range(n))
    return total / (2 * n)


def test_hand_computed_two_pairs():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text = torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    s = 2.0
    # similarities v_i . t_j: [[0.6, 1.0], [0.8, 0.0]]
    image_to_text = [-math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(2.0))),
                     -math.log(math.exp(0.0) / (math.exp(1.6) + math.exp(0.0)))]
    text_to_image = [-math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6))),
                     -math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0)))]
    expected = (sum(image_to_text) / 2 + sum(text_to_image) / 2) / 2
    assert clip_loss(image, text, s).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.4987, abs=1e-4)  # = mean of log(1 + e^x), x in {0.8, 1.6, 0.4, 2}


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_matches_loop_reference(scale):
    image, text = _normalised(7, 5, seed=1), _normalised(7, 5, seed=2)
    assert clip_loss(image, text, scale).item() == pytest.approx(_loop_reference(image, text, scale), rel=1e-10)


def test_symmetric_in_the_two_modalities():
    image, text = _normalised(6, 4, seed=3), _normalised(6, 4, seed=4)
    assert clip_loss(image, text, 10.0).item() == pytest.approx(clip_loss(text, image, 10.0).item(), rel=1e-12)


def test_perfect_alignment_with_large_scale_is_near_zero():
    features = torch.eye(4, 8, dtype=torch.float64)
    assert clip_loss(features, features, 100.0).item() < 1e-12
    assert clip_loss(features, features, 1.0).item() > 0.5  # the scale matters: at s = 1 it is far from 0


def test_gradients_are_finite_and_reach_the_scale():
    image = _normalised(16, 8, seed=5).float().requires_grad_()
    text = _normalised(16, 8, seed=6).float().requires_grad_()
    log_scale = torch.tensor(math.log(100.0), requires_grad=True)
    clip_loss(image, text, log_scale.exp()).backward()
    for grad in (image.grad, text.grad, log_scale.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="distributed loss mode"):
        clip_loss(torch.eye(2), torch.eye(2), 1.0, distributed="ring")


def test_without_process_group_every_mode_is_single_process():
    image, text = _normalised(4, 3, seed=7), _normalised(4, 3, seed=8)
    batch = gather_features(image, text, "local")
    assert batch.image_rows is image and batch.text_cols is text and batch.row_offset == 0
    assert clip_loss(image, text, 5.0, "global").item() == clip_loss(image, text, 5.0).item()


def _worker(rank):
    image, text = _normalised(GLOBAL_BATCH, 6, seed=11), _normalised(GLOBAL_BATCH, 6, seed=12)
    n = GLOBAL_BATCH // WORLD_SIZE
    shard = slice(rank * n, (rank + 1) * n)
    results = {}
    for mode in ("global", "local"):
        local_image = image[shard].clone().requires_grad_()
        local_text = text[shard].clone().requires_grad_()
        scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
        loss = clip_loss(local_image, local_text, scale, distributed=mode)
        loss.backward()
        results[mode] = (loss.item(), local_image.grad, local_text.grad, scale.grad)
    mask = torch.tensor([rank == 0, True, False, rank == 1])
    results["mask_rows_global"] = gather_row_values(mask, "global")
    results["mask_rows_local"] = gather_row_values(mask, "local")
    results["mask_cols_local"] = gather_column_values(mask, "local")
    results["row_offset_local"] = gather_features(image[shard], text[shard], "local").row_offset
    return results


def test_two_gloo_ranks_match_single_process(tmp_path):
    ranks = run_on_gloo_ranks(_worker, tmp_path, WORLD_SIZE)

    image = _normalised(GLOBAL_BATCH, 6, seed=11).requires_grad_()
    text = _normalised(GLOBAL_BATCH, 6, seed=12).requires_grad_()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    expected = clip_loss(image, text, scale)
    expected.backward()
    n = GLOBAL_BATCH // WORLD_SIZE

    # global: every rank computes the full-batch loss itself.
    for rank, result in enumerate(ranks):
        assert result["global"][0] == pytest.approx(expected.item(), abs=1e-6)
    # local: each rank averages its own rows; the mean over ranks is the full-batch loss.
    local_mean = sum(result["local"][0] for result in ranks) / WORLD_SIZE
    assert local_mean == pytest.approx(expected.item(), abs=1e-6)
    assert ranks[0]["local"][0] != pytest.approx(ranks[1]["local"][0])  # the ranks' row sets differ

    # Gradients: all_gather's backward sums every rank's gradient into the owner of a shard. In global
    # mode each of the W ranks back-propagates the same full loss, so a shard's gradient is W x the
    # single-process one; in local mode the W per-rank means sum to W x the full-batch mean. DDP divides
    # the summed parameter gradients by W, so grad / W must equal the single-process gradient in both modes.
    for mode in ("global", "local"):
        for rank, result in enumerate(ranks):
            _, image_grad, text_grad, _ = result[mode]
            shard = slice(rank * n, (rank + 1) * n)
            torch.testing.assert_close(image_grad / WORLD_SIZE, image.grad[shard], atol=1e-10, rtol=0)
            torch.testing.assert_close(text_grad / WORLD_SIZE, text.grad[shard], atol=1e-10, rtol=0)
        # The logit scale is a replicated parameter: DDP's average of its per-rank gradients.
        scale_grad = sum(result[mode][3] for result in ranks) / WORLD_SIZE
        torch.testing.assert_close(scale_grad, scale.grad, atol=1e-10, rtol=0)

    masks = [torch.tensor([rank == 0, True, False, rank == 1]) for rank in range(WORLD_SIZE)]
    for rank, result in enumerate(ranks):
        assert torch.equal(result["mask_rows_global"], torch.cat(masks))
        assert torch.equal(result["mask_rows_local"], masks[rank])
        assert torch.equal(result["mask_cols_local"], torch.cat(masks))
        assert result["row_offset_local"] == rank * n


def _forward_matmuls(fn) -> int:
    """aten matrix products run by `fn()` (forward only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def test_each_loss_multiplies_the_similarity_matrix_once_when_rows_are_columns():
    from alignlab.losses.hn_nce import hn_nce_loss
    from alignlab.losses.psd import psd_loss

    v = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1).requires_grad_()
    aligned = torch.arange(16) < 8
    assert _forward_matmuls(lambda: clip_loss(v, t, 10.0)) == 1
    assert _forward_matmuls(lambda: hn_nce_loss(v, t, 10.0, alpha=1.0, beta=0.25)) == 1
    assert _forward_matmuls(lambda: psd_loss(v, t, 10.0, alpha=0.5, aligned_mask=aligned)) == 1
