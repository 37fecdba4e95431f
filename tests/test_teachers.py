"""Teachers (SPEC 3.2, 4.2): load_teacher for every source kind, input re-normalisation, concept-head
building blocks against hand-computed values, and `alignlab teacher train` on a tiny SynthCaps."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F

from alignlab.data.transforms import CLIP_MEAN, CLIP_STD
from alignlab.teachers import load_teacher
from alignlab.teachers.settings import ConceptSettings
from alignlab.teachers.concepts import (build_vocabulary, concept_targets, resampling_weights,
                                        soft_cross_entropy, top1_in_concepts, train_concept_head)
from alignlab.teachers.supervised import LABEL_NAMES, label_accuracy, true_labels

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}


def _normalise(raw: torch.Tensor, mean, std) -> torch.Tensor:
    return (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture
def raw_images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_timm_checkpoint_teacher_renormalises_student_inputs(tmp_path, raw_images):
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TINY_VIT).eval()
    path = tmp_path / "vit.pth"
    torch.save(reference.state_dict(), path)

    teacher = load_teacher(str(path), arch="timm:vit_tiny_patch16_224", kwargs=TINY_VIT)
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.image_size == 32  # timm's declared normalisation
    assert teacher.target_names == ("logits", "embedding")
    out = teacher(_normalise(raw_images, CLIP_MEAN, CLIP_STD), input_mean=CLIP_MEAN, input_std=CLIP_STD)
    with torch.no_grad():
        teacher_input = _normalise(raw_images, teacher.mean, teacher.std)
        features = reference.forward_features(teacher_input)
        expected_embedding = reference.forward_head(features, pre_logits=True)
        expected_logits = reference(teacher_input)
    torch.testing.assert_close(out["logits"], expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["embedding"], expected_embedding, atol=1e-5, rtol=1e-5)
    # without the re-normalisation the outputs would differ: the test can fail
    wrong = teacher(_normalise(raw_images, CLIP_MEAN, CLIP_STD), input_mean=teacher.mean, input_std=teacher.std)
    assert not torch.allclose(wrong["logits"], expected_logits, atol=1e-3)

    # frozen, eval whatever the caller does, and hashed by its weights
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    again = load_teacher(str(path), arch="timm:vit_tiny_patch16_224", kwargs=TINY_VIT)
    other = load_teacher("timm:vit_tiny_patch16_224", kwargs={**TINY_VIT, "num_classes": 5})
    assert again.weights_hash == teacher.weights_hash != other.weights_hash
    assert len(teacher.weights_hash) == 64


def test_teacher_resizes_to_its_image_size(raw_images):
    teacher = load_teacher("timm:vit_tiny_patch16_224", kwargs={**TINY_VIT, "num_classes": 0})
    small = F.interpolate(raw_images, size=(16, 16), mode="bilinear", align_corners=False)
    out = teacher(_normalise(small, teacher.mean, teacher.std), input_mean=teacher.mean, input_std=teacher.std)
    expected = F.interpolate(_normalise(small, teacher.mean, teacher.std), size=(32, 32), mode="bicubic",
                             align_corners=False, antialias=True)
    with torch.no_grad():
        embedding = teacher.backbone.model.forward_head(teacher.backbone.model.forward_features(expected),
                                                        pre_logits=True)
    assert out["embedding"].shape == (4, 48) and "logits" not in out
    torch.testing.assert_close(out["embedding"], embedding, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("classifier", [True, False])
def test_hf_vit_teacher_from_local_save_pretrained(tmp_path, raw_images, classifier):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(1)
    model = (ViTForImageClassification if classifier else ViTModel)(config).eval()
    model.save_pretrained(tmp_path / "vit")
    mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
    ViTImageProcessor(image_mean=list(mean), image_std=list(std), size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "vit")

    teacher = load_teacher(f"hf:{tmp_path / 'vit'}")
    assert teacher.mean == mean and teacher.std == std and teacher.image_size == 32
    assert teacher.target_names == (("logits", "embedding") if classifier else ("embedding",))
    out = teacher(_normalise(raw_images, CLIP_MEAN, CLIP_STD), input_mean=CLIP_MEAN, input_std=CLIP_STD)
    with torch.no_grad():
        ref = model(pixel_values=_normalise(raw_images, mean, std), output_hidden_states=True)
    torch.testing.assert_close(out["embedding"], ref.hidden_states[-1][:, 0], atol=1e-5, rtol=1e-5)
    if classifier:
        torch.testing.assert_close(out["logits"], ref.logits, atol=1e-5, rtol=1e-5)


def test_hf_beit_with_a_shared_relative_position_bias_loads_exactly(tmp_path, raw_images):
    """BEiT v2's layout (THESIS.md section 3: one relative position bias shared by all layers, LayerScale, no
    absolute positions) through the `hf:` teacher path: every saved weight used, none missing, and the
    embedding is the final layer's CLS before the last norm (the released code's pre-norm CLS)."""
    from safetensors.torch import load_file, save_file
    from transformers import BeitConfig, BeitImageProcessor, BeitModel

    config = BeitConfig(use_shared_relative_position_bias=True, use_absolute_position_embeddings=False,
                        layer_scale_init_value=0.1, use_mean_pooling=False, image_size=32, patch_size=8,
                        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(2)
    model = BeitModel(config).eval()
    with torch.no_grad():  # a trained-looking bias: not the zeros it is initialised to
        model.shared_position_bias.relative_position_bias_table.normal_()
    model.save_pretrained(tmp_path / "beit")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    BeitImageProcessor(image_mean=list(mean), image_std=list(std), size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "beit")

    teacher = load_teacher(f"hf:{tmp_path / 'beit'}")
    saved = load_file(tmp_path / "beit" / "model.safetensors")  # the hub's key layout, as BEiT checkpoints are
    bias = "encoder.relative_position_bias.relative_position_bias_table"  # the one bias all layers share
    assert len(saved) == len(teacher.backbone.model.state_dict()) and bias in saved
    assert torch.equal(teacher.backbone.model.shared_position_bias.relative_position_bias_table, saved[bias])
    assert teacher.target_names == ("embedding",) and teacher.image_size == 32
    out = teacher(_normalise(raw_images, CLIP_MEAN, CLIP_STD), input_mean=CLIP_MEAN, input_std=CLIP_STD)
    with torch.no_grad():
        ref = model(pixel_values=_normalise(raw_images, mean, std), output_hidden_states=True)
    torch.testing.assert_close(out["embedding"], ref.hidden_states[-1][:, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["embedding"], ref.last_hidden_state[:, 0], atol=1e-3)  # post-norm differs

    # A file without the shared bias would load with a random one (transformers only logs it): refused.
    del saved[bias]
    save_file(saved, tmp_path / "beit" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not fit its config.json \\(missing_keys .*relative_position_bias_table"):
        load_teacher(f"hf:{tmp_path / 'beit'}")


def test_dual_encoder_checkpoint_image_tower(tmp_path, raw_images):
    from alignlab.config import validate_config
    from alignlab.models.presets import build_dual_encoder
    from conftest import tiny_config_tree

    tree = tiny_config_tree(tmp_path / "data", tmp_path / "runs")
    cfg = validate_config(tree)
    torch.manual_seed(2)
    model = build_dual_encoder(embed_dim=cfg.model.embed_dim, image={"name": cfg.model.image.name,
                                                                    "kwargs": cfg.model.image.kwargs},
                               text={"kind": "clip", "vocab_size": 100, "context_length": 16, "width": 32,
                                     "layers": 1, "heads": 2}).eval()
    torch.save({"model": model.state_dict(), "config": tree, "step": 3}, tmp_path / "final.pt")

    teacher = load_teacher(str(tmp_path / "final.pt"))
    assert teacher.mean == CLIP_MEAN and teacher.image_size == cfg.data.image_size == 32
    images = _normalise(raw_images, CLIP_MEAN, CLIP_STD)
    out = teacher(images, input_mean=CLIP_MEAN, input_std=CLIP_STD)
    with torch.no_grad():
        torch.testing.assert_close(out["embedding"], model.image_tower(images), atol=1e-5, rtol=1e-5)


def test_load_teacher_errors_say_how_to_fix(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT).state_dict(), path)
    with pytest.raises(ValueError, match="arch='timm:<name>'"):
        load_teacher(str(path))
    with pytest.raises(ValueError, match="does not fit timm model"):
        load_teacher(str(path), arch="timm:vit_tiny_patch16_224", kwargs={**TINY_VIT, "embed_dim": 64})
    with pytest.raises(ValueError, match="not a timm model"):
        load_teacher("timm:no_such_model_xyz")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_teacher(str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_teacher(f"hf:{tmp_path / 'nothing'}")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="teacher.json"):
        load_teacher(str(tmp_path / "folder"))


# ------------------------------------------------------------------------------------------ concept heads

def test_vocabulary_targets_and_resampling_by_hand():
    concepts = [["circle", "square"], ["circle"], ["circle", "star"], ["heart"], []]
    vocab, counts = build_vocabulary(concepts, min_count=1)
    assert vocab == ["circle", "heart", "square", "star"]  # count 3 first, then the ties by name
    assert counts == Counter({"circle": 3, "square": 1, "star": 1, "heart": 1})
    vocab2, _ = build_vocabulary(concepts, min_count=2)
    assert vocab2 == ["circle"]

    targets, has_target = concept_targets(concepts, ["circle", "square", "star"])
    expected = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(targets, expected)
    assert has_target.tolist() == [True, True, True, False, False]

    weights = resampling_weights(concepts, ["circle", "square", "star"], counts)
    expected_weights = [max(3 ** -0.5, 1.0), 3 ** -0.5, max(3 ** -0.5, 1.0), 0.0, 0.0]
    assert weights.tolist() == pytest.approx(expected_weights)


def test_soft_cross_entropy_and_top1_against_brute_force():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    brute = 0.0
    for row in range(2):
        norm = math.log(sum(math.exp(v) for v in logits[row].tolist()))
        brute -= sum(t * (l - norm) for t, l in zip(targets[row].tolist(), logits[row].tolist()))
    assert float(soft_cross_entropy(logits, targets)) == pytest.approx(brute / 2, rel=1e-6)
    assert top1_in_concepts(logits, targets) == 0.5  # row 0 picks class 1 (a target), row 1 class 2 (not)


def test_concept_head_learns_separable_concepts():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 3
    labels = torch.arange(200) % 4
    features = centres[labels] + torch.randn(200, 16, generator=generator)
    targets = F.one_hot(labels, 4).float()
    config = ConceptSettings(epochs=20, batch_size=32, base_lr=0.5)
    assert config.lr == pytest.approx(0.5 * 32 / 256)
    head, stats = train_concept_head(features, targets, torch.ones(200), config, seed=1)
    assert stats["loss_last_epoch"] < 0.25 * stats["loss_first_epoch"]
    with torch.no_grad():
        assert top1_in_concepts(head(features), targets) > 0.95
    with pytest.raises(ValueError, match="resample"):
        ConceptSettings(resample="sqrt")


def test_true_labels_and_label_accuracy_by_hand():
    meta = {"objects": [{"shape": "star", "color": "red", "size": "small"},
                        {"shape": "circle", "color": "red", "size": "large"}]}
    labels = true_labels(meta, "s0")
    on = {LABEL_NAMES[i] for i in labels.nonzero().flatten().tolist()}
    assert on == {"star", "circle", "red", "small", "large"}
    with pytest.raises(ValueError, match="color='mauve'"):
        true_labels({"objects": [{"shape": "star", "color": "mauve", "size": "small"}]}, "s1")

    logits = torch.full((2, len(LABEL_NAMES)), -5.0)
    logits[0, LABEL_NAMES.index("star")] = 5.0      # hit
    logits[1, LABEL_NAMES.index("heart")] = 5.0     # miss
    logits[:, LABEL_NAMES.index("blue")] = 5.0      # colour misses on both
    both = torch.stack([labels, labels])
    accuracy = label_accuracy(logits, both)
    assert accuracy["shape"] == {"top1": 0.5, "chance": pytest.approx(2 / 8)}
    assert accuracy["color"]["top1"] == 0.0 and accuracy["color"]["chance"] == pytest.approx(1 / 8)


def test_teacher_label_losses_against_their_equations():
    """group_ce: sum over groups of the batch mean of -sum_c t_c log softmax(z_g)_c, t = y_g / |y_g|; bce: the
    mean binary cross entropy (written out here in float64 from the formulas)."""
    import math

    from alignlab.teachers.supervised import LABEL_GROUPS, label_loss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, len(LABEL_NAMES), generator=generator, dtype=torch.float64) * 3
    metas = [{"objects": [{"shape": "star", "color": "red", "size": "small"}]},
             {"objects": [{"shape": "star", "color": "blue", "size": "small"},
                          {"shape": "heart", "color": "blue", "size": "large"}]},
             {"objects": [{"shape": "cross", "color": "pink", "size": "large"}]}]
    labels = torch.stack([true_labels(m, f"s{i}") for i, m in enumerate(metas)]).double()
    expected, offset = 0.0, 0
    for names in LABEL_GROUPS.values():
        per_sample = []
        for z, y in zip(logits.tolist(), labels.tolist()):
            zg, yg = z[offset:offset + len(names)], y[offset:offset + len(names)]
            log_norm = math.log(sum(math.exp(v) for v in zg))
            per_sample.append(-sum(t / sum(yg) * (v - log_norm) for t, v in zip(yg, zg)))
        expected += sum(per_sample) / len(per_sample)
        offset += len(names)
    assert label_loss(logits, labels, "group_ce").item() == pytest.approx(expected, rel=1e-12)

    bce = [-(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
           for zs, ys in zip(logits.tolist(), labels.tolist()) for z, y in zip(zs, ys)]
    assert label_loss(logits, labels, "bce").item() == pytest.approx(sum(bce) / len(bce), rel=1e-9)
    with pytest.raises(ValueError, match="group_ce or bce"):
        label_loss(logits, labels, "mse")


# ------------------------------------------------------------------------------------- alignlab teacher train

@pytest.fixture(scope="module")
def trained_teacher(synth_root, tmp_path_factory):
    from alignlab.cli import main

    out = tmp_path_factory.mktemp("teacher") / "t"
    # A small CNN: from scratch on 192 pairs it learns colour within a few epochs (a 1-block ViT barely does).
    code = main(["teacher", "train", "--data", str(synth_root), "--out", str(out), "--arch", "timm:resnet10t",
                 "--arch-kwargs", "{}", "--image-size", "32", "--epochs", "5", "--holdout", "0.25",
                 "--batch-size", "32", "--min-count", "3", "--concept-epochs", "40", "--concept-base-lr", "0.05"])
    assert code == 0
    return out


def test_teacher_train_learns_colour_and_writes_loadable_folder(trained_teacher, synth_root):
    meta = json.loads((trained_teacher / "teacher.json").read_text())
    summary = meta["summary"]
    assert meta["arch"] == "timm:resnet10t" and meta["kwargs"] == {} and meta["image_size"] == 32
    assert meta["data"]["dataset_hash"] == json.loads((synth_root / "manifest.json").read_text())["dataset_hash"]
    losses = summary["loss_per_epoch"]
    assert len(losses) == 5 and losses[-1] < 0.85 * losses[0]
    assert summary["num_holdout"] == 64
    colour = summary["holdout_accuracy"]["color"]
    assert colour["top1"] > colour["chance"] + 0.2, summary["holdout_accuracy"]
    for head in ("objects", "attributes"):
        stats = summary["concept_heads"][head]
        assert stats["loss_last_epoch"] < stats["loss_first_epoch"]
        assert stats["trained_on"] + stats["skipped_no_concept"] == summary["num_train"]
    # vocabularies come from the parsed captions: shapes are objects, colours and sizes attributes
    assert {"circle", "square"} <= set(meta["concepts"]["objects"])
    assert {"red", "blue", "small", "large"} <= set(meta["concepts"]["attributes"])

    teacher = load_teacher(str(trained_teacher))
    assert teacher.weights_hash == meta["weights_hash"]
    assert teacher.target_names == ("objects", "attributes", "logits", "embedding")
    assert teacher.concepts == meta["concepts"] and teacher.label_names == LABEL_NAMES
    images = torch.randn(3, 3, 32, 32)
    out = teacher(images, input_mean=CLIP_MEAN, input_std=CLIP_STD)
    assert out["objects"].shape == (3, len(meta["concepts"]["objects"])) and out["logits"].shape == (3, 18)

    # backbone.pth initialises a student image tower (model.image.pretrained=<dir>/backbone.pth)
    from alignlab.models.towers import ImageTower

    tower = ImageTower("resnet10t", pretrained=trained_teacher / "backbone.pth").eval()
    with torch.no_grad():
        torch.testing.assert_close(tower(images), out["embedding"], atol=1e-5, rtol=1e-5)


def test_teacher_train_refuses_bad_settings(synth_root, tmp_path, capsys):
    from alignlab.cli import main

    code = main(["teacher", "train", "--data", str(synth_root), "--out", str(tmp_path / "t"), "--arch",
                 "timm:vit_tiny_patch16_224", "--arch-kwargs", json.dumps(TINY_VIT), "--image-size", "48"])
    assert code == 2 and "img_size=32" in capsys.readouterr().err
    code = main(["teacher", "train", "--data", str(synth_root), "--out", str(tmp_path / "t"), "--arch",
                 "timm:vit_tiny_patch16_224", "--arch-kwargs", json.dumps(TINY_VIT), "--min-count", "100000",
                 "--epochs", "1"])
    assert code == 2 and "min_count=100000" in capsys.readouterr().err
    assert not (tmp_path / "t" / "teacher.json").exists()
