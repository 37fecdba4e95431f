"""The thesis' student: shared MLP / shared block on tiny towers, what it returns to the losses, padding,
token-type embeddings, and one training step with the thesis' objective (KD + multi-layer InfoNCE)."""

import pytest
import torch

from alignlab.losses import multi_layer_clip_loss, shre_kd_loss, ssmke_mse_loss
from alignlab.models.text_transformer import TextTransformer
from alignlab.models.thesis_student import ThesisStudent
from alignlab.models.towers import ImageTower

WIDTH = 32


def _towers():
    image = ImageTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=WIDTH, num_heads=2)
    text = TextTransformer(vocab_size=50, context_length=12, width=WIDTH, layers=1, heads=2, pool="first",
                           causal=False, pad_id=0)
    return image, text


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 50, (4, 8), generator=g)
    tokens[:, 5:] = 0  # padding
    return images, tokens


@pytest.mark.parametrize("shared,layers,retrieval", [("mlp", 3, "h3"), ("block", 2, "h2")])
def test_outputs_and_retrieval_vector(shared, layers, retrieval):
    torch.manual_seed(0)
    model = ThesisStudent(*_towers(), shared=shared, out_dim=10, heads=2).eval()
    images, tokens = _batch()
    out = model(images, tokens)
    assert len(out["layers"]) == layers and out["logit_scales"].shape == (layers,)
    for image, text in out["layers"]:
        torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    assert out["image_head"].shape == (4, 10) and out["text_head"].shape == (4, 10)
    assert model.retrieval_layer == retrieval
    torch.testing.assert_close(model.encode_image(images), out["image_features"])
    torch.testing.assert_close(model.encode_text(tokens), out["text_features"])


def test_block_text_vector_does_not_depend_on_padding_length():
    torch.manual_seed(1)
    model = ThesisStudent(*_towers(), shared="block", out_dim=10, heads=2).eval()
    _, tokens = _batch()
    longer = torch.cat([tokens, torch.zeros(4, 4, dtype=tokens.dtype)], dim=1)
    torch.testing.assert_close(model.encode_text(longer), model.encode_text(tokens))


def test_token_type_embeddings_before_and_after_change_the_output():
    images, tokens = _batch()
    outputs = {}
    for mode in ("none", "before", "after"):
        torch.manual_seed(2)
        model = ThesisStudent(*_towers(), shared="block", out_dim=10, heads=2, tte=mode).eval()
        outputs[mode] = model.encode_image(images)
    assert not torch.allclose(outputs["none"], outputs["before"])
    assert not torch.allclose(outputs["none"], outputs["after"])


def test_bad_configurations_are_named():
    image, text = _towers()
    cnn = ImageTower("resnet10t")
    with pytest.raises(ValueError, match="one width"):
        ThesisStudent(cnn, text, shared="mlp", out_dim=5)
    with pytest.raises(ValueError, match="shared encoder 'mlp2'"):
        ThesisStudent(image, text, shared="mlp2", out_dim=5)
    with pytest.raises(ValueError, match="retrieval_layer"):
        ThesisStudent(image, text, shared="block", out_dim=5, heads=2, retrieval_layer="h4")


def test_block_needs_a_token_sequence_from_the_image_tower():
    cnn = ImageTower("resnet10t")
    model_text = TextTransformer(vocab_size=50, context_length=12, width=cnn.num_features, layers=1, heads=2,
                                 pool="first", causal=False)
    model = ThesisStudent(cnn, model_text, shared="block", out_dim=5, heads=2)
    with pytest.raises(ValueError, match="token sequence"):
        model.encode_image(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("kd", ["shre", "ssmke"])
def test_one_step_of_the_thesis_objective_trains_every_part(kd):
    torch.manual_seed(3)
    out_dim = 10 if kd == "shre" else WIDTH
    model = ThesisStudent(*_towers(), shared="mlp", out_dim=out_dim)
    images, tokens = _batch()
    teacher = torch.randn(4, out_dim)
    out = model(images, tokens)
    kd_loss = (shre_kd_loss(out["image_head"], out["text_head"], teacher) if kd == "shre"
               else ssmke_mse_loss(out["image_head"], out["text_head"], teacher))
    (kd_loss + multi_layer_clip_loss(out["layers"], out["logit_scales"])).backward()
    for name, param in model.named_parameters():
        if name.startswith("tte."):  # mode "none": the embedding is unused, and frozen so that DDP accepts it
            assert not param.requires_grad and param.grad is None, name
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with torch.no_grad():
        model.logit_scales.fill_(10.0)
    model.clamp_logit_scale_()
    torch.testing.assert_close(model.logit_scales.exp(), torch.full((3,), 100.0))


@pytest.mark.parametrize("shared", ["mlp", "block"])
@pytest.mark.parametrize("tte", ["none", "before", "after", "after_ls"])
def test_every_trainable_parameter_gets_a_gradient_as_ddp_requires(shared, tte):
    """DDP (find_unused_parameters off) fails at its second step on a trainable parameter that received no
    gradient: thesis_ddp's 2-rank arm (shared MLP, tte none) died on tte.embedding.weight."""
    torch.manual_seed(0)
    model = ThesisStudent(*_towers(), shared=shared, out_dim=WIDTH, heads=2, tte=tte)
    images, tokens = _batch()
    out = model(images, tokens)
    loss = ssmke_mse_loss(out["image_head"], out["text_head"], torch.randn(4, WIDTH))
    (loss + multi_layer_clip_loss(out["layers"], out["logit_scales"])).backward()
    missing = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert missing == []
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    assert frozen == (["tte.embedding.weight"] if tte == "none" else [])
