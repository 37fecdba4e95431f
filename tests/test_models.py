"""Models (SPEC section 1): dual encoder contract, text pooling, towers loaded from local checkpoints, presets."""

import math

import pytest
import timm
import torch
from transformers import BertConfig, BertModel

from alignlab.models import (
    HFTextTower,
    ImageTower,
    TextTransformer,
    build_dual_encoder,
    get_preset,
    list_presets,
)

EOT = 49407
TINY_BERT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 32}


def _clip_tokens(lengths, context_length, vocab_size=EOT + 1, seed=0):
    """SOT .. EOT then zero padding, like the CLIP tokenizer; EOT is the largest id in each row."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), context_length, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, : length - 1] = torch.randint(1, vocab_size - 1, (length - 1,), generator=generator)
        tokens[row, length - 1] = vocab_size - 1
    return tokens


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_dual_encoder(**get_preset("tiny")).eval()


def test_tiny_preset_shapes_and_normalisation(tiny_model):
    images = torch.randn(3, 3, 64, 64)
    tokens = _clip_tokens([5, 32, 12], context_length=32)
    out = tiny_model(images, tokens)
    assert out["image_features"].shape == (3, 128) and out["text_features"].shape == (3, 128)
    for features in (out["image_features"], out["text_features"]):
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    raw = tiny_model.encode_text(tokens, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), out["text_features"])
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_logit_scale_is_capped_at_100():
    torch.manual_seed(0)
    model = build_dual_encoder(**get_preset("tiny"))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))
    out = model(torch.randn(2, 3, 64, 64), _clip_tokens([4, 6], context_length=32))
    assert out["logit_scale"].item() == pytest.approx(100.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    with pytest.raises(ValueError, match="init_logit_scale"):
        build_dual_encoder(**get_preset("tiny"), init_logit_scale=200.0)


def test_no_weight_decay_names(tiny_model):
    names = tiny_model.no_weight_decay_param_names()
    params = dict(tiny_model.named_parameters())
    for expected in ("logit_scale", "text_tower.token_embedding.weight", "text_tower.positional_embedding",
                     "image_tower.model.pos_embed", "image_tower.model.cls_token", "text_tower.ln_final.weight",
                     "text_tower.blocks.0.qkv.bias", "image_tower.model.norm.weight",
                     "image_tower.model.blocks.0.attn.qkv.bias"):
        assert expected in names
    for decayed in ("image_proj.weight", "text_proj.weight", "text_tower.blocks.0.qkv.weight",
                    "text_tower.blocks.0.c_fc.weight", "image_tower.model.blocks.0.attn.qkv.weight",
                    "image_tower.model.blocks.0.mlp.fc1.weight", "image_tower.model.patch_embed.proj.weight"):
        assert decayed in params and decayed not in names
    matrices = {name for name in names if params[name].ndim >= 2}
    assert matrices == {"text_tower.token_embedding.weight", "text_tower.positional_embedding",
                        "image_tower.model.pos_embed", "image_tower.model.cls_token"}


def test_eot_pooling_picks_the_eot_position():
    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=EOT + 1, context_length=16, width=32, layers=2, heads=4).eval()
    tokens = _clip_tokens([3, 16, 9], context_length=16)
    hidden = tower.forward_tokens(tokens)
    pooled = tower(tokens)
    for row, eot_position in enumerate([2, 15, 8]):
        torch.testing.assert_close(pooled[row], hidden[row, eot_position])
    # Causal mask: tokens after EOT (padding) cannot change the pooled feature.
    changed = tokens.clone()
    changed[0, 3:] = 7
    torch.testing.assert_close(tower(changed)[0], pooled[0])


def test_first_and_mean_pooling_ignore_padding():
    torch.manual_seed(0)
    first = TextTransformer(vocab_size=50, context_length=8, width=16, layers=1, heads=2, pool="first", causal=False)
    mean = TextTransformer(vocab_size=50, context_length=8, width=16, layers=1, heads=2, pool="mean")
    short, padded = torch.tensor([[5, 6, 7]]), torch.tensor([[5, 6, 7, 0, 0]])
    for tower in (first, mean):
        torch.testing.assert_close(tower(short), tower(padded))
    hidden = mean.forward_tokens(padded)
    torch.testing.assert_close(mean(padded)[0], hidden[0, :3].mean(dim=0))
    with pytest.raises(ValueError, match="causal=False"):
        TextTransformer(pool="first")


@pytest.mark.parametrize("pool,causal", [("eot", True), ("mean", True), ("first", False), ("mean", False)])
def test_trailing_padding_is_not_computed_and_changes_nothing(pool, causal):
    """The tower drops the columns that are padding in every row (a speed-up); features and gradients are
    those of the full-length forward."""
    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=100, context_length=16, width=16, layers=2, heads=2, pool=pool,
                            causal=causal).double()  # float64: the comparison sees no summation-order rounding
    tokens = _clip_tokens([4, 7, 5], context_length=16, vocab_size=100)
    seen = []
    tower.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    pooled = tower(tokens)
    assert seen == [7]
    hidden = tower.forward_tokens(tokens)  # all 16 columns
    keep = (tokens != 0).unsqueeze(-1).double()
    reference = {"eot": hidden[torch.arange(3), tokens.argmax(dim=-1)], "first": hidden[:, 0],
                 "mean": (hidden * keep).sum(1) / keep.sum(1)}[pool]
    torch.testing.assert_close(pooled, reference)
    weights = torch.randn_like(pooled)
    (pooled * weights).sum().backward()
    trimmed_grads = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    (reference * weights).sum().backward()
    for trimmed, param in zip(trimmed_grads, tower.parameters()):
        torch.testing.assert_close(trimmed, param.grad)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=100, context_length=8, width=16, layers=2, heads=2)
    tokens = _clip_tokens([4, 8], context_length=8, vocab_size=100)
    tower(tokens).sum().backward()
    plain = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    tower.set_grad_checkpointing(True)
    tower(tokens).sum().backward()
    for grad, param in zip(plain, tower.parameters()):
        torch.testing.assert_close(param.grad, grad)


def test_image_tower_loads_local_timm_checkpoint(tmp_path):
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1}
    source = timm.create_model("vit_tiny_patch16_224", **kwargs)  # with its 1000-class head
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    tower = ImageTower("vit_tiny_patch16_224", pretrained=str(path), **kwargs)
    expected = {name: value for name, value in source.state_dict().items() if not name.startswith("head.")}
    loaded = tower.model.state_dict()
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    assert tower.num_features == 192 and tower(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    # timm's ViT filter resamples the position embedding for another image size.
    bigger = ImageTower("vit_tiny_patch16_224", pretrained=path, img_size=64, patch_size=8, depth=1)
    assert bigger.model.pos_embed.shape == (1, 65, 192)
    assert torch.equal(bigger.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_image_tower_checkpoint_errors(tmp_path):
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1}
    state = timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict()
    del state["blocks.0.attn.qkv.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.qkv.weight'\]"):
        ImageTower("vit_tiny_patch16_224", pretrained=path, **kwargs)
    with pytest.raises(ValueError, match="does not fit"):
        ImageTower("vit_tiny_patch16_224", pretrained=path, img_size=32, patch_size=8, depth=1, embed_dim=96)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ImageTower("vit_tiny_patch16_224", pretrained=tmp_path / "missing.pth", **kwargs)


def test_hf_text_tower_loads_local_bert(tmp_path):
    torch.manual_seed(0)
    source = BertModel(BertConfig(**TINY_BERT))
    source.save_pretrained(tmp_path / "bert")
    tower = HFTextTower(str(tmp_path / "bert"))
    loaded = tower.model.state_dict()
    expected = {name: value for name, value in source.state_dict().items() if not name.startswith("pooler.")}
    assert loaded.keys() == expected.keys()  # the unused pooler is dropped
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    tokens = torch.tensor([[2, 5, 9, 3, 0, 0], [2, 7, 3, 0, 0, 0]])
    source.eval(), tower.eval()
    reference = source(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
    torch.testing.assert_close(tower(tokens), reference[:, 0])
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HFTextTower(str(tmp_path / "nowhere"))


def test_hf_text_tower_from_config_with_mean_pooling():
    torch.manual_seed(0)
    tower = HFTextTower(TINY_BERT, pool="mean").eval()
    assert tower.num_features == 32
    short, padded = torch.tensor([[2, 5, 9, 3]]), torch.tensor([[2, 5, 9, 3, 0, 0]])
    torch.testing.assert_close(tower(short), tower(padded))
    model = build_dual_encoder(embed_dim=16, image={"name": "resnet18"}, text={"kind": "hf", "source": TINY_BERT})
    out = model(torch.randn(2, 3, 32, 32), padded.repeat(2, 1))
    assert out["image_features"].shape == out["text_features"].shape == (2, 16)


def test_clear_errors_for_bad_names_and_fields():
    with pytest.raises(ValueError, match="not a timm model"):
        ImageTower("vit_nonexistent_patch3")
    with pytest.raises(ValueError, match="unknown model preset 'vit-z'.*tiny"):
        get_preset("vit-z")
    preset = get_preset("tiny")
    with pytest.raises(ValueError, match=r"unknown text .* field\(s\) \['depth'\]"):
        build_dual_encoder(**{**preset, "text": {**preset["text"], "depth": 3}})
    with pytest.raises(ValueError, match="text kind"):
        build_dual_encoder(**{**preset, "text": {"kind": "gpt"}})


def test_every_preset_builds_and_vit_b_32_matches_clip_size():
    assert {"tiny", "vit-b-32", "vit-b-16", "vit-l-14"} <= set(list_presets())
    counts = {}
    for name in list_presets():
        with torch.device("meta"):  # shapes only: no memory, no init cost
            counts[name] = sum(p.numel() for p in build_dual_encoder(**get_preset(name)).parameters())
    assert counts["vit-b-32"] == pytest.approx(151.3e6, rel=0.02)  # CLIP ViT-B/32 (PSD supplement Table 3)
    assert counts["vit-l-14"] == pytest.approx(427.6e6, rel=0.02)  # CLIP ViT-L/14
