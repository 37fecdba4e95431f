"""The thesis' student trained end to end with a frozen teacher (SHRe, S-SMKE, CTL with a teacher memory
bank): the KD and multi-layer contrastive terms are logged, the bank resumes bit for bit after a crash, the
student evaluates like any model, and a width mismatch is named."""

from __future__ import annotations

import pytest
import torch

from alignlab.config import ConfigError, validate_config
from alignlab.training.trainer import train
from conftest import KD_TEACHER_KWARGS, crash_and_resume, tiny_config_tree


def _tree(synth_root, tmp_path, teacher_file, knowledge: dict, student: dict, **train_kwargs):
    tree = tiny_config_tree(synth_root, tmp_path, **train_kwargs)
    tree["model"]["image"]["kwargs"]["embed_dim"] = 32  # the shared encoder needs towers of one width
    tree["model"]["student"] = student
    tree["distill"] = {"teacher": str(teacher_file), "teacher_arch": "timm:vit_tiny_patch16_224",
                       "teacher_kwargs": KD_TEACHER_KWARGS, "knowledge": knowledge}
    return tree


@pytest.mark.parametrize("kind,out_dim,shared", [("shre", 7, "mlp"), ("ssmke", 24, "block"), ("ctl", 24, "mlp")])
def test_each_kd_kind_trains_and_logs_its_terms(kind, out_dim, shared, synth_root, tmp_path, teacher_file):
    cfg = validate_config(_tree(synth_root, tmp_path, teacher_file, {"kind": kind},
                                {"shared": shared, "out_dim": out_dim, "heads": 2}, max_steps=3))
    result = train(cfg, tmp_path / "run")
    first, last = result.history[0], result.history[-1]
    assert {f"loss/kd_{kind}", "loss/contrastive"} <= set(last)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert last["loss"] != first["loss"]
    # The student evaluates like any model: unit-norm retrieval vectors from encode_image / encode_text.
    model = result.model.eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.encode_image(images).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_ctl_bank_fills_and_resumes_exactly(synth_root, tmp_path, teacher_file):
    tree = _tree(synth_root, tmp_path, teacher_file, {"kind": "ctl", "bank_size": 48},
                 {"shared": "mlp", "out_dim": 24}, max_steps=6)
    full, _ = crash_and_resume(validate_config(tree), tmp_path)
    bank = full.model.bank
    assert int(bank.filled) == 48 and int(bank.pointer) == (6 * 32) % 48  # 6 batches of 32 through 48 slots


def test_bad_student_settings_are_named(synth_root, tmp_path, teacher_file):
    cfg = validate_config(_tree(synth_root, tmp_path, teacher_file, {"kind": "shre"},
                                {"shared": "mlp", "out_dim": 5}, max_steps=1))
    with pytest.raises(ConfigError, match="model.student.out_dim=5 but the teacher's logits has width 7"):
        train(cfg, tmp_path / "run")
    tree = _tree(synth_root, tmp_path, teacher_file, {"kind": "shre"}, {"out_dim": 7})
    del tree["model"]["student"]
    with pytest.raises(ConfigError, match="set model.student"):
        validate_config(tree)


@pytest.mark.parametrize("kind,out_dim,shared,bank", [("shre", 7, "mlp", 0), ("ssmke", 24, "block", 0),
                                                     ("ctl", 24, "mlp", 48)])
def test_gradient_accumulation_matches_the_full_batch(kind, out_dim, shared, bank, synth_root, tmp_path,
                                                       teacher_file):
    """Micro-batches spliced into the full batch's outputs: the same losses, weights and bank as one pass,
    because every loss still sees the whole batch (CTL's columns: the batch's teacher vectors and the bank's)
    and the bank takes the batch's teacher vectors once per step."""
    def run(accumulation: int):
        knowledge = {"kind": kind, "bank_size": bank}
        student = {"shared": shared, "out_dim": out_dim, "heads": 2, "tte": "after_ls"}
        cfg = validate_config(_tree(synth_root, tmp_path, teacher_file, knowledge, student, max_steps=3,
                                    accumulation_steps=accumulation))
        return train(cfg, tmp_path / f"accum-{accumulation}")

    plain, accum = run(1), run(4)
    for a, b in zip(plain.history, accum.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a[f"loss/kd_{kind}"] == pytest.approx(b[f"loss/kd_{kind}"], rel=1e-5, abs=1e-6)
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), accum.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    if bank:
        assert int(accum.model.bank.filled) == 48 and int(accum.model.bank.pointer) == (3 * 32) % 48


def test_a_trained_student_goes_through_the_evaluation_suite(synth_root, tmp_path, teacher_file):
    from alignlab.experiment import evaluate_checkpoint

    cfg = validate_config(_tree(synth_root, tmp_path, teacher_file, {"kind": "ctl", "bank_size": 16},
                                {"shared": "block", "out_dim": 24, "heads": 2, "tte": "after_ls"}, max_steps=2))
    train(cfg, tmp_path / "run")
    metrics = evaluate_checkpoint(tmp_path / "run" / "final.pt", tmp_path / "eval")  # rebuilt from its config
    assert 0.0 <= metrics["retrieval/text_to_image_R@1"] <= 100.0
    assert 0.0 <= metrics["zeroshot/color/top1"] <= 100.0
