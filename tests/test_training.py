"""Trainer: exact resume, accumulation equivalence, schedule, optimizer groups, atomic checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.config import validate_config
from alignlab.training.checkpoint import atomic_torch_save, latest_checkpoint, list_checkpoints
from alignlab.training.optim import cosine_lr_factor, param_groups, warmup_steps_for
from alignlab.training.trainer import train
from conftest import Crash, crash_at, tiny_config_tree


def _losses(history):
    return [(h["step"], h["loss"]) for h in history]


def test_resume_continues_exactly_like_an_uninterrupted_run(synth_root, tmp_path):
    cfg = validate_config(tiny_config_tree(synth_root, tmp_path, max_steps=8))
    full = train(cfg, tmp_path / "full")
    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", on_metrics=crash_at(5))
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [3]
    resumed = train(cfg, tmp_path / "resumed", resume=True)

    assert _losses(resumed.history) == _losses(full.history)  # same data order, same losses, bit for bit
    assert len(resumed.history) == 8
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_data_workers_do_not_change_the_run(synth_root, tmp_path):
    a = train(validate_config(tiny_config_tree(synth_root, tmp_path, max_steps=3)), tmp_path / "a")
    tree = tiny_config_tree(synth_root, tmp_path, max_steps=3)
    tree["data"]["num_workers"] = 2
    b = train(validate_config(tree), tmp_path / "b")
    assert _losses(a.history) == _losses(b.history)


def test_persistent_workers_across_epochs_and_a_resume_give_the_serial_run(synth_root, tmp_path):
    """One loader with persistent workers serves every epoch (8 steps each here) and a resumed run; the
    losses are those of a serial run. step_time includes the logged wait for the batch."""
    serial = train(validate_config(tiny_config_tree(synth_root, tmp_path, max_steps=10)), tmp_path / "serial")
    tree = tiny_config_tree(synth_root, tmp_path, max_steps=10)
    tree["data"]["num_workers"] = 2
    with pytest.raises(Crash):
        train(validate_config(tree), tmp_path / "workers", on_metrics=crash_at(9))
    resumed = train(validate_config(tree), tmp_path / "workers", resume=True)
    assert _losses(resumed.history) == _losses(serial.history)
    assert all(0 <= h["time/data_wait"] <= h["step_time"] for h in resumed.history)


def test_gradient_accumulation_matches_the_full_batch(synth_root, tmp_path):
    plain = train(validate_config(tiny_config_tree(synth_root, tmp_path, max_steps=3)), tmp_path / "plain")
    accum = train(validate_config(tiny_config_tree(synth_root, tmp_path, max_steps=3, accumulation_steps=4)),
                  tmp_path / "accum")
    for (s1, l1), (s2, l2) in zip(_losses(plain.history), _losses(accum.history)):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), accum.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_training_reduces_the_loss_and_writes_a_final_checkpoint(synth_root, tmp_path):
    result = train(validate_config(tiny_config_tree(synth_root, tmp_path, epochs=3, lr=2e-3)), tmp_path / "r")
    first = sum(h["loss"] for h in result.history[:3]) / 3
    last = sum(h["loss"] for h in result.history[-3:]) / 3
    assert last < first - 0.05, (first, last)
    state = torch.load(tmp_path / "r" / "final.pt", weights_only=True)
    assert state["step"] == result.steps == 3 * (256 // 32)
    assert max(h["logit_scale"] for h in result.history) <= 100.0


def test_cosine_schedule_with_warmup():
    assert warmup_steps_for(0.1, 200) == 20 and warmup_steps_for(5, 200) == 5
    assert cosine_lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert cosine_lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert cosine_lr_factor(60, 10, 110) == pytest.approx(0.5)  # halfway through the cosine
    assert cosine_lr_factor(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr_factor(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_lr_factor(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_no_weight_decay_on_biases_norms_embeddings_and_logit_scale():
    from alignlab.config import ModelConfig
    from alignlab.data.tokenizers import build_tokenizer
    from alignlab.training.builders import model_from_config

    model = model_from_config(ModelConfig(preset="tiny"), build_tokenizer("clip_bpe", context_length=16))
    names = model.no_weight_decay_param_names()
    groups = param_groups(model, 0.1, names)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        embedding = name.split(".")[-1] in {"cls_token", "pos_embed", "positional_embedding"} or (
            name.endswith("token_embedding.weight"))
        assert (id(p) not in decayed) == (p.ndim < 2 or embedding), name
    assert not any("patch_embed.proj.weight" in n for n in names)  # a conv kernel: decayed, like CLIP


def test_atomic_save_never_leaves_a_partial_checkpoint(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    atomic_torch_save({"ok": 1}, tmp_path / "step-00000001.pt")
    with pytest.raises(RuntimeError):
        atomic_torch_save({"bad": Unpicklable()}, tmp_path / "step-00000002.pt")
    assert latest_checkpoint(tmp_path).name == "step-00000001.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.pt"]
