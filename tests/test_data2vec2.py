"""The Data2Vec 2.0 image encoder: a fairseq-format checkpoint (tiny, made here) loads through the image
tower with no missing or unexpected keys, its first k blocks included, and the post-LN blocks compute what
fairseq's AltBlock(layer_norm_first=False) computes."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from alignlab.models.data2vec2 import KEY_MAP, PREFIX, Data2Vec2ImageEncoder
from alignlab.models.towers import ImageTower

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}


def _fairseq_checkpoint(model: Data2Vec2ImageEncoder) -> dict:
    """The model's weights under fairseq's keys, with what a real checkpoint also holds (decoder, EMA)."""
    ours_to_fairseq = {ours: PREFIX + theirs for theirs, ours in KEY_MAP.items()}
    state = {}
    for key, value in model.state_dict().items():
        if key == "cls_token":
            value = value[0]  # fairseq's extra_tokens is [1, 1, D]; a squeezed [1, D] copy must load too
        state[ours_to_fairseq.get(key, key)] = value
    state[PREFIX + "decoder.proj.weight"] = torch.zeros(3, 3)
    state["_ema"] = torch.zeros(1)
    return {"model": state}


def test_post_ln_block_is_fairseqs_altblock():
    torch.manual_seed(0)
    model = Data2Vec2ImageEncoder(**TINY).double().eval()
    block = model.blocks[0]
    x = torch.randn(2, 5, 32, dtype=torch.float64)

    def ln(t, norm):
        return torch.nn.functional.layer_norm(t, (32,), norm.weight, norm.bias, 1e-6)

    q, k, v = block.attn.qkv(x).split(32, dim=-1)
    heads = []
    for h in range(2):
        cols = slice(16 * h, 16 * (h + 1))
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(16), dim=-1)
        heads.append(weights @ v[..., cols])
    y = ln(x + block.attn.proj(torch.cat(heads, -1)), block.norm1)
    want = ln(y + block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(y))), block.norm2)
    torch.testing.assert_close(block(x), want)


@pytest.mark.parametrize("blocks,selection,kept", [(None, "first", [0, 1, 2, 3]), (2, "first", [0, 1]),
                                                   (2, "every_other", [1, 3])])
def test_fairseq_checkpoint_loads_through_the_image_tower(tmp_path, blocks, selection, kept):
    torch.manual_seed(1)
    source = Data2Vec2ImageEncoder(**TINY).eval()
    path = tmp_path / "base_imagenet.pt"
    torch.save(_fairseq_checkpoint(source), path)
    tower = ImageTower("data2vec2_vit_base_patch16", pretrained=str(path), blocks=blocks, block_selection=selection,
                       **TINY).eval()  # load_timm_checkpoint refuses any missing or unexpected key
    source.blocks = torch.nn.Sequential(*[source.blocks[i] for i in kept])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), source(images))
        assert tower.model.forward_features(images).shape == (2, 1 + 16, 32)
    assert tower.num_features == 32


def test_hub_weights_and_heads_are_refused():
    with pytest.raises(ValueError, match="not on the timm hub"):
        timm.create_model("data2vec2_vit_base_patch16", pretrained=True)
    with pytest.raises(ValueError, match="num_classes must be 0"):
        Data2Vec2ImageEncoder(num_classes=10, **TINY)
