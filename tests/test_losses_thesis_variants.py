"""The thesis' dropped variants against references written from their equations in float64 (plain loops): InfoNCE
with a student memory bank, InfoNCE against a momentum encoder and its queues (one process and two gloo ranks),
the EMA update (Eq 70), and image-text matching with feature fusion (Eq 64-67) with its negative sampler."""

import math

import pytest
import torch
from torch import nn

from alignlab.losses import (
    FeatureQueue,
    clip_loss,
    itm_loss,
    momentum_clip_loss,
    sample_itm_negatives,
    student_bank_clip_loss,
)
from alignlab.models.itm import ITMHead
from alignlab.models.momentum import MomentumEncoder
from dist_utils import run_on_gloo_ranks

WORLD_SIZE, GLOBAL_BATCH = 2, 6


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _one_direction(rows, columns, scale):
    """-1/n sum_i log softmax_j(s r_i . c_j)[i], columns = batch then queue, by loops."""
    total = 0.0
    for i, r in enumerate(rows.tolist()):
        logits = [scale * sum(a * b for a, b in zip(r, c)) for c in columns.tolist()]
        m = max(logits)
        total -= logits[i] - (m + math.log(sum(math.exp(v - m) for v in logits)))
    return total / len(rows)


def test_student_bank_infonce_matches_the_equation_and_is_clip_without_a_bank():
    image, text = _unit(5, 4, 1), _unit(5, 4, 2)
    image_bank, text_bank = _unit(7, 4, 3), _unit(6, 4, 4)
    expected = (_one_direction(image, torch.cat([text, text_bank]), 12.0)
                + _one_direction(text, torch.cat([image, image_bank]), 12.0)) / 2
    value = student_bank_clip_loss(image, text, 12.0, image_bank, text_bank)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert student_bank_clip_loss(image, text, 12.0).item() == pytest.approx(clip_loss(image, text, 12.0).item(),
                                                                             rel=1e-12)
    # The batch's columns carry their gradient (ordinary InfoNCE); the banks do not.
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    image_bank.requires_grad_()
    student_bank_clip_loss(image, text, 12.0, image_bank, text_bank).backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and image_bank.grad is None


def test_momentum_infonce_matches_the_equation_and_only_the_student_gets_a_gradient():
    image, text = _unit(4, 3, 5).requires_grad_(), _unit(4, 3, 6).requires_grad_()
    momentum_image, momentum_text = _unit(4, 3, 7).requires_grad_(), _unit(4, 3, 8).requires_grad_()
    image_queue, text_queue = _unit(9, 3, 9), _unit(9, 3, 10)
    value = momentum_clip_loss(image, text, momentum_image, momentum_text, 1 / 0.07, image_queue, text_queue)
    expected = (_one_direction(image.detach(), torch.cat([momentum_text.detach(), text_queue]), 1 / 0.07)
                + _one_direction(text.detach(), torch.cat([momentum_image.detach(), image_queue]), 1 / 0.07)) / 2
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value.backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    assert momentum_image.grad is None and momentum_text.grad is None
    # The positive is the momentum vector of the pair: a student equal to its momentum copy scores better
    # than one equal to a shuffled copy.
    same = momentum_clip_loss(momentum_image.detach(), momentum_text.detach(), momentum_image, momentum_text, 10.0)
    shuffled = momentum_clip_loss(momentum_image.detach().roll(1, 0), momentum_text.detach().roll(1, 0),
                                  momentum_image, momentum_text, 10.0)
    assert same < shuffled
    with pytest.raises(ValueError, match=r"queue must be \[M, 3\]"):
        momentum_clip_loss(image, text, momentum_image, momentum_text, 10.0, image_queue[:, :2], text_queue)


class _Pair(nn.Module):
    """A stand-in student: two linear maps, the `layers` output a momentum encoder reads."""

    layer_names = ("h1", "h2")

    def __init__(self):
        super().__init__()
        self.image, self.text = nn.Linear(3, 2), nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, images, tokens):
        v, t = self.image(images), self.text(tokens)
        return {"layers": [(v, t), (torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(t, dim=-1))]}


