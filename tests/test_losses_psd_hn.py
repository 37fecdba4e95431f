"""psd_loss (SPEC section 2) and hn_nce_loss (SPEC section 3.3) against references written from the equations,
their gradients, low precision, and two gloo ranks against a single process."""

import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_on_gloo_ranks

from alignlab.losses import clip_loss, hn_nce_loss, psd_loss, psd_loss_terms, psd_target_diagnostics

MASKS = {"all": [True] * 6, "none": [False] * 6, "random": [True, False, False, True, True, False]}


def _normalised(n, d, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1).to(dtype)


def _inputs(n=6, d=4, seed=0, scale=1 / 0.07):
    image, text = _normalised(n, d, seed), _normalised(n, d, seed + 100)
    return image.requires_grad_(), text.requires_grad_(), torch.tensor(scale, dtype=torch.float64,
                                                                       requires_grad=True)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# ---- references -------------------------------------------------------------------------------------------

def _psd_loop_reference(image, text, scale, alpha, mask, tau, prediction):
    """SPEC section 2 with python floats: softmaxes and cross entropies written out, means over each set."""
    image, text, n = image.tolist(), text.tolist(), len(mask)
    sim_it = [[sum(a * b for a, b in zip(image[i], text[k])) for k in range(n)] for i in range(n)]  # v_i . t_k
    sim_ti = [[sim_it[k][i] for k in range(n)] for i in range(n)]  # t_i . v_k

    def softmax(row, temperature):
        e = [math.exp(x / temperature) for x in row]
        return [x / sum(e) for x in e]

    def cross_entropy(target, sims):
        return -sum(q * math.log(p) for q, p in zip(target, softmax(sims, 1 / scale)))

    teacher_v, teacher_t = (sim_ti, sim_it) if prediction == "swapped" else (sim_it, sim_ti)
    one_hot = [[float(k == i) for k in range(n)] for i in range(n)]
    aligned = [i for i in range(n) if mask[i]]
    unaligned = [i for i in range(n) if not mask[i]]

    def mean(values):
        return sum(values) / len(values) if values else 0.0

    hard = (mean([cross_entropy(one_hot[i], sim_it[i]) for i in aligned])
            + mean([cross_entropy(one_hot[i], sim_ti[i]) for i in aligned])) / 2
    soft = (mean([cross_entropy(softmax(teacher_v[i], tau), sim_it[i]) for i in unaligned])
            + mean([cross_entropy(softmax(teacher_t[i], tau), sim_ti[i]) for i in unaligned])) / 2
    return alpha * hard + (1 - alpha) * soft


def _psd_targets(image, text, tau, prediction):
    sim = image @ text.T
    teacher_v, teacher_t = (sim.T, sim) if prediction == "swapped" else (sim, sim.T)
    return torch.softmax(teacher_v / tau, 1), torch.softmax(teacher_t / tau, 1)


def _psd_autograd_reference(image, text, scale, alpha, mask, tau, prediction, targets=None):
    """Dense autograd PSD terms (aligned, unaligned). targets=None: A from the features, with gradient;
    otherwise the given (A_v, A_t) as constants."""
    mask = torch.tensor(mask)
    targets = targets or _psd_targets(image, text, tau, prediction)
    sim = image @ text.T
    aligned = unaligned = 0
    for log_p, target in zip((torch.log_softmax(scale * sim, 1), torch.log_softmax(scale * sim.T, 1)), targets):
        if mask.any():
            aligned = aligned - alpha * log_p.diagonal()[mask].mean() / 2
        if (~mask).any():
            unaligned = unaligned - (1 - alpha) * (target[~mask] * log_p[~mask]).sum(1).mean() / 2
    return aligned, unaligned


