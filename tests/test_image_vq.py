"""Image VQ (thesis Eq 86-90): the cosine codebook (nearest code by cosine, straight-through gradient, EMA
update written out by hand, unused codes kept), the loss against its equation, usage statistics, and a
training run that logs them, resumes bit for bit after a crash (codebook included) and evaluates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignlab.config import ConfigError, validate_config
from alignlab.losses import image_vq_loss
from alignlab.models.image_vq import CosineCodebook, codebook_usage
from alignlab.training.task_builders import task_model_from_config
from alignlab.training.trainer import train
from conftest import TINY_VIT, crash_and_resume, tiny_config_tree


def test_the_codebook_picks_by_cosine_passes_gradients_straight_through_and_moves_by_ema():
    book = CosineCodebook(3, 2, decay=0.9)
    with torch.no_grad():
        book.codes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        book.code_sum.copy_(book.codes)
    z = torch.tensor([[10.0, 1.0], [0.1, 0.2], [3.0, 0.5]], requires_grad=True)  # L2 would pick code 1 for row 1
    book.train()
    quantized, code, indices = book(z)
    assert indices.tolist() == [0, 1, 0]
    unit = F.normalize(z.detach(), dim=-1)
    assert torch.allclose(quantized, code)  # the forward value is the code ...
    (quantized * torch.tensor([[1.0, 2.0]])).sum().backward()  # ... the gradient that of delta(z)
    want = torch.autograd.functional.vjp(lambda x: F.normalize(x, dim=-1), z.detach(),
                                         torch.tensor([[1.0, 2.0]]).expand(3, 2))[1]
    assert torch.allclose(z.grad, want)
    # EMA: sum_0 <- 0.9 sum_0 + 0.1 (u_0 + u_2); code 0 = its direction; code 2 (not chosen) unchanged
    expected = F.normalize(0.9 * torch.tensor([1.0, 0.0]) + 0.1 * (unit[0] + unit[2]), dim=0)
    assert torch.allclose(book.codes[0], expected) and torch.equal(book.codes[2], torch.tensor([-1.0, 0.0]))
    assert torch.allclose(book.cluster_size, torch.tensor([0.2, 0.1, 0.0]))
    book.eval()
    before = book.codes.clone()
    book(z.detach())
    assert torch.equal(book.codes, before)  # evaluation never moves the codes


def test_the_vq_loss_and_usage_follow_their_definitions():
    torch.manual_seed(0)
    d, c, z, q = (torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64),
                  torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    reconstruction, commitment = image_vq_loss(d, c, z, q)
    cos = [float(d[i] @ c[i] / (d[i].norm() * c[i].norm())) for i in range(4)]
    assert reconstruction.item() == pytest.approx(sum(1 - x for x in cos) / 4, rel=1e-6)
    diffs = [float(((z[i] / z[i].norm() - q[i] / q[i].norm()) ** 2).sum()) for i in range(4)]
    assert commitment.item() == pytest.approx(sum(diffs) / 4, rel=1e-6)
    usage = codebook_usage(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 8)
    assert usage == {"perplexity": pytest.approx(4.0), "usage": 0.5}
    assert codebook_usage(torch.tensor([5, 5, 5]), 8)["perplexity"] == pytest.approx(1.0)


def vq_tree(synth_root, tmp_path, teacher, **train_kwargs) -> dict:
    tree = tiny_config_tree(synth_root, tmp_path, **train_kwargs)
    tree["vq"] = {"teacher": str(teacher), "teacher_arch": "timm:vit_tiny_patch16_224", "teacher_kwargs": TINY_VIT,
                  "codebook_size": 16, "code_dim": 4, "patch_size": 8, "decoder_heads": 2}
    return tree


def test_vq_trains_logs_usage_and_resumes_bit_for_bit(synth_root, tmp_path, vit_teacher):
    cfg = validate_config(vq_tree(synth_root, tmp_path, vit_teacher, max_steps=6))
    full, _ = crash_and_resume(cfg, tmp_path, keys=("step", "loss", "vq/perplexity"))
    last = full.history[-1]
    assert {"loss/vq_reconstruction", "loss/vq_commitment", "vq/perplexity", "vq/usage"} <= set(last)
    assert 1.0 <= last["vq/perplexity"] <= 16 and 0 < last["vq/usage"] <= 1
    assert {"codebook.codes", "codebook.code_sum", "codebook.cluster_size"} <= set(full.model.state_dict())
    fresh = task_model_from_config(cfg)
    assert not torch.equal(fresh.codebook.code_sum, full.model.codebook.code_sum)  # the EMA moved the codes

def test_a_vq_run_evaluates_val_loss_and_codebook_usage(synth_root, tmp_path, vit_teacher):
    from alignlab.experiment import evaluate_checkpoint

    train(validate_config(vq_tree(synth_root, tmp_path, vit_teacher, max_steps=2)), tmp_path / "run")
    metrics = evaluate_checkpoint(tmp_path / "run" / "final.pt", tmp_path / "eval")
    assert set(metrics) == {"vq/val_loss", "vq/val_reconstruction", "vq/val_perplexity", "vq/val_usage"}
    assert metrics["vq/val_loss"] >= metrics["vq/val_reconstruction"] >= 0
    assert 1 <= metrics["vq/val_perplexity"] <= 16 and math.isfinite(metrics["vq/val_loss"])
    again = evaluate_checkpoint(tmp_path / "run" / "final.pt", tmp_path / "eval2")
    assert again == metrics  # fixed val masks: one number per checkpoint


def test_bad_vq_settings_are_named(synth_root, tmp_path, vit_teacher):
    tree = vq_tree(synth_root, tmp_path, vit_teacher)
    for field, value in (("codebook_size", 1), ("decay", 1.0), ("mask_ratio", 1.0)):
        with pytest.raises(ConfigError, match=f"vq.{field}"):
            validate_config(tree | {"vq": tree["vq"] | {field: value}})
    with pytest.raises(ConfigError, match="two different training tasks"):
        validate_config(tree | {"unimodal": {"modality": "image", "teacher": "x"}})
    odd = tree | {"vq": tree["vq"] | {"patch_size": 5}}
    with pytest.raises(ValueError, match="vq.patch_size=5 does not divide data.image_size=32"):
        train(validate_config(odd), tmp_path / "odd")
