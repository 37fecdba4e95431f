"""Training with a teacher (SPEC 3.2): CD from a teacher cache joined on sample indices (with InfoNCE and
HN-NCE), ED and DD with the teacher online, LiT / FT-delay image-tower modes with exact resume across the
switch, and a 2-arm slice of ablations/diht.yaml end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from alignlab.config import validate_config
from alignlab.data.transforms import CLIP_MEAN, CLIP_STD
from alignlab.teachers.registry import Teacher, TimmBackbone
from alignlab.training import builders
from alignlab.training.checkpoint import list_checkpoints
from alignlab.training.trainer import train
from conftest import Crash, crash_at, tiny_config_tree

REPO = Path(__file__).resolve().parents[1]
TOWER = "vit_tiny_patch16_224"
TOWER_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}  # tiny_config_tree's
CONCEPTS = {"objects": ["circle", "square", "triangle", "star", "cross", "ring"],
            "attributes": ["red", "green", "blue", "small", "large"]}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A stand-in for `alignlab teacher train`'s output (same folder format, random weights): teacher.json,
    teacher.pth (backbone + concept heads) and backbone.pth (the tower alone, for LiT / FT init)."""
    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(123)
    labels = ["circle", "square", "red", "blue"]
    model = timm.create_model(TOWER, num_classes=len(labels), **TOWER_KWARGS)
    heads = {name: nn.Linear(model.num_features, len(names)) for name, names in CONCEPTS.items()}
    with torch.no_grad():
        for head in heads.values():
            head.weight.mul_(20.0)  # peaked teacher distributions: a top-k that means something
    teacher = Teacher(TimmBackbone(model), mean=CLIP_MEAN, std=CLIP_STD, image_size=32, has_logits=True,
                      heads=heads, concepts=CONCEPTS, label_names=labels, source=str(out))
    torch.save(teacher.state_dict(), out / "teacher.pth")
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, out / "backbone.pth")
    (out / "teacher.json").write_text(json.dumps({
        "format": "alignlab-teacher/1", "arch": f"timm:{TOWER}", "kwargs": TOWER_KWARGS, "image_size": 32,
        "normalization": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}, "concepts": CONCEPTS,
        "label_names": labels}))
    return out


@pytest.fixture(scope="module")
def concept_cache(teacher_dir, synth_root, tmp_path_factory) -> str:
    from alignlab.teachers import load_teacher
    from alignlab.teachers.cache import build_teacher_cache

    return build_teacher_cache(load_teacher(str(teacher_dir)), synth_root, tmp_path_factory.mktemp("caches"),
                               targets=("objects", "attributes", "embedding"), k=3, image_size=32)


def _config(synth_root, tmp_path, distill=None, image=None, loss=None, **train_fields):
    tree = tiny_config_tree(synth_root, tmp_path, **train_fields)
    if distill:
        tree["distill"] = distill
    if image:
        tree["model"]["image"].update(image)
    if loss:
        tree["loss"] = loss
    return validate_config(tree)


def _spy_on_loss(monkeypatch) -> list[tuple[torch.Tensor, dict]]:
    """Record (sample indices, teacher targets) of every loss call."""
    seen = []
    real = builders.loss_from_config

    def wrapped(*args, **kwargs):
        fn = real(*args, **kwargs)

        def spy(outputs, context):
            seen.append((context["indices"].clone(), {k: v.clone() for k, v in context["targets"].items()}))
            return fn(outputs, context)
        return spy

    monkeypatch.setattr(builders, "loss_from_config", wrapped)
    return seen


