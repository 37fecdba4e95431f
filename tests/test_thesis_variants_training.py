"""The thesis' dropped variants trained end to end with a frozen teacher: the momentum encoder + queues, the
student memory bank and image-text matching. Their state (EMA weights, queues, banks, ITM heads) resumes bit
for bit after a crash, `itm/acc` is logged, the memory bank's collapse shows in the collapse statistics, a
trained model evaluates without its training-only modules, and bad settings are named."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.config import ConfigError, validate_config
from alignlab.training.trainer import train
from conftest import KD_TEACHER_KWARGS, crash_and_resume, tiny_config_tree


def _config(synth_root, tmp_path, teacher_file, knowledge: dict, **train_kwargs):
    tree = tiny_config_tree(synth_root, tmp_path, **train_kwargs)
    tree["model"]["image"]["kwargs"]["embed_dim"] = 32  # the shared encoder needs towers of one width
    tree["model"]["text"].update(pool="first", causal=False)  # the block reads token 0: it must see the caption
    tree["model"]["student"] = {"shared": "block", "out_dim": 24, "heads": 2, "tte": "after_ls"}
    tree["distill"] = {"teacher": str(teacher_file), "teacher_arch": "timm:vit_tiny_patch16_224",
                       "teacher_kwargs": KD_TEACHER_KWARGS, "knowledge": {"kind": "ssmke", **knowledge}}
    return validate_config(tree)


def test_momentum_encoder_queue_and_itm_train_and_resume_exactly(synth_root, tmp_path, teacher_file):
    cfg = _config(synth_root, tmp_path, teacher_file, {"momentum": {"enabled": True, "m": 0.9, "queue_size": 80},
                                                       "itm": {"negatives": "hard", "dim": 8}}, max_steps=6)
    full, _ = crash_and_resume(cfg, tmp_path)
    model = full.model
    encoder = model.momentum_encoder
    assert int(encoder.text_queue.filled) == 80 and int(encoder.text_queue.pointer) == (6 * 32) % 80
    # The copy trails the student: an EMA, neither frozen at the start nor equal to the student.
    student = dict(model.named_parameters())
    for name, param in encoder.model.named_parameters():
        assert not param.requires_grad and name in student
    moved = [name for name, p in encoder.model.named_parameters() if not torch.equal(p, student[name])]
    assert "shared.fc1.weight" in moved
    assert {"loss/contrastive", "loss/kd_ssmke", "loss/itm", "itm/acc"} <= set(full.history[-1])
    assert all(0.0 <= h["itm/acc"] <= 100.0 for h in full.history)  # percent, as the thesis' Fig. 22
    # 2 heads x 3B = 192 fused pairs a step: the accuracy is a multiple of 100/192.
    assert all(abs(h["itm/acc"] * 1.92 - round(h["itm/acc"] * 1.92)) < 1e-3 for h in full.history)
    assert "h1" in model.itm and "h2" in model.itm


def test_student_memory_bank_fills_per_layer_and_resumes_exactly(synth_root, tmp_path, teacher_file):
    cfg = _config(synth_root, tmp_path, teacher_file, {"student_bank_size": 96}, max_steps=6)
    model = crash_and_resume(cfg, tmp_path)[0].model
    assert set(model.student_bank) == {"h1_image", "h1_text", "h2_image", "h2_text"}
    assert model.student_bank["h1_image"].queue.shape == (96, 128)  # h' is the block's FFN width, 4 x 32
    assert all(int(bank.filled) == 96 for bank in model.student_bank.values())


def test_the_student_memory_bank_collapses_where_the_plain_batch_does_not(synth_root, tmp_path, teacher_file):
    """Thesis Table 21: with stale student vectors as most negatives, the student gives up telling pairs apart.
    The logged metrics show it: InfoNCE sits at ln(B + U), the loss of a uniform guess over batch and bank, and
    the batch's text and image vectors point one way (mean pairwise cosine near 1); the plain batch's do not."""
    batch, bank_size, last = 32, 96, {}
    for name, bank in (("plain", 0), ("bank", bank_size)):
        cfg = _config(synth_root, tmp_path, teacher_file, {"student_bank_size": bank}, max_steps=40, lr=5e-4)
        tail = train(cfg, tmp_path / name).history[-8:]
        last[name] = {key: sum(h[key] for h in tail) / len(tail)
                      for key in ("loss/contrastive", "collapse/image_mean_cos", "collapse/text_mean_cos")}
    collapsed, plain = last["bank"], last["plain"]
    assert collapsed["loss/contrastive"] == pytest.approx(math.log(batch + bank_size), rel=0.01), last
    assert min(collapsed["collapse/image_mean_cos"], collapsed["collapse/text_mean_cos"]) > 0.99, last
    assert plain["collapse/text_mean_cos"] < 0.98 and plain["loss/contrastive"] < math.log(batch) + 0.05, last


def test_a_student_trained_with_every_variant_evaluates_without_them(synth_root, tmp_path, teacher_file):
    from alignlab.training.run_model import load_run_model

    cfg = _config(synth_root, tmp_path, teacher_file, {"momentum": {"enabled": True, "queue_size": 40},
                                                       "itm": {"negatives": "random"}}, max_steps=2)
    train(cfg, tmp_path / "run")
    _, model, _ = load_run_model(tmp_path / "run" / "final.pt")
    assert model.momentum_encoder is None and model.itm is None
    assert torch.allclose(model.encode_text(torch.randint(3, 50, (2, 16))).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_bad_variant_settings_are_named(synth_root, tmp_path, teacher_file):
    with pytest.raises(ConfigError, match="distill.knowledge.momentum.m"):
        _config(synth_root, tmp_path, teacher_file, {"momentum": {"enabled": True, "m": 1.0}})
    with pytest.raises(ConfigError, match="distill.knowledge.itm.negatives"):
        _config(synth_root, tmp_path, teacher_file, {"itm": {"negatives": "semi-hard"}})
    with pytest.raises(ConfigError, match="distill.knowledge.student_bank_size"):
        _config(synth_root, tmp_path, teacher_file, {"student_bank_size": -1})
    with pytest.raises(ConfigError, match="itm.negatives change the thesis' student objective, but kind=off"):
        _config(synth_root, tmp_path, teacher_file, {"kind": "off", "itm": {"negatives": "random"}})
    with pytest.raises(ConfigError, match="choose one"):
        _config(synth_root, tmp_path, teacher_file, {"student_bank_size": 8, "momentum": {"enabled": True}})
    with pytest.raises(ConfigError, match="distill.knowledge.momentum needs it at 1"):  # EMA per micro-batch
        _config(synth_root, tmp_path, teacher_file, {"momentum": {"enabled": True}}, accumulation_steps=2)
