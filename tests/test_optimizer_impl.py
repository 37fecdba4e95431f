"""`train.optimizer_impl`: the fused and foreach AdamW kernels make the same update as the per-tensor loop,
the trainer builds the one the config names, and a bad name is refused naming the field."""

import pytest
import torch
from torch import nn

from alignlab.config import ConfigError, validate_config
from alignlab.training.optim import GroupRule, build_optimizer


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.proj(self.embed(ids).mean(1)))


def trained(impl: str, steps: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Small()
    optimizer = build_optimizer(model, {"embed.weight", "proj.bias", "head.bias"}, lr=1e-2, weight_decay=0.1,
                                betas=(0.9, 0.98), eps=1e-6, rules=(GroupRule("head", ("head",), 10.0, 0.01),),
                                impl=impl)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(20, (5, 3), generator=generator)
        loss = model(ids).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_kernels_make_the_same_update_as_the_loop(impl):
    reference, got = trained("for_loop"), trained(impl)
    start = {name: p.detach() for name, p in (torch.manual_seed(0), Small())[1].named_parameters()}
    for name in reference:
        assert not torch.equal(reference[name], start[name]), f"{name} did not train"
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-6)


def test_build_optimizer_uses_the_named_kernel():
    model = Small()
    kwargs = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    assert build_optimizer(model, set(), impl="fused", **kwargs).defaults["fused"] is True
    assert build_optimizer(model, set(), impl="foreach", **kwargs).defaults["foreach"] is True
    assert build_optimizer(model, set(), impl="for_loop", **kwargs).defaults["foreach"] is False
    with pytest.raises(ValueError, match="optimizer impl 'adam8bit'"):
        build_optimizer(model, set(), impl="adam8bit", **kwargs)


def test_config_default_is_fused_and_bad_value_names_the_field():
    assert validate_config({}).train.optimizer_impl == "fused"
    with pytest.raises(ConfigError, match="train.optimizer_impl"):
        validate_config({"train": {"optimizer_impl": "sgd"}})


@pytest.mark.parametrize("impl", ["for_loop", "fused"])
def test_trainer_builds_the_configured_kernel(impl, synth_root, tmp_path):
    from conftest import tiny_config_tree

    from alignlab.training.trainer import train

    cfg = validate_config(tiny_config_tree(synth_root, tmp_path, max_steps=3, optimizer_impl=impl))
    train(cfg, tmp_path / "run")
    checkpoints = sorted((tmp_path / "run").rglob("step-*.pt"))
    assert checkpoints, "the run wrote no resumable checkpoint"
    groups = torch.load(checkpoints[-1], weights_only=True)["optimizer"]["param_groups"]
    assert all(bool(group.get("fused")) is (impl == "fused") for group in groups)
