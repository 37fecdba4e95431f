"""Students that start from the first k (or every other) layers of a pretrained tower (the thesis, section
3.1.1.1): a timm ViT checkpoint and a transformers BERT folder, loaded with no missing or unexpected keys and
giving what the first layers of the full model give."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import BertConfig, BertModel

from alignlab.config import validate_config
from alignlab.models.towers import HFTextTower, ImageTower, kept_layers
from alignlab.training import builders

VIT = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT).state_dict(), path)
    return path


@pytest.mark.parametrize("selection,kept", [("first", [0, 1]), ("every_other", [1, 3])])
def test_vit_keeps_the_chosen_blocks_of_the_checkpoint(vit_checkpoint, selection, kept):
    tower = ImageTower("vit_tiny_patch16_224", pretrained=str(vit_checkpoint), blocks=2, block_selection=selection,
                       **VIT).eval()
    full = timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT).eval()
    full.load_state_dict(torch.load(vit_checkpoint))
    full.blocks = torch.nn.Sequential(*[full.blocks[i] for i in kept])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), full(images))
    assert len(tower.model.blocks) == 2


def test_bert_keeps_its_first_layers(tmp_path):
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=16)).save_pretrained(tmp_path / "bert")
    tower = HFTextTower(tmp_path / "bert", pool="first", layers=2).eval()
    full = BertModel.from_pretrained(tmp_path / "bert").eval()
    tokens = torch.randint(1, 50, (3, 10))
    with torch.no_grad():
        want = full(input_ids=tokens, attention_mask=torch.ones_like(tokens), output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(tower(tokens), want[:, 0])
    every_other = HFTextTower(tmp_path / "bert", pool="first", layers=2, layer_selection="every_other")
    for mine, theirs in zip(every_other.model.encoder.layer, [full.encoder.layer[1], full.encoder.layer[3]]):
        for a, b in zip(mine.parameters(), theirs.parameters()):
            assert torch.equal(a, b)
    assert every_other.model.config.num_hidden_layers == 2


def test_config_builds_a_first_k_student(vit_checkpoint):
    cfg = validate_config({"model": {"preset": None, "embed_dim": 16,
                                     "image": {"name": "vit_tiny_patch16_224", "pretrained": str(vit_checkpoint),
                                               "kwargs": VIT, "blocks": 2},
                                     "text": {"width": 32, "layers": 1, "heads": 2},
                                     "tokenizer": {"context_length": 16}},
                           "data": {"image_size": 32}})
    tokenizer = builders.tokenizer_from_config(cfg.model)
    model = builders.model_from_config(cfg.model, tokenizer)
    assert len(model.image_tower.model.blocks) == 2


def test_bad_layer_counts_are_named():
    assert kept_layers(12, 6, "every_other") == [1, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError, match="cannot keep 3 layers \\(every_other\\) of a 4-layer checkpoint"):
        kept_layers(4, 3, "every_other")
    with pytest.raises(ValueError, match="hub weights"):
        ImageTower("vit_tiny_patch16_224", pretrained=True, blocks=2, **VIT)