def _hn_loop_reference(image, text, scale, alpha, beta):
    """SPEC section 3.3 with python floats, the weights w_ij and the denominator written out."""
    image, text, n = image.tolist(), text.tolist(), len(image)
    logits = [[scale * sum(a * b for a, b in zip(image[i], text[j])) for j in range(n)] for i in range(n)]

    def direction(rows):  # rows[i][j]: logit of row i against candidate j, positive j = i
        total = 0.0
        for i in range(n):
            norm = sum(math.exp(beta * rows[i][k]) for k in range(n) if k != i)
            negatives = sum((n - 1) * math.exp(beta * rows[i][j]) / norm * math.exp(rows[i][j])
                            for j in range(n) if j != i)
            total -= math.log(math.exp(rows[i][i]) / (alpha * math.exp(rows[i][i]) + negatives))
        return total / n

    # Text i's candidates are the images j, normalised over k != i: column i of `logits`.
    return (direction(logits) + direction([list(column) for column in zip(*logits)])) / 2


def _hn_autograd_reference(image, text, scale, alpha, beta, detach_weights):
    """Dense autograd HN-NCE (naive exponentials: float64 and small scales only)."""
    n = image.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    total = 0
    for logits in (scale * image @ text.T, scale * text @ image.T):
        hardness = torch.exp(beta * logits) * off_diagonal
        weights = (n - 1) * hardness / hardness.sum(1, keepdim=True)
        weights = weights.detach() if detach_weights else weights
        denominator = alpha * logits.diagonal().exp() + (weights * logits.exp()).sum(1)
        total = total - torch.log(logits.diagonal().exp() / denominator).mean() / 2
    return total


# ---- PSD --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["swapped", "forward"])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_psd_matches_loop_reference(alpha, mask, tau, prediction):
    image, text, scale = _inputs(seed=1)
    got = psd_loss(image, text, scale, alpha, torch.tensor(MASKS[mask]), tau, prediction)
    expected = _psd_loop_reference(image, text, scale.item(), alpha, MASKS[mask], tau, prediction)
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("scale", [1 / 0.07, 100.0])
def test_psd_with_alpha_one_and_all_rows_aligned_is_clip(scale):
    image, text, s = _inputs(n=16, d=8, seed=2, scale=scale)
    got = psd_loss(image, text, s, 1.0, torch.ones(16, dtype=torch.bool))
    expected = clip_loss(image, text, s)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=0)
    for grad, grad_expected in zip(_grads(got, image, text, s), _grads(expected, image, text, s)):
        torch.testing.assert_close(grad, grad_expected, rtol=1e-7, atol=1e-12)
    image32, text32 = image.detach().float(), text.detach().float()
    torch.testing.assert_close(psd_loss(image32, text32, scale, 1.0, torch.ones(16, dtype=torch.bool)),
                               clip_loss(image32, text32, scale), rtol=1e-6, atol=0)


def test_psd_empty_set_contributes_zero():
    image, text, scale = _inputs(seed=3)
    every, no = torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)
    aligned, unaligned = psd_loss_terms(image, text, scale, 0.3, every)
    assert unaligned.item() == 0 and aligned.item() == pytest.approx(0.3 * clip_loss(image, text, scale).item())
    aligned, unaligned = psd_loss_terms(image, text, scale, 0.8, no)
    assert aligned.item() == 0 and torch.isfinite(unaligned)
    assert unaligned.item() == pytest.approx(0.2 * psd_loss(image, text, scale, 0.0, no).item(), rel=1e-12)


def test_psd_terms_sum_to_the_loss():
    image, text, scale = _inputs(seed=4)
    mask = torch.tensor(MASKS["random"])
    aligned, unaligned = psd_loss_terms(image, text, scale, 0.4, mask)
    assert aligned.item() > 0 and unaligned.item() > 0
    assert (aligned + unaligned).item() == pytest.approx(psd_loss(image, text, scale, 0.4, mask).item(), rel=1e-14)


