"""Unimodal layer-averaged distillation (thesis Eq 36-41): the public target function against an fp64 reference
written from the equation, the text options, and the image-only and text-only training tasks end to end
(the student starts as the teacher's first blocks, the KD loss is logged and falls, bad settings are named)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from alignlab.config import ConfigError, validate_config
from alignlab.losses import layer_averaged_kd_loss, layer_averaged_target
from alignlab.training.task_builders import task_model_from_config
from alignlab.training.trainer import train
from conftest import TINY_VIT, tiny_config_tree

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "left", "right", "of", "the", "photo", "small",
         "large", "and", "above", "below", "next", "to", "yellow", "purple", "star", "cross", "big"]


def reference_target(layers: list[torch.Tensor], final_ln: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """Eq 36-41 written out in fp64: per layer, per sample and channel, (h - mean_T) / sqrt(var_T + eps); the
    mean over layers; then per token (y - mean_D) / sqrt(var_D + eps) (biased variances)."""
    normed = []
    for h in layers:
        h = h.double()
        mean = h.mean(dim=1, keepdim=True)
        var = ((h - mean) ** 2).mean(dim=1, keepdim=True)
        normed.append((h - mean) / torch.sqrt(var + eps))
    y = sum(normed) / len(normed)
    if not final_ln:
        return y
    mean = y.mean(dim=-1, keepdim=True)
    var = ((y - mean) ** 2).mean(dim=-1, keepdim=True)
    return (y - mean) / torch.sqrt(var + eps)


def test_layer_averaged_target_matches_the_equation_in_fp64():
    torch.manual_seed(0)
    layers = [torch.randn(3, 5, 8, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    assert torch.allclose(layer_averaged_target(layers), reference_target(layers), atol=1e-12)
    assert torch.allclose(layer_averaged_target(layers, final_ln=False), reference_target(layers, final_ln=False),
                          atol=1e-12)
    # float32 inputs give the float32 rounding of the same values
    assert torch.allclose(layer_averaged_target([h.float() for h in layers]).double(), reference_target(layers),
                          atol=1e-5)
    # instance norm is over the tokens: every channel of every layer's average is zero-mean over the tokens
    assert torch.allclose(layer_averaged_target(layers, final_ln=False).mean(dim=1), torch.zeros(3, 8, dtype=torch.float64), atol=1e-12)


def test_the_target_and_loss_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="of one shape"):
        layer_averaged_target([torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)])
    with pytest.raises(ValueError, match="at least one"):
        layer_averaged_target([])
    with pytest.raises(ValueError, match="keep mask"):
        layer_averaged_kd_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), keep=torch.ones(2, 4, dtype=torch.bool))


def test_the_kd_loss_leaves_pad_tokens_out():
    prediction, target = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]])
    keep = torch.tensor([[True, True, False]])
    assert layer_averaged_kd_loss(prediction, target, keep).item() == pytest.approx((1 + 4) / 2)
    assert layer_averaged_kd_loss(prediction, target).item() == pytest.approx((1 + 4 + 10000) / 3)


def image_tree(synth_root, tmp_path, teacher, **train_kwargs) -> dict:
    tree = tiny_config_tree(synth_root, tmp_path, **train_kwargs)
    tree["model"]["image"] = {"name": "vit_tiny_patch16_224", "kwargs": TINY_VIT, "pretrained": str(teacher), "blocks": 2}
    tree["unimodal"] = {"modality": "image", "teacher": str(teacher), "teacher_arch": "timm:vit_tiny_patch16_224",
                        "teacher_kwargs": TINY_VIT}
    return tree


def test_image_distillation_trains_the_first_blocks_towards_the_teachers_layer_average(synth_root, tmp_path,
                                                                                        vit_teacher):
    cfg = validate_config(image_tree(synth_root, tmp_path, vit_teacher, max_steps=6, lr=3e-3))
    model = task_model_from_config(cfg)
    teacher_blocks = model.teacher.backbone.model.blocks
    assert len(model.student.model.blocks) == 2 and len(teacher_blocks) == 4
    assert torch.equal(model.student.model.blocks[1].mlp.fc1.weight, teacher_blocks[1].mlp.fc1.weight)
    assert not any(key.startswith("teacher.") for key in model.state_dict())  # the teacher is not checkpointed
    result = train(cfg, tmp_path / "run")
    losses = [h["loss/kd_image"] for h in result.history]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in result.model.teacher.parameters())


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory):
    """A tiny 4-layer BERT and a BERT-style vocabulary whose special ids sit where BERT's do."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert") / "bert"
    folder.mkdir()
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(folder)
    return folder


def test_text_distillation_trains_with_pads_left_out(synth_root, tmp_path, bert_teacher):
    tree = tiny_config_tree(synth_root, tmp_path, max_steps=5, lr=3e-3)
    tree["model"]["text"] = {"kind": "hf", "hf_name_or_path": str(bert_teacher), "hf_layers": 2, "pool": "first"}
    tree["model"]["tokenizer"] = {"kind": "hf", "context_length": 16}
    tree["unimodal"] = {"modality": "text", "teacher": str(bert_teacher)}
    cfg = validate_config(tree)
    result = train(cfg, tmp_path / "run")
    losses = [h["loss/kd_text"] for h in result.history]
    assert losses[-1] < losses[0]
    model = result.model.eval()
    tokens = torch.tensor([[101, 104, 105, 102, 0, 0]])
    padded = torch.cat([tokens, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    out, longer = model(None, tokens), model(None, padded)
    assert out["keep"].tolist() == [[True] * 4 + [False] * 2]
    assert len(model.student.model.encoder.layer) == 2
    # code form: no final LN, embeddings counted (7 student / 5 teacher hidden states here)
    assert model.final_ln is False and model.include_embeddings is True
    assert torch.isfinite(longer["prediction"]).all()


def test_bad_unimodal_settings_are_named(synth_root, tmp_path, vit_teacher):
    tree = image_tree(synth_root, tmp_path, vit_teacher)
    with pytest.raises(ConfigError, match="unimodal.modality"):
        validate_config(tree | {"unimodal": tree["unimodal"] | {"modality": "audio"}})
    text = tree | {"unimodal": {"modality": "text", "teacher": "x"}}
    with pytest.raises(ConfigError, match="set model.text.kind=hf"):
        validate_config(text)
    with pytest.raises(ConfigError, match="set model.student=null"):
        validate_config(tree | {"model": tree["model"] | {"student": {"out_dim": 8}}})
    with pytest.raises(ConfigError, match="eval.image_classifier evaluates"):
        validate_config({"eval": {"image_classifier": {"protocol": "probe"}}})
    with pytest.raises(ConfigError, match="eval.image_classifier.protocol"):
        validate_config(tree | {"eval": {"image_classifier": {"protocol": "linear"}}})
    narrow = image_tree(synth_root, tmp_path, vit_teacher)
    narrow["model"]["image"] = {"name": "vit_tiny_patch16_224", "kwargs": TINY_VIT | {"embed_dim": 16}}
    with pytest.raises(ValueError, match="give the student the teacher's width"):
        train(validate_config(narrow | {"train": narrow["train"] | {"max_steps": 1}}), tmp_path / "narrow")
