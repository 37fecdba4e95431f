"""The thesis' knowledge-extraction losses and the teacher memory bank against references written from the
equations in float64 (plain loops), in one process and on two gloo ranks."""

import math

import pytest
import torch

from alignlab.losses import (
    TeacherMemoryBank,
    clip_loss,
    contrastive_target_loss,
    ctl_kd_loss,
    multi_layer_clip_loss,
    shre_kd_loss,
    ssmke_mse_loss,
)
from dist_utils import run_on_gloo_ranks

WORLD_SIZE, GLOBAL_BATCH = 2, 6


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _randn(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_shre_kd_is_half_kl_per_modality_from_the_equation():
    image, text, teacher = _randn(5, 7, 1), _randn(5, 7, 2), _randn(5, 7, 3)
    expected = sum(0.5 * _kl(_softmax(t.tolist()), _softmax(i.tolist())) + 0.5 * _kl(_softmax(t.tolist()), _softmax(w.tolist()))
                   for i, w, t in zip(image, text, teacher)) / 5
    assert shre_kd_loss(image, text, teacher).item() == pytest.approx(expected, rel=1e-12)
    # Zero when the student predicts the teacher's distribution (logits shifted by a constant per row).
    assert shre_kd_loss(teacher + 3.0, teacher - 1.0, teacher).item() == pytest.approx(0.0, abs=1e-12)


def test_shre_kd_gradient_reaches_the_student_only():
    image, text = _randn(4, 5, 1).requires_grad_(), _randn(4, 5, 2).requires_grad_()
    teacher = _randn(4, 5, 3).requires_grad_()
    shre_kd_loss(image, text, teacher).backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and teacher.grad is None
    with pytest.raises(ValueError, match="one shape"):
        shre_kd_loss(image, text[:, :3], teacher)


def test_ssmke_is_half_mse_per_modality_mean_over_dimensions():
    image, text, teacher = _randn(4, 6, 4), _randn(4, 6, 5), _randn(4, 6, 6)
    mse = lambda a, b: sum(sum((x - y) ** 2 for x, y in zip(r, s)) / 6 for r, s in zip(a.tolist(), b.tolist())) / 4
    expected = 0.5 * mse(image, teacher) + 0.5 * mse(text, teacher)
    assert ssmke_mse_loss(image, text, teacher).item() == pytest.approx(expected, rel=1e-12)


def _ctl_reference(student, teacher, scale, bank=None):
    columns = teacher.tolist() + ([] if bank is None else bank.tolist())
    total = 0.0
    for i, x in enumerate(student.tolist()):
        logits = [scale * sum(a * b for a, b in zip(x, c)) for c in columns]
        m = max(logits)
        total += -(logits[i] - (m + math.log(sum(math.exp(v - m) for v in logits))))
    return total / len(student)


def test_ctl_matches_the_equation_with_and_without_a_bank():
    student, teacher, bank = _unit(6, 5, 7), _unit(6, 5, 8), _unit(9, 5, 9)
    assert contrastive_target_loss(student, teacher, 1 / 0.07).item() == pytest.approx(
        _ctl_reference(student, teacher, 1 / 0.07), rel=1e-12)
    assert contrastive_target_loss(student, teacher, 1.0, bank=bank).item() == pytest.approx(
        _ctl_reference(student, teacher, 1.0, bank), rel=1e-12)
    # More negatives can only raise the loss (the positive's probability shrinks).
    assert contrastive_target_loss(student, teacher, 5.0, bank=bank) > contrastive_target_loss(student, teacher, 5.0)


def test_ctl_is_one_direction_and_leaves_teacher_and_bank_alone():
    student = _unit(6, 5, 10).requires_grad_()
    teacher, bank = _unit(6, 5, 11).requires_grad_(), _unit(4, 5, 12).requires_grad_()
    value = contrastive_target_loss(student, teacher, 10.0, bank=bank)
    value.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None and bank.grad is None
    # One direction: the image->text half of the two-direction InfoNCE, not their mean.
    image, text = _unit(6, 5, 13), _unit(6, 5, 14)
    one_way = torch.nn.functional.cross_entropy(10.0 * image @ text.T, torch.arange(6))
    assert contrastive_target_loss(image, text, 10.0).item() == pytest.approx(one_way.item(), rel=1e-12)
    assert contrastive_target_loss(image, text, 10.0).item() != pytest.approx(clip_loss(image, text, 10.0).item())
    both = ctl_kd_loss(image, text, teacher.detach(), 10.0)
    expected = (_ctl_reference(text, teacher.detach(), 10.0) + _ctl_reference(image, teacher.detach(), 10.0)) / 2
    assert both.item() == pytest.approx(expected, rel=1e-12)


def test_multi_layer_infonce_is_the_mean_of_per_layer_losses_with_own_scales():
    layers = [(_unit(5, 4, 20 + i), _unit(5, 4, 30 + i)) for i in range(3)]
    scales = torch.tensor([14.3, 20.0, 5.0], dtype=torch.float64, requires_grad=True)
    value = multi_layer_clip_loss(layers, scales)
    expected = sum(clip_loss(v, t, float(s)).item() for (v, t), s in zip(layers, scales.detach())) / 3
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value.backward()
    assert (scales.grad != 0).all()  # each layer's scale is trained by its own term
    with pytest.raises(ValueError, match="one logit scale per layer"):
        multi_layer_clip_loss(layers, scales[:2])


def test_memory_bank_is_fifo_masks_empty_slots_and_round_trips_its_state():
    bank = TeacherMemoryBank(size=5, dim=3)
    assert bank.negatives().shape == (0, 3)  # empty slots are never negatives
    first, second = _unit(3, 3, 40).float(), _unit(4, 3, 41).float()
    bank.push(first)
    assert torch.equal(bank.negatives(), first)
    bank.push(second)  # 7 vectors into 5 slots: the two oldest (first[0], first[1]) are overwritten
    kept = bank.negatives()
    assert kept.shape == (5, 3)
    expected_rows = {tuple(v.tolist()) for v in torch.cat([first[2:], second])}
    assert {tuple(v.tolist()) for v in kept} == expected_rows

    restored = TeacherMemoryBank(size=5, dim=3)
    restored.load_state_dict(bank.state_dict())
    third = _unit(2, 3, 42).float()
    bank.push(third)
    restored.push(third)
    assert torch.equal(bank.queue, restored.queue) and int(bank.pointer) == int(restored.pointer)

    big = _unit(12, 3, 43).float()
    bank.push(big)  # more vectors than slots: the newest five are kept
    assert {tuple(v.tolist()) for v in bank.negatives()} == {tuple(v.tolist()) for v in big[-5:]}


def test_memory_bank_random_init_is_full_of_positive_unit_vectors_and_bad_input_is_named():
    bank = TeacherMemoryBank(size=8, dim=4, init="random", seed=1)
    negatives = bank.negatives()
    assert negatives.shape == (8, 4) and (negatives >= 0).all()
    torch.testing.assert_close(negatives.norm(dim=-1), torch.ones(8))
    with pytest.raises(ValueError, match="init 'zeros'"):
        TeacherMemoryBank(4, 4, init="zeros")
    with pytest.raises(ValueError, match=r"\[\*, 4\]"):
        TeacherMemoryBank(4, 4).push(torch.zeros(2, 3))


def _ctl_worker(rank):
    student, teacher = _unit(GLOBAL_BATCH, 4, 50), _unit(GLOBAL_BATCH, 4, 51)
    n = GLOBAL_BATCH // WORLD_SIZE
    shard = slice(rank * n, (rank + 1) * n)
    bank = TeacherMemoryBank(size=8, dim=4).double()
    bank.push(_unit(3, 4, 52)[rank:rank + 1], distributed="local")  # each rank pushes one; the bank gathers both
    results = {"bank": bank.negatives().clone()}
    for mode in ("global", "local"):
        local = student[shard].clone().requires_grad_()
        loss = contrastive_target_loss(local, teacher[shard], 1 / 0.07, bank=bank.negatives(), distributed=mode)
        loss.backward()
        results[mode] = (loss.item(), local.grad)
    return results


def test_two_gloo_ranks_match_single_process(tmp_path):
    ranks = run_on_gloo_ranks(_ctl_worker, tmp_path, WORLD_SIZE)
    bank = _unit(3, 4, 52)[:2]
    assert all(torch.equal(r["bank"], bank) for r in ranks)  # both ranks hold every rank's vectors, in rank order
    student = _unit(GLOBAL_BATCH, 4, 50).requires_grad_()
    expected = contrastive_target_loss(student, _unit(GLOBAL_BATCH, 4, 51), 1 / 0.07, bank=bank)
    expected.backward()
    n = GLOBAL_BATCH // WORLD_SIZE
    for rank, result in enumerate(ranks):
        assert result["global"][0] == pytest.approx(expected.item(), rel=1e-9)
    assert sum(r["local"][0] for r in ranks) / WORLD_SIZE == pytest.approx(expected.item(), rel=1e-9)
    for mode in ("global", "local"):
        for rank, result in enumerate(ranks):
            torch.testing.assert_close(result[mode][1] / WORLD_SIZE, student.grad[rank * n:(rank + 1) * n])