def test_ema_update_is_eq_70_and_runs_before_the_copy_encodes():
    torch.manual_seed(0)
    student = _Pair()
    encoder = MomentumEncoder(student, momentum=0.9)
    assert all(not p.requires_grad for p in encoder.parameters())
    start = {name: p.detach().clone() for name, p in encoder.model.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.count.fill_(5.0)
    images, tokens = torch.randn(4, 3), torch.randn(4, 3)
    image, text = encoder.step(student, images, tokens)
    for name, p in encoder.model.named_parameters():  # theta_k = m theta_k + (1 - m) theta_q
        expected = 0.9 * start[name] + 0.1 * dict(student.named_parameters())[name].detach()
        torch.testing.assert_close(p, expected)
    assert float(encoder.model.count) == 5.0  # buffers are copied
    torch.testing.assert_close(image, torch.nn.functional.normalize(encoder.model.image(images), dim=-1))
    with pytest.raises(ValueError, match=r"momentum m=1.0 must be in \[0, 1\)"):
        MomentumEncoder(student, momentum=1.0)


def test_itm_head_fuses_by_sum_and_the_loss_is_cross_entropy_over_3b_pairs():
    torch.manual_seed(1)
    head = ITMHead(width=4, dim=3).double()
    image, text = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    w_i, w_t = head.image_proj.weight, head.text_proj.weight
    w_c, b = head.classifier.weight, head.classifier.bias
    logits = head(image, text)
    torch.testing.assert_close(logits, (image @ w_i.T + text @ w_t.T) @ w_c.T + b)  # Eq 64-65
    text_for_image, image_for_text = torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])
    loss, accuracy = itm_loss(head, image, text, text_for_image, image_for_text)
    pairs = [(i, i, 1) for i in range(3)] + [(i, int(text_for_image[i]), 0) for i in range(3)] + \
            [(int(image_for_text[i]), i, 0) for i in range(3)]
    total, right = 0.0, 0
    for v, w, label in pairs:  # Eq 67, a 2-way softmax per fused pair
        z = head(image[v:v + 1], text[w:w + 1])[0].tolist()
        total -= z[label] - math.log(math.exp(z[0]) + math.exp(z[1]))
        right += int((z[1] > z[0]) == bool(label))
    assert loss.item() == pytest.approx(total / 9, rel=1e-12)
    assert accuracy.item() == pytest.approx(right / 9)
    # A head that always says "no match" is right on the 2B non-pairs: the thesis' 2/3.
    with torch.no_grad():
        head.classifier.bias.copy_(torch.tensor([100.0, -100.0]))
    assert itm_loss(head, image, text, text_for_image, image_for_text)[1].item() == pytest.approx(2 / 3)


def test_itm_negatives_never_the_pair_and_hard_ones_follow_the_similarity():
    torch.manual_seed(2)
    similarity = torch.randn(6, 6)
    for negatives in ("random", "hard"):
        for _ in range(20):
            text_for_image, image_for_text = sample_itm_negatives(similarity, negatives)
            assert (text_for_image != torch.arange(6)).all() and (image_for_text != torch.arange(6)).all()
    # Hard: the most similar other caption (row) and image (column) win when the softmax is peaked.
    peaked = torch.eye(4) * 100.0  # the pair itself is never drawn, however similar
    peaked[0, 2] = peaked[1, 3] = peaked[2, 1] = peaked[3, 0] = 50.0
    text_for_image, image_for_text = sample_itm_negatives(peaked, "hard")
    assert text_for_image.tolist() == [2, 3, 1, 0]  # the row's largest other entry
    assert image_for_text.tolist() == [3, 2, 0, 1]  # the column's
    counts = torch.zeros(6)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3000):  # random: uniform over the other B-1
        counts[sample_itm_negatives(similarity, "random", generator)[0][0]] += 1
    assert counts[0] == 0 and (counts[1:] / 3000 - 0.2).abs().max() < 0.04
    with pytest.raises(ValueError, match="ITM negatives='semi'"):
        sample_itm_negatives(similarity, "semi")