def _keep_model(monkeypatch) -> list:
    kept = []
    real = builders.model_from_config

    def wrapped(*args, **kwargs):
        kept.append(real(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(builders, "model_from_config", wrapped)
    return kept


@pytest.mark.parametrize("loss_name, contrastive_term", [("infonce", "contrastive"), ("hn_nce", "hn_nce")])
def test_concept_distillation_reads_cached_targets_by_sample_index(synth_root, tmp_path, monkeypatch, concept_cache,
                                                                   loss_name, contrastive_term):
    from alignlab.teachers.cache import TeacherCache

    seen = _spy_on_loss(monkeypatch)
    cfg = _config(synth_root, tmp_path, max_steps=4, loss={"name": loss_name},
                  distill={"cache": concept_cache, "concepts": {"targets": "objects+attributes", "k": 3}})
    result = train(cfg, tmp_path / "run")

    cache = TeacherCache.open(concept_cache)
    assert len(seen) == 4
    for indices, targets in seen:
        assert set(targets) == {"objects", "attributes"}
        expected = cache.lookup(indices)
        for name in ("objects", "attributes"):
            torch.testing.assert_close(targets[name], expected[name], rtol=0, atol=1e-6)
            assert ((targets[name] > 0).sum(-1) <= 3).all()
    for record in result.history:  # L = L_contrastive + L_CE-obj + L_CE-attr
        terms = [record[f"loss/{t}"] for t in (contrastive_term, "cd_objects", "cd_attributes")]
        assert record["loss"] == pytest.approx(sum(terms), rel=1e-5)

    final = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    assert final["model"]["heads.objects.weight"].shape == (len(CONCEPTS["objects"]), 32)
    assert final["model"]["heads.attributes.weight"].shape == (len(CONCEPTS["attributes"]), 32)
    step = torch.load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1][1], weights_only=True)
    lrs = {g["name"]: g["initial_lr"] for g in step["optimizer"]["param_groups"]}
    assert lrs["concept_heads/decay"] == pytest.approx(10 * lrs["decay"])
    wds = {g["name"]: g["weight_decay"] for g in step["optimizer"]["param_groups"]}
    assert wds["concept_heads/decay"] == pytest.approx(0.01 * wds["decay"])

    # evaluation rebuilds the model from the config alone: the heads load and are ignored
    from alignlab.data.tokenizers import build_tokenizer

    fresh = builders.model_from_config(cfg.model, build_tokenizer("clip_bpe", context_length=16))
    fresh.load_state_dict(final["model"])
    images = torch.randn(2, 3, 32, 32)
    result.model.eval(), fresh.eval()
    torch.testing.assert_close(fresh.encode_image(images), result.model.encode_image(images))


def test_concept_distillation_with_gradient_accumulation_matches_the_full_batch(synth_root, tmp_path, concept_cache):
    distill = {"cache": concept_cache, "concepts": {"targets": "objects+attributes", "k": 3}}
    plain = train(_config(synth_root, tmp_path, max_steps=2, distill=distill), tmp_path / "plain")
    accum = train(_config(synth_root, tmp_path, max_steps=2, accumulation_steps=4, distill=distill), tmp_path / "accum")
    for a, b in zip(plain.history, accum.history):
        for key in ("loss", "loss/cd_objects", "loss/cd_attributes"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), accum.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_a_cache_without_the_needed_targets_or_top_k_is_refused(synth_root, tmp_path, concept_cache):
    cfg = _config(synth_root, tmp_path, max_steps=1,
                  distill={"cache": concept_cache, "concepts": {"targets": "objects", "k": 10}})
    with pytest.raises(ValueError, match="keeps only the top 3"):
        train(cfg, tmp_path / "k")
    other = tmp_path / "not-a-cache"
    other.mkdir()
    cfg = _config(synth_root, tmp_path, max_steps=1, distill={"cache": str(other), "concepts": {"targets": "objects"}})
    with pytest.raises(ValueError, match="no complete teacher cache"):
        train(cfg, tmp_path / "missing")


def test_embedding_distillation_runs_the_teacher_online_and_never_trains_it(synth_root, tmp_path, teacher_dir,
                                                                            monkeypatch):
    from alignlab.teachers import load_teacher
    from alignlab.training.teacher_targets import TeacherTargets

    batches = []
    real_call = TeacherTargets.__call__

    def recording(self, images, indices):
        targets = real_call(self, images, indices)
        batches.append((images.clone(), targets["embedding"].clone()))
        return targets

    monkeypatch.setattr(TeacherTargets, "__call__", recording)
    cfg = _config(synth_root, tmp_path, max_steps=3, distill={"teacher": str(teacher_dir),
                                                              "embedding": {"enabled": True, "weight": 2.0}})
    result = train(cfg, tmp_path / "ed")
    assert all(-2.0 <= h["loss/ed"] <= 2.0 for h in result.history)
    assert all(h["loss"] == pytest.approx(h["loss/contrastive"] + h["loss/ed"], rel=1e-5) for h in result.history)
    state = result.model.state_dict()
    assert state["heads.ed_projection.weight"].shape == (48, 32)
    assert not any(k.startswith(("teacher", "backbone")) for k in state)  # the teacher is not part of the student
    # every step's targets are the untouched teacher's embeddings of that step's augmented images
    teacher = load_teacher(str(teacher_dir))
    assert len(batches) == 3
    for images, embedding in batches:
        expected = teacher(images, input_mean=CLIP_MEAN, input_std=CLIP_STD)["embedding"]
        torch.testing.assert_close(embedding, expected)


def test_distribution_distillation_with_lambda_zero_trains_exactly_like_infonce(synth_root, tmp_path, teacher_dir):
    plain = train(_config(synth_root, tmp_path, max_steps=3), tmp_path / "plain")
    dd0 = train(_config(synth_root, tmp_path, max_steps=3, distill={
        "teacher": str(teacher_dir), "distribution": {"enabled": True, "lam": 0.0}}), tmp_path / "dd0")
    dd = train(_config(synth_root, tmp_path, max_steps=3, distill={
        "teacher": str(teacher_dir), "distribution": {"enabled": True, "lam": 0.5}}), tmp_path / "dd")
    assert [h["loss"] for h in dd0.history] == [h["loss"] for h in plain.history]
    assert dd.history[0]["loss"] != plain.history[0]["loss"]