@pytest.mark.parametrize("prediction", ["swapped", "forward"])
def test_psd_detached_targets_get_no_gradient(prediction):
    image, text, scale = _inputs(seed=5)
    mask = MASKS["random"]
    constants = _psd_targets(image.detach(), text.detach(), 0.1, prediction)
    frozen = _psd_autograd_reference(image, text, scale, 0.4, mask, 0.1, prediction, targets=constants)[1]
    through = _psd_autograd_reference(image, text, scale, 0.4, mask, 0.1, prediction)[1]
    expected_frozen, expected_through = _grads(frozen, image, text, scale), _grads(through, image, text, scale)
    for detach, expected in ((True, expected_frozen), (False, expected_through)):
        unaligned = psd_loss_terms(image, text, scale, 0.4, torch.tensor(mask), 0.1, prediction, detach)[1]
        for grad, grad_expected in zip(_grads(unaligned, image, text, scale), expected):
            torch.testing.assert_close(grad, grad_expected, rtol=1e-9, atol=1e-12)
    assert (expected_frozen[0] - expected_through[0]).abs().max() > 1e-3  # the two cases really differ


def test_psd_gradient_through_targets_passes_gradcheck():
    image, text, scale = _inputs(n=5, d=3, seed=6, scale=5.0)
    mask = torch.tensor([True, False, True, False, False])
    assert torch.autograd.gradcheck(
        lambda v, t, s: psd_loss(v, t, s, 0.4, mask, 0.2, "swapped", detach_targets=False), (image, text, scale))


def test_psd_unaligned_pairs_are_negatives_but_not_rows():
    # alpha = 1: only the aligned rows' InfoNCE counts; an unaligned pair u is still a column (a negative),
    # so d/dv_u = s / (2 N_a) sum_{i in a} P^{t->i}_{iu} t_i; as a row it would add its own term.
    image, text, scale = _inputs(seed=7)
    mask = torch.tensor(MASKS["random"])
    image_grad, text_grad = _grads(psd_loss(image, text, scale, 1.0, mask), image, text)
    aligned_rows = mask.nonzero()[:, 0]
    with torch.no_grad():
        p_ti, p_it = torch.softmax(scale * text @ image.T, 1), torch.softmax(scale * image @ text.T, 1)
        for u in (~mask).nonzero()[:, 0]:
            expected_image = scale / (2 * len(aligned_rows)) * (p_ti[aligned_rows, u, None] * text[aligned_rows]).sum(0)
            expected_text = scale / (2 * len(aligned_rows)) * (p_it[aligned_rows, u, None] * image[aligned_rows]).sum(0)
            torch.testing.assert_close(image_grad[u], expected_image, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(text_grad[u], expected_text, rtol=1e-9, atol=1e-12)
            assert image_grad[u].abs().max() > 1e-3


def test_psd_aligned_pairs_are_columns_of_the_soft_term():
    # alpha = 0, detached swapped targets: an aligned pair a is only a column of the unaligned rows,
    # d/dv_a = s / (2 N_u) sum_{i in u} (P^{t->i}_{ia} - A_t[i, a]) t_i (no gradient through A).
    image, text, scale = _inputs(seed=8)
    mask = torch.tensor(MASKS["random"])
    image_grad = _grads(psd_loss(image, text, scale, 0.0, mask), image)[0]
    unaligned_rows = (~mask).nonzero()[:, 0]
    with torch.no_grad():
        p_ti = torch.softmax(scale * text @ image.T, 1)
        a_t = _psd_targets(image, text, 0.1, "swapped")[1]
        for a in mask.nonzero()[:, 0]:
            weights = (p_ti[unaligned_rows, a] - a_t[unaligned_rows, a])[:, None]
            expected = scale / (2 * len(unaligned_rows)) * (weights * text[unaligned_rows]).sum(0)
            torch.testing.assert_close(image_grad[a], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_psd_low_precision_is_finite_and_close(dtype):
    image, text = _normalised(16, 32, seed=9, dtype=dtype), _normalised(16, 32, seed=10, dtype=dtype)
    mask = torch.arange(16) % 3 == 0
    image.requires_grad_()
    loss = psd_loss(image, text, 100.0, 0.5, mask)
    loss.backward()
    expected = psd_loss(image.detach().double(), text.double(), 100.0, 0.5, mask)
    assert loss.dtype == torch.float32 and image.grad.dtype == dtype and torch.isfinite(image.grad).all()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), "alpha"), (dict(teacher_temperature=0.0), "teacher_temperature"),
    (dict(prediction="backward"), "prediction"), (dict(aligned_mask=torch.ones(6)), "aligned_mask"),
    (dict(aligned_mask=torch.ones(5, dtype=torch.bool)), "aligned_mask"), (dict(distributed="ring"), "mode"),
])
def test_psd_rejects_bad_arguments(kwargs, match):
    image, text, scale = _inputs(seed=11)
    arguments = dict(alpha=0.5, aligned_mask=torch.ones(6, dtype=torch.bool)) | kwargs
    with pytest.raises(ValueError, match=match):
        psd_loss(image, text, scale, **arguments)


