"""Target cross-modal late interaction (thesis Eq 71-77): the loss against an fp64 reference written token by
token from the equations, in both forms (the default stops the gradient on the teacher side and normalises
in g-space; `literal` lets g shrink), and the student trained with it end to end."""

from __future__ import annotations

import pytest
import torch

from alignlab.config import ConfigError, validate_config
from alignlab.losses import tcmli_loss
from alignlab.training.trainer import train
from test_thesis_training import _tree


def reference(image, text, keep, teacher, weight, normalized: bool) -> tuple[float, float]:
    """Eq 71-77 in fp64 with loops: image MSE over patches and channels; per kept text token the argmax-cosine
    patch in g-space, its squared distance; means over the kept tokens."""
    image_terms = [((image[b, n] - teacher[b, n]) ** 2).mean() for b in range(image.shape[0])
                   for n in range(1, image.shape[1])]
    text_terms = []
    for b in range(text.shape[0]):
        patches = [teacher[b, n] @ weight.T for n in range(1, teacher.shape[1])]
        for z in range(text.shape[1]):
            if not keep[b, z]:
                continue
            s = text[b, z] @ weight.T
            cosines = [float(s @ p / (s.norm() * p.norm())) for p in patches]
            t = patches[max(range(len(cosines)), key=cosines.__getitem__)]
            if normalized:
                s, t = s / s.norm(), t / t.norm()
            text_terms.append(((s - t) ** 2).sum())
    return float(sum(image_terms) / len(image_terms)), float(sum(text_terms) / len(text_terms))


@pytest.mark.parametrize("form", ["normalized", "literal"])
def test_tcmli_matches_the_equations_in_fp64(form):
    torch.manual_seed(0)
    image, teacher = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    text = torch.randn(2, 4, 6, dtype=torch.float64)
    keep = torch.tensor([[False, True, True, False], [False, True, False, False]])
    g = torch.nn.Linear(6, 3, bias=False).double()
    image_loss, text_loss = tcmli_loss(image, text, keep, teacher, g, form=form)
    want = reference(image, text, keep, teacher, g.weight.detach(), form == "normalized")
    assert (image_loss.item(), text_loss.item()) == pytest.approx(want, rel=1e-10)


def test_only_the_literal_form_lets_g_learn_from_the_teacher_side():
    torch.manual_seed(1)
    image, teacher, text = torch.randn(2, 5, 6), torch.randn(2, 5, 6), torch.randn(2, 4, 6)
    keep = torch.ones(2, 4, dtype=torch.bool)
    grads = {}
    for form in ("normalized", "literal"):
        g = torch.nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            g.weight.copy_(torch.arange(18.0).view(3, 6) / 18)
        text_leaf = text.clone().requires_grad_()
        tcmli_loss(image, text_leaf, keep, teacher, g, form=form)[1].backward()
        grads[form] = g.weight.grad.clone()
    # literal: shrinking g shrinks the loss (the collapse the default prevents); normalised: scale-free
    assert (grads["literal"] * torch.arange(18.0).view(3, 6) / 18).sum() > 0
    assert abs(float((grads["normalized"] * torch.arange(18.0).view(3, 6)).sum())) < 1e-4
    with pytest.raises(ValueError, match="form='cosine'"):
        tcmli_loss(image, text, keep, teacher, g, form="cosine")
    with pytest.raises(ValueError, match="one shape"):
        tcmli_loss(image[:, :3], text, keep, teacher, g)


def test_tcmli_trains_the_block_student_and_logs_both_terms(synth_root, tmp_path, teacher_file):
    tree = _tree(synth_root, tmp_path, teacher_file, {"kind": "tcmli", "tcmli_dim": 8},
                 {"shared": "block", "out_dim": 24, "heads": 2}, max_steps=3)
    result = train(validate_config(tree), tmp_path / "run")
    last = result.history[-1]
    assert {"loss/kd_image", "loss/kd_text", "loss/contrastive"} <= set(last)
    assert result.model.tcmli.weight.shape == (8, 24) and result.model.tcmli.weight.grad is None  # zeroed: trained
    text = torch.tensor([[49406, 320, 1125, 49407, 0, 0]])
    out = result.model.eval()(torch.randn(1, 3, 32, 32), text)
    assert out["text_keep"].tolist() == [[False, True, True, False, False, False]]


def test_bad_tcmli_settings_are_named(synth_root, tmp_path, teacher_file):
    tree = _tree(synth_root, tmp_path, teacher_file, {"kind": "tcmli"}, {"shared": "mlp", "out_dim": 24})
    with pytest.raises(ConfigError, match="set model.student.shared=block"):
        validate_config(tree)
    tree = _tree(synth_root, tmp_path, teacher_file, {"kind": "tcmli", "tcmli_form": "cos"},
                 {"shared": "block", "out_dim": 24, "heads": 2})
    with pytest.raises(ConfigError, match="distill.knowledge.tcmli_form"):
        validate_config(tree)
    tree["distill"]["knowledge"] = {"kind": "tcmli"}
    tree["distill"]["cache"] = "auto"
    with pytest.raises(ConfigError, match="no cache holds"):
        validate_config(tree)
