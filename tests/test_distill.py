"""Distillation losses (SPEC 3.2) against implementations written from the equations, the distill /
image-tower config, the optimizer groups of heads and towers, and heads in the model's state dict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignlab.config import ConfigError, ModelConfig, validate_config
from alignlab.data.tokenizers import build_tokenizer
from alignlab.losses import (
    clip_loss,
    distribution_distill_loss,
    embedding_distill_loss,
    keep_top_k,
    soft_target_cross_entropy,
    topk_distribution,
)
from alignlab.training.builders import image_tower_locked_at, model_from_config, param_group_rules
from alignlab.training.optim import param_groups


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


# ------------------------------------------------------------------------------------------------ losses

def test_soft_target_cross_entropy_matches_the_sum_over_classes():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    targets = topk_distribution(torch.randn(5, 7, generator=torch.Generator().manual_seed(2)), k=3)
    expected = 0.0
    for i in range(5):
        denominator = sum(math.exp(z) for z in logits[i].tolist())
        expected += -sum(p * math.log(math.exp(z) / denominator) for p, z in zip(targets[i].tolist(),
                                                                               logits[i].tolist()))
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected / 5, rel=1e-5)
    # one-hot targets: ordinary cross entropy
    hard = torch.tensor([0, 3, 6, 2, 2])
    torch.testing.assert_close(soft_target_cross_entropy(logits, F.one_hot(hard, 7).float()),
                               F.cross_entropy(logits, hard))
    with pytest.raises(ValueError, match="one output per teacher class"):
        soft_target_cross_entropy(logits, targets[:, :5])


def test_keep_top_k_keeps_the_largest_entries_renormalised():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.45, 0.05]])
    out = keep_top_k(probs, 2)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))
    assert out[1, 2] == pytest.approx(0.45 / 0.70) and out[1, 3] == 0.0 and (out[1] > 0).sum() == 2
    assert torch.equal(keep_top_k(probs, 10), probs / probs.sum(-1, keepdim=True))  # k >= K: all classes
    logits = torch.randn(3, 9, generator=torch.Generator().manual_seed(0))
    dist = topk_distribution(logits, 4)
    assert ((dist > 0).sum(-1) == 4).all()
    torch.testing.assert_close(dist.sum(-1), torch.ones(3))
    assert torch.equal(dist > 0, F.one_hot(logits.topk(4).indices, 9).sum(1).bool())


def test_embedding_distillation_is_the_negative_mean_cosine_and_leaves_the_teacher_alone():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, dtype=torch.float64, generator=generator).requires_grad_()
    teacher = torch.randn(6, 5, dtype=torch.float64, generator=generator).requires_grad_()
    expected = -sum(float(s @ t / (s.norm() * t.norm())) for s, t in zip(student.detach(), teacher.detach())) / 6
    value = embedding_distill_loss(student, teacher)
    assert value.item() == pytest.approx(expected, abs=1e-6)  # computed in float32; a mean of cosines in [-1, 1]
    value.backward()
    assert student.grad is not None and teacher.grad is None
    assert embedding_distill_loss(teacher.detach() * 3.0, teacher.detach()).item() == pytest.approx(-1.0)


def _distribution_distill_by_hand(v, t, u, s, lam, temp):
    """Both directions written out: target rows (1-lam) one-hot + lam softmax(u t^T / temp), CE of softmax."""
    n = v.shape[0]

    def direction(queries, keys, teacher_logits):
        total = 0.0
        for i in range(n):
            log_probs = torch.log_softmax(s * queries[i] @ keys.T, dim=0)
            soft = torch.softmax(teacher_logits[i] / temp, dim=0)
            target = (1 - lam) * F.one_hot(torch.tensor(i), n).double() + lam * soft
            total -= float((target * log_probs).sum())
        return total / n

    return 0.5 * (direction(v, t, u @ t.T) + direction(t, v, t @ u.T))


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_distribution_distillation_matches_the_equation(lam):
    v, t, u = _unit(8, 6, seed=1), _unit(8, 6, seed=2), _unit(8, 6, seed=3)
    value = distribution_distill_loss(v, t, 20.0, u, lam=lam, temperature=0.1)
    assert value.item() == pytest.approx(_distribution_distill_by_hand(v, t, u, 20.0, lam, 0.1), rel=1e-6)


def test_distribution_distillation_with_lambda_zero_is_clip_loss_bit_for_bit():
    v = _unit(16, 8, seed=4).float().requires_grad_()
    t = _unit(16, 8, seed=5).float().requires_grad_()
    u = _unit(16, 8, seed=6).float()
    scale = torch.tensor(14.3, requires_grad=True)
    dd = distribution_distill_loss(v, t, scale, u, lam=0.0, temperature=0.05)
    clip = clip_loss(v, t, scale)
    assert torch.equal(dd, clip)
    dd_grads = torch.autograd.grad(dd, (v, t, scale))
    clip_grads = torch.autograd.grad(clip, (v, t, scale))
    for a, b in zip(dd_grads, clip_grads):
        assert torch.equal(a, b)


def test_distribution_distillation_soft_labels_carry_no_gradient_and_bad_arguments_fail():
    v, t = _unit(4, 3, seed=7).requires_grad_(), _unit(4, 3, seed=8).requires_grad_()
    u = _unit(4, 3, seed=9).requires_grad_()
    distribution_distill_loss(v, t, 10.0, u, lam=0.5, temperature=0.1).backward()
    assert u.grad is None and v.grad is not None
    with pytest.raises(ValueError, match="lam=1.5"):
        distribution_distill_loss(v, t, 10.0, u, lam=1.5, temperature=0.1)
    with pytest.raises(ValueError, match="temperature=0"):
        distribution_distill_loss(v, t, 10.0, u, lam=0.5, temperature=0.0)


# ------------------------------------------------------------------------------------------------ config

def _tree(**sections):
    tree = {"model": {"preset": "tiny"}}
    for key, value in sections.items():
        tree[key] = value
    return tree


@pytest.mark.parametrize("tree, message", [
    (_tree(distill={"concepts": {"targets": "objects"}}),
     "distill: Value error, distillation is on but there is no teacher"),
    (_tree(distill={"cache": "auto"}), "cache=auto builds the teacher cache from distill.teacher"),
    (_tree(distill={"teacher_arch": "timm:resnet18"}), "teacher_arch names the architecture"),
    (_tree(distill={"concepts": {"targets": "objects+colours"}, "cache": "c"}), "distill.concepts.targets"),
    (_tree(distill={"concepts": {"k": 0}}), "distill.concepts.k"),
    (_tree(distill={"teacher": "t", "distribution": {"enabled": True}}, loss={"name": "hn_nce"}),
     "distill.distribution mixes soft labels into InfoNCE, but loss.name=hn_nce"),
    (_tree(model={"preset": "tiny", "image": {"mode": "locked"}}), "model.image: Value error, mode=locked"),
    (_tree(model={"preset": "tiny", "image": {"mode": "ft_delay", "pretrained": "b.pth", "delay": 1.0}}),
     "model.image.delay"),
    (_tree(model={"preset": "tiny", "image": {"mode": "frozen", "pretrained": "b.pth"}}), "model.image.mode"),
])
def test_bad_distill_and_image_tower_settings_name_the_field(tree, message):
    with pytest.raises(ConfigError) as err:
        validate_config(tree)
    assert message in str(err.value)


def test_distill_config_defaults_and_needed_targets():
    cfg = validate_config(_tree(distill={"cache": "some/cache", "concepts": {"targets": "objects+attributes"},
                                         "embedding": {"enabled": True}}))
    c = cfg.distill.concepts
    assert (c.k, c.head_lr_scale, c.head_wd_scale) == (10, 10.0, 0.01)
    assert cfg.distill.needed_targets() == ("objects", "attributes", "embedding")
    assert validate_config(_tree()).distill.enabled is False
    image = validate_config(_tree(model={"preset": "tiny", "image": {"mode": "ft", "pretrained": "b.pth"}})).model.image
    assert (image.lr_scale, image.delay, image.name) == (0.01, 0.5, "vit_tiny_patch16_224")  # preset kept


def test_ft_delay_locks_the_tower_for_the_first_fraction_of_steps():
    image = validate_config(_tree(model={"preset": "tiny", "image": {"mode": "ft_delay", "pretrained": "b.pth",
                                                                     "delay": 0.25}})).model.image
    assert [image_tower_locked_at(image, s, 8) for s in range(8)] == [True, True] + [False] * 6
    locked = image.model_copy(update={"mode": "locked"})
    assert all(image_tower_locked_at(locked, s, 8) for s in range(8))
    assert not any(image_tower_locked_at(image.model_copy(update={"mode": "ft"}), s, 8) for s in range(8))


# ------------------------------------------------------------------------------------------------ model / optimizer

def _tiny_model():
    cfg = ModelConfig(preset="tiny", embed_dim=16, image={"kwargs": {"img_size": 32, "patch_size": 8, "depth": 1,
                                                                     "embed_dim": 24, "num_heads": 2}},
                      text={"width": 16, "layers": 1, "heads": 2}, tokenizer={"context_length": 8})
    return model_from_config(cfg, build_tokenizer("clip_bpe", context_length=8))


def test_concept_heads_and_tower_get_their_own_scaled_optimizer_groups():
    model = _tiny_model()
    model.add_heads({"objects": 5, "attributes": 3, "ed_projection": 4})
    cfg = validate_config(_tree(distill={"cache": "c", "concepts": {"targets": "objects+attributes"}},
                                model={"preset": "tiny", "image": {"mode": "ft", "pretrained": "b.pth"}}))
    groups = param_groups(model, 0.2, model.no_weight_decay_param_names(), param_group_rules(cfg), lr=1e-3)
    by_name = {g["name"]: g for g in groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    named = dict(model.named_parameters())
    assert ids["concept_heads/decay"] == {id(named["heads.objects.weight"]), id(named["heads.attributes.weight"])}
    assert ids["concept_heads/no_decay"] == {id(named["heads.objects.bias"]), id(named["heads.attributes.bias"])}
    assert by_name["concept_heads/decay"]["lr"] == pytest.approx(1e-2)
    assert by_name["concept_heads/decay"]["weight_decay"] == pytest.approx(0.2 * 0.01)
    assert by_name["concept_heads/no_decay"]["weight_decay"] == 0.0
    tower = {id(p) for n, p in named.items() if n.startswith("image_tower.")}
    assert ids["image_tower/decay"] | ids["image_tower/no_decay"] == tower
    assert by_name["image_tower/decay"]["lr"] == pytest.approx(1e-5)
    assert by_name["image_tower/decay"]["weight_decay"] == 0.2
    # the ED projection and everything else train at the base rate; every parameter is in exactly one group
    assert id(named["heads.ed_projection.weight"]) in ids["decay"]
    assert "lr" not in by_name["decay"]
    assert sorted(i for g in ids.values() for i in g) == sorted(id(p) for p in named.values())


def test_a_locked_tower_is_frozen_in_eval_mode_and_left_out_of_the_optimizer():
    model = _tiny_model()
    model.set_image_tower_locked(True)
    model.train()
    assert not model.image_tower.training and model.text_tower.training
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    groups = param_groups(model, 0.1, model.no_weight_decay_param_names())
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not in_groups & {id(p) for p in model.image_tower.parameters()}
    assert id(model.image_proj.weight) in in_groups  # the projection into the shared space still trains
    model.set_image_tower_locked(False)
    assert model.image_tower.training and all(p.requires_grad for p in model.image_tower.parameters())


def test_heads_are_saved_and_a_model_rebuilt_for_evaluation_loads_and_ignores_them():
    model = _tiny_model()
    model.add_heads({"objects": 5, "ed_projection": 7})
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 8))
    outputs = model(images, tokens)
    assert outputs["head/objects"].shape == (2, 5) and outputs["head/ed_projection"].shape == (2, 7)
    torch.testing.assert_close(outputs["head/objects"], model.heads["objects"](outputs["image_features"]))
    state = model.state_dict()
    assert {"heads.objects.weight", "heads.objects.bias", "heads.ed_projection.weight"} <= set(state)

    fresh = _tiny_model()  # built from the config alone, as evaluate_checkpoint does
    fresh.load_state_dict(state)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh.encode_image(images), model.encode_image(images))
    torch.testing.assert_close(fresh.heads["objects"].weight, model.heads["objects"].weight)
    with pytest.raises(ValueError, match="already has a head"):
        fresh.add_heads({"objects": 5})


def test_dd_teacher_projection_checks_the_teacher_width():
    from alignlab.training.builders import _teacher_projection

    model = _tiny_model()  # tower width 24, embed_dim 16
    teacher = torch.randn(3, 24)
    projected = _teacher_projection("image_proj", model, 24)(teacher)
    torch.testing.assert_close(projected, F.normalize(model.image_proj(teacher), dim=-1))
    torch.testing.assert_close(_teacher_projection("identity", model, 16)(teacher[:, :16]),
                               F.normalize(teacher[:, :16], dim=-1))
    with pytest.raises(ValueError, match=r"teacher embedding width \(40\) to equal the image tower's \(24\)"):
        _teacher_projection("image_proj", model, 40)
    with pytest.raises(ValueError, match=r"width \(24\) to equal model.embed_dim \(16\)"):
        _teacher_projection("identity", model, 24)