def _momentum_worker(rank):
    n = GLOBAL_BATCH // WORLD_SIZE
    shard = slice(rank * n, (rank + 1) * n)
    image, text = _unit(GLOBAL_BATCH, 4, 60), _unit(GLOBAL_BATCH, 4, 61)
    momentum_image, momentum_text = _unit(GLOBAL_BATCH, 4, 62), _unit(GLOBAL_BATCH, 4, 63)
    queue = FeatureQueue(size=8, dim=4).double()
    queue.push(momentum_text[shard], distributed="local")  # each rank pushes its own; the queue gathers all
    results = {"queue": queue.negatives().clone()}
    for mode in ("global", "local"):
        v, t = image[shard].clone().requires_grad_(), text[shard].clone().requires_grad_()
        loss = momentum_clip_loss(v, t, momentum_image[shard], momentum_text[shard], 10.0, queue.negatives(),
                                  queue.negatives(), distributed=mode)
        loss.backward()
        results[mode] = (loss.item(), v.grad, t.grad)
    return results


def test_momentum_infonce_on_two_gloo_ranks_matches_one_process(tmp_path):
    ranks = run_on_gloo_ranks(_momentum_worker, tmp_path, WORLD_SIZE)
    queue = _unit(GLOBAL_BATCH, 4, 63)
    assert all(torch.equal(r["queue"], queue) for r in ranks)  # every rank's vectors, in rank order
    image, text = _unit(GLOBAL_BATCH, 4, 60).requires_grad_(), _unit(GLOBAL_BATCH, 4, 61).requires_grad_()
    expected = momentum_clip_loss(image, text, _unit(GLOBAL_BATCH, 4, 62), queue, 10.0, queue, queue)
    expected.backward()
    n = GLOBAL_BATCH // WORLD_SIZE
    assert all(r["global"][0] == pytest.approx(expected.item(), rel=1e-9) for r in ranks)
    assert sum(r["local"][0] for r in ranks) / WORLD_SIZE == pytest.approx(expected.item(), rel=1e-9)
    for mode in ("global", "local"):
        for rank, result in enumerate(ranks):
            torch.testing.assert_close(result[mode][1] / WORLD_SIZE, image.grad[rank * n:(rank + 1) * n])
            torch.testing.assert_close(result[mode][2] / WORLD_SIZE, text.grad[rank * n:(rank + 1) * n])


def test_the_momentum_copy_of_a_student_with_input_type_embeddings_adds_its_own():
    """tte='before' adds the modality vector through forward hooks on the towers' input embeddings; the copy's
    hooks must read the copy's (EMA) vectors, not the student's."""
    from alignlab.models.text_transformer import TextTransformer
    from alignlab.models.thesis_student import ThesisStudent
    from alignlab.models.towers import ImageTower

    torch.manual_seed(0)
    image = ImageTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2)
    text = TextTransformer(vocab_size=50, context_length=12, width=16, layers=1, heads=2, pool="first",
                           causal=False, pad_id=0)
    student = ThesisStudent(image, text, shared="block", out_dim=8, heads=2, tte="before").eval()
    encoder = MomentumEncoder(student, momentum=0.5)
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(images, tokens)["layers"][1], student(images, tokens)["layers"][1])
        student.tte.embedding.weight.add_(5.0)  # only the student's vectors move
        copy_after = encoder.model(images, tokens)["layers"][1]
        assert not torch.allclose(copy_after[1], student(images, tokens)["layers"][1][1])
        encoder.model.tte.embedding.weight.add_(5.0)
        torch.testing.assert_close(encoder.model(images, tokens)["layers"][1], student(images, tokens)["layers"][1])
