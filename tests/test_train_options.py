"""Speed options users of open_clip expect (train.compile, train.channels_last, precision amp_bf16 on CPU): each
trains, is really in effect, and resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.config import validate_config
from alignlab.training.trainer import train
from conftest import Crash, crash_at, tiny_config_tree

OPTIONS = {"channels_last": {"channels_last": True}, "amp_bf16": {"precision": "amp_bf16"},
           "compile": {"compile": True}}


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_trains_and_resumes_exactly(option, synth_root, tmp_path, monkeypatch):
    compiled = []
    if option == "compile":
        # inductor's C++ build takes minutes on 2 shared cores; aot_eager runs the same dynamo capture and
        # AOT-autograd graphs, without the code generation
        real_compile = torch.compile

        def recording_compile(model, **kwargs):
            compiled.append(model)
            return real_compile(model, backend="aot_eager")
        monkeypatch.setattr(torch, "compile", recording_compile)
    tree = tiny_config_tree(synth_root, tmp_path, max_steps=5, checkpoint_every=2, **OPTIONS[option])
    eager = train(validate_config(tiny_config_tree(synth_root, tmp_path, max_steps=5)), tmp_path / "eager")
    if option == "compile":
        full = eager  # the compiled run must reproduce the eager one (aot_eager: the same aten ops)
    else:
        full = train(validate_config(tree), tmp_path / "full")
    with pytest.raises(Crash):
        train(validate_config(tree), tmp_path / "resumed", on_metrics=crash_at(3))
    resumed = train(validate_config(tree), tmp_path / "resumed", resume=True)

    assert all(math.isfinite(loss) for loss in _losses(resumed))
    if option == "compile":
        assert len(compiled) == 2  # both the crashed and the resumed run compiled the model
        assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-5)
    else:
        assert _losses(resumed) == _losses(full)  # exact resume under the option
    if option == "amp_bf16":  # autocast is in effect: close to fp32, not equal to it
        assert _losses(resumed) != _losses(eager)
        assert _losses(resumed) == pytest.approx(_losses(eager), rel=0.02)
    if option == "channels_last":
        patch = resumed.model.image_tower.model.patch_embed.proj.weight
        assert patch.is_contiguous(memory_format=torch.channels_last) and not patch.is_contiguous()
        assert _losses(resumed) == pytest.approx(_losses(eager), rel=1e-4)
    assert _losses(resumed)[-1] < _losses(resumed)[0]  # it trains