def test_lit_keeps_the_pretrained_tower_frozen(synth_root, tmp_path, teacher_dir):
    backbone = torch.load(teacher_dir / "backbone.pth", weights_only=True)
    result = train(_config(synth_root, tmp_path, max_steps=3, image={
        "pretrained": str(teacher_dir / "backbone.pth"), "mode": "locked"}), tmp_path / "lit")
    tower = result.model.image_tower.model.state_dict()
    assert set(tower) == set(backbone)
    for name, value in backbone.items():
        assert torch.equal(tower[name], value), name
    start = train(_config(synth_root, tmp_path, max_steps=1, image={
        "pretrained": str(teacher_dir / "backbone.pth"), "mode": "locked"}, lr=1e-12), tmp_path / "lit0")
    assert not torch.equal(result.model.image_proj.weight, start.model.image_proj.weight)  # the projection trains


def test_ft_delay_switches_at_the_set_step_and_resumes_exactly_across_it(synth_root, tmp_path, teacher_dir,
                                                                         monkeypatch):
    kept = _keep_model(monkeypatch)
    image = {"pretrained": str(teacher_dir / "backbone.pth"), "mode": "ft_delay", "delay": 0.5}
    cfg = _config(synth_root, tmp_path, max_steps=6, checkpoint_every=2, image=image)
    initial = torch.load(teacher_dir / "backbone.pth", weights_only=True)["blocks.0.attn.qkv.weight"]
    changed = []

    def watch(metrics, step):
        changed.append(not torch.equal(kept[-1].image_tower.model.blocks[0].attn.qkv.weight.detach(), initial))

    full = train(cfg, tmp_path / "full", on_metrics=watch)
    assert [h["image_tower_locked"] for h in full.history] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert changed == [False, False, False, True, True, True]  # steps 1-3 locked, tuned from step 4 on
    state = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    step = torch.load(list_checkpoints(tmp_path / "full" / "checkpoints")[-1][1], weights_only=True)
    lrs = {g["name"]: g["initial_lr"] for g in step["optimizer"]["param_groups"]}
    assert lrs["image_tower/decay"] == pytest.approx(0.01 * lrs["decay"])
    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", on_metrics=crash_at(3, "simulated crash before the switch"))
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [2]
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    assert [(h["step"], h["loss"]) for h in resumed.history] == [(h["step"], h["loss"]) for h in full.history]
    for name, value in state["model"].items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_a_two_arm_slice_of_the_diht_spec_runs_end_to_end(tmp_path, monkeypatch, teacher_dir):
    from alignlab.ablation import load_spec
    from alignlab.experiment import ensure_dataset, run_experiment
    from conftest import SMALL_SYNTH

    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load((REPO / "ablations" / "diht.yaml").read_text())
    spec["base"] = str(REPO / "configs" / "tiny_synthcaps.yaml")
    spec["arms"] = {name: spec["arms"][name] for name in ("CD-O+A", "FT-delay")}
    spec["baseline"], spec["seeds"] = "CD-O+A", [0]
    spec.pop("paper")  # its claims name arms this slice leaves out
    text = yaml.safe_dump(spec).replace("teachers/synthcaps-tiny", str(teacher_dir))
    (tmp_path / "slice.yaml").write_text(text)
    tiny = tiny_config_tree(tmp_path / "data", tmp_path / "runs", max_steps=2)
    overrides = [f"data.synth={json.dumps(dict(SMALL_SYNTH, num_train=64, mismatch=0.2, product=0.1))}",
                 f"model={json.dumps(tiny['model'])}", "data.image_size=32", "data.num_workers=0",
                 "train.batch_size=32", "train.max_steps=2", "train.progress=false", "tracking.enabled=false",
                 "distill.concepts.k=3",
                 'eval={"zeroshot_tasks": ["shape"], "linear_probe_task": null, "shifts": [], "histogram": false}']
    _, plans = load_spec(tmp_path / "slice.yaml", overrides)
    assert [p.arm for p in plans] == ["CD-O+A", "FT-delay"]
    ensure_dataset(plans[0].config)
    for plan in plans:
        metrics = run_experiment(plan.config, plan.run_dir, ablation="diht", arm=plan.arm)
        assert "zeroshot/shape/top1" in metrics and "final_loss" in metrics
    cd = json.loads((plans[0].run_dir / "results.json").read_text())
    assert "final_loss/cd_attributes" in cd
    caches = list((tmp_path / "data").glob("synthcaps-*/teacher-caches/*/cache.json"))
    assert len(caches) == 1  # distill.cache=auto built the cache once, next to the data