# ---- HN-NCE -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1 / 0.07, 100.0])
@pytest.mark.parametrize("alpha", [1.0, 0.999, 0.9])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_hn_nce_matches_loop_reference(beta, alpha, scale):
    image, text, s = _inputs(n=7, d=5, seed=12, scale=scale)
    got = hn_nce_loss(image, text, s, alpha, beta)
    assert got.item() == pytest.approx(_hn_loop_reference(image, text, scale, alpha, beta), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hn_nce_with_alpha_one_beta_zero_is_clip(dtype):
    image, text, s = _inputs(n=16, d=8, seed=13, scale=100.0)
    image, text = image.detach().to(dtype).requires_grad_(), text.detach().to(dtype).requires_grad_()
    got, expected = hn_nce_loss(image, text, s, 1.0, 0.0), clip_loss(image, text, s)
    torch.testing.assert_close(got.to(expected.dtype), expected, rtol=1e-6, atol=0)
    tolerance = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for grad, grad_expected in zip(_grads(got, image, text, s), _grads(expected, image, text, s)):
        torch.testing.assert_close(grad.to(grad_expected.dtype), grad_expected, **tolerance)


@pytest.mark.parametrize("detach_weights", [False, True])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (0.999, 0.5), (0.9, 1.0)])
def test_hn_nce_gradients_match_autograd_reference(alpha, beta, detach_weights):
    image, text, scale = _inputs(n=7, d=5, seed=14, scale=10.0)
    got = _grads(hn_nce_loss(image, text, scale, alpha, beta, detach_weights), image, text, scale)
    expected = _grads(_hn_autograd_reference(image, text, scale, alpha, beta, detach_weights), image, text, scale)
    for grad, grad_expected in zip(got, expected):
        torch.testing.assert_close(grad, grad_expected, rtol=1e-9, atol=1e-12)


def test_hn_nce_weight_detaching_matters_only_when_beta_is_positive():
    image, text, scale = _inputs(n=8, d=5, seed=15, scale=10.0)
    for beta in (0.0, 0.5):
        kept, detached = (hn_nce_loss(image, text, scale, 0.999, beta, detach) for detach in (False, True))
        assert kept.item() == detached.item()  # the value is the same either way
        difference = max((a - b).abs().max().item() for a, b in zip(_grads(kept, image, text, scale),
                                                                    _grads(detached, image, text, scale)))
        assert difference == 0 if beta == 0 else difference > 1e-3


def test_hn_nce_passes_gradcheck():
    image, text, scale = _inputs(n=5, d=3, seed=16, scale=5.0)
    assert torch.autograd.gradcheck(lambda v, t, s: hn_nce_loss(v, t, s, 0.9, 0.5), (image, text, scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hn_nce_low_precision_at_scale_100_with_near_duplicates(dtype):
    base = _normalised(8, 32, seed=17).repeat_interleave(2, 0)  # pairs 2k, 2k+1 are near-duplicates
    image = F.normalize(base + 1e-3 * _normalised(16, 32, seed=18), dim=-1)
    text = F.normalize(image + 1e-2 * _normalised(16, 32, seed=19), dim=-1)
    # The premise: written naively, exp((1 + beta) l) of these near-duplicate negatives overflows float32.
    assert torch.isinf(torch.exp(1.5 * 100.0 * (image @ text.T).float())).any()
    image, text = image.to(dtype).requires_grad_(), text.to(dtype)
    loss = hn_nce_loss(image, text, 100.0, 0.999, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    expected = hn_nce_loss(image.detach().double(), text.double(), 100.0, 0.999, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.2), "alpha"), (dict(beta=-0.1), "beta"), (dict(n=1), "at least 2"),
])
def test_hn_nce_rejects_bad_arguments(kwargs, match):
    image, text, scale = _inputs(n=kwargs.pop("n", 4), seed=20)
    with pytest.raises(ValueError, match=match):
        hn_nce_loss(image, text, scale, **kwargs)


@pytest.mark.parametrize("loss_fn", [
    lambda v, t, s: psd_loss(v, t, s, 0.4, torch.tensor(MASKS["random"]), detach_targets=False),
    lambda v, t, s: hn_nce_loss(v, t, s, 0.9, 0.5),
], ids=["psd", "hn_nce"])
def test_frozen_text_tower_and_a_one_element_scale(loss_fn):
    image, text, scale = _inputs(seed=23)
    image_grad, scale_grad = _grads(loss_fn(image, text, scale), image, scale)
    # A locked text tower (no gradient wanted) and a logit scale of shape [1] change nothing else.
    scale_1 = scale.detach().reshape(1).requires_grad_()
    frozen_image_grad, frozen_scale_grad = _grads(loss_fn(image, text.detach(), scale_1), image, scale_1)
    torch.testing.assert_close(frozen_image_grad, image_grad, rtol=1e-12, atol=1e-14)
    assert frozen_scale_grad.shape == (1,)
    torch.testing.assert_close(frozen_scale_grad[0], scale_grad, rtol=1e-12, atol=1e-14)


# ---- two gloo ranks against one process -------------------------------------------------------------------

WORLD_SIZE, GLOBAL_BATCH = 2, 8
# Rank 0 holds 3 aligned pairs and rank 1 holds 1: per-rank means would not give the global means.
GLOBAL_MASK = torch.tensor([True, False, True, True, False, False, True, False])
CASES = {
    "psd-swapped": lambda v, t, s, m, mode: psd_loss(v, t, s, 0.4, m, 0.1, "swapped", True, mode),
    "psd-swapped-through-targets": lambda v, t, s, m, mode: psd_loss(v, t, s, 0.4, m, 0.1, "swapped", False, mode),
    "psd-forward": lambda v, t, s, m, mode: psd_loss(v, t, s, 0.7, m, 0.5, "forward", True, mode),
    "hn-nce": lambda v, t, s, m, mode: hn_nce_loss(v, t, s, 0.9, 0.5, False, mode),
    "hn-nce-detached": lambda v, t, s, m, mode: hn_nce_loss(v, t, s, 1.0, 0.25, True, mode),
}


def _run_cases(image, text, mask, mode):
    """{case: (loss, image grad, text grad, scale grad)} for this process's shard."""
    results = {}
    for name, loss_fn in CASES.items():
        image, text = image.detach().requires_grad_(), text.detach().requires_grad_()
        scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(image, text, scale, mask, mode)
        loss.backward()
        results[name] = (loss.item(), image.grad, text.grad, scale.grad)
    return results


def _shard_worker(rank):
    image, text = _normalised(GLOBAL_BATCH, 6, seed=21), _normalised(GLOBAL_BATCH, 6, seed=22)
    shard = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
    return {mode: _run_cases(image[shard], text[shard], GLOBAL_MASK[shard], mode) for mode in ("global", "local")}


def test_two_gloo_ranks_match_single_process(tmp_path):
    ranks = run_on_gloo_ranks(_shard_worker, tmp_path, WORLD_SIZE)
    single = _run_cases(_normalised(GLOBAL_BATCH, 6, seed=21), _normalised(GLOBAL_BATCH, 6, seed=22),
                        GLOBAL_MASK, "none")
    n = GLOBAL_BATCH // WORLD_SIZE
    for name, (loss, image_grad, text_grad, scale_grad) in single.items():
        # global: every rank computes the whole loss; local: the mean over ranks is the whole loss.
        assert all(rank["global"][name][0] == pytest.approx(loss, rel=1e-12) for rank in ranks), name
        assert sum(rank["local"][name][0] for rank in ranks) / WORLD_SIZE == pytest.approx(loss, rel=1e-12), name
        assert ranks[0]["local"][name][0] != pytest.approx(ranks[1]["local"][name][0]), name
        # As for clip_loss: each shard's gradient is W x the single-process one until DDP averages it.
        for mode in ("global", "local"):
            for rank, result in enumerate(ranks):
                shard = slice(rank * n, (rank + 1) * n)
                _, rank_image_grad, rank_text_grad, _ = result[mode][name]
                torch.testing.assert_close(rank_image_grad / WORLD_SIZE, image_grad[shard], rtol=0, atol=1e-10)
                torch.testing.assert_close(rank_text_grad / WORLD_SIZE, text_grad[shard], rtol=0, atol=1e-10)
            scale_grads = [result[mode][name][3] for result in ranks]
            torch.testing.assert_close(sum(scale_grads) / WORLD_SIZE, scale_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prediction", ["swapped", "forward"])
def test_psd_target_diagnostics_match_a_loop_over_rows(prediction):
    """Diagonal mass and normalised entropy of A_v, A_t on the unaligned rows, written out row by row in fp64."""
    torch.manual_seed(0)
    v, t = F.normalize(torch.randn(6, 5), dim=-1), F.normalize(torch.randn(6, 5), dim=-1)
    mask = torch.tensor(MASKS["random"])
    got = psd_target_diagnostics(v, t, mask, teacher_temperature=0.2, prediction=prediction)
    v64, t64 = v.double(), t.double()
    diag, entropy = [], []
    for i in range(6):
        if mask[i]:
            continue
        for queries, keys in ((t64, v64), (v64, t64)) if prediction == "swapped" else ((v64, t64), (t64, v64)):
            row = torch.softmax(queries[i] @ keys.T / 0.2, dim=0)
            diag.append(row[i])
            entropy.append(-(row * row.log()).sum() / math.log(6))
    assert got["psd/target_diag_mass"].item() == pytest.approx(torch.stack(diag).mean().item(), rel=1e-5)
    assert got["psd/target_entropy"].item() == pytest.approx(torch.stack(entropy).mean().item(), rel=1e-5)


def test_psd_target_diagnostics_tell_uniform_from_hard_targets():
    same = F.normalize(torch.ones(8, 4), dim=-1)  # collapsed features: every target row is uniform
    collapsed = psd_target_diagnostics(same, same, torch.zeros(8, dtype=torch.bool))
    assert collapsed["psd/target_diag_mass"].item() == pytest.approx(1 / 8)
    assert collapsed["psd/target_entropy"].item() == pytest.approx(1.0)
    eye = torch.eye(8)  # perfectly aligned, orthogonal pairs at a sharp temperature: one-hot targets
    aligned = psd_target_diagnostics(eye, eye, torch.zeros(8, dtype=torch.bool), teacher_temperature=0.01)
    assert aligned["psd/target_diag_mass"].item() == pytest.approx(1.0, abs=1e-6)
    assert aligned["psd/target_entropy"].item() == pytest.approx(0.0, abs=1e-4)
    every_row_aligned = psd_target_diagnostics(eye, eye, torch.ones(8, dtype=torch.bool))
    assert (every_row_aligned["psd/target_diag_mass"].item(), every_row_aligned["psd/target_entropy"].item()) == (1, 0)
