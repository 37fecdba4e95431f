"""Training-step cost of distilling from a teacher (docs/methods.md "DiHT concept distillation"), against the same
step without distillation.

DiHT's argument for concept distillation: its targets are precomputed, so it costs almost nothing at
training time, while embedding distillation (ED) runs the teacher online ("60 % slower, +8 % GPU memory").
This measures one whole tiny-preset step (teacher targets, forward, losses, backward, AdamW) for

    none       InfoNCE only
    cd_cached  InfoNCE + concept heads (objects + attributes), top-k targets read from a TeacherCache
    ed_online  InfoNCE + ED, the teacher run under no_grad on every batch

The teacher is a frozen copy of the student's image tower architecture with concept heads of DiHT's sizes
(10,000 objects, 1,200 attributes by default); DiHT's teacher is larger than its student, so ED's overhead
here is a lower bound. The cache is built once over a small generated SynthCaps set. Steps interleave the
arms (the machine is shared and noisy) and the report is the median and its ratio to `none`.

    python benchmarks/teacher_step_cost.py --batch 128 --steps 15
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
from torch import nn

from alignlab.config import DistillConfig, LossConfig, ModelConfig
from alignlab.data.synth import SynthCapsConfig, generate_synthcaps
from alignlab.data.tokenizers import build_tokenizer
from alignlab.data.transforms import CLIP_MEAN, CLIP_STD
from alignlab.teachers.cache import TeacherCache, build_teacher_cache
from alignlab.teachers.registry import Teacher, TimmBackbone
from alignlab.training import builders
from alignlab.training.optim import build_optimizer
from alignlab.training.teacher_targets import TeacherTargets
from _timing import interleaved_step_times, print_ratios


def make_teacher(model_cfg: ModelConfig, objects: int, attributes: int, image_size: int) -> Teacher:
    """A frozen teacher with the student tower's architecture and random concept heads."""
    model = timm.create_model(model_cfg.image.name, num_classes=0, **model_cfg.image.kwargs)
    concepts = {"objects": [f"o{i}" for i in range(objects)], "attributes": [f"a{i}" for i in range(attributes)]}
    heads = {name: nn.Linear(model.num_features, len(names)) for name, names in concepts.items()}
    return Teacher(TimmBackbone(model), mean=CLIP_MEAN, std=CLIP_STD, image_size=image_size, has_logits=False,
                   heads=heads, concepts=concepts, source="benchmark")


def build_arms(model_cfg: ModelConfig, tokenizer, teacher: Teacher, cache: TeacherCache, lr: float) -> dict:
    """arm -> (model, optimizer, loss_fn, targets_fn): each arm as the trainer would build it."""
    infonce = LossConfig(name="infonce")
    settings = {
        "none": (DistillConfig(), None),
        "cd_cached": (DistillConfig(cache="cache", concepts={"targets": "objects+attributes", "k": 10}),
                      TeacherTargets(("objects", "attributes"), cache=cache, k=10)),
        "ed_online": (DistillConfig(teacher="teacher", embedding={"enabled": True}),
                      TeacherTargets(("embedding",), teacher=teacher, input_mean=CLIP_MEAN, input_std=CLIP_STD)),
    }
    arms = {}
    for name, (distill, targets) in settings.items():
        torch.manual_seed(0)
        model = builders.model_from_config(model_cfg, tokenizer)
        if distill.concepts.names:
            model.add_heads({head: cache.num_classes[head] for head in distill.concepts.names})
        if distill.embedding.enabled:
            model.add_heads({"ed_projection": model.image_proj.in_features})
        rules = builders.param_group_rules(SimpleNamespace(distill=distill, model=model_cfg))  # the two sections it reads
        optimizer = build_optimizer(model, model.no_weight_decay_param_names(), lr=lr, weight_decay=0.1,
                                    betas=(0.9, 0.98), eps=1e-6, rules=rules)
        loss_fn = builders.loss_from_config(infonce, world_size=1, seed=0, distill=distill)
        arms[name] = (model, optimizer, loss_fn, targets)
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--objects", type=int, default=10000, help="teacher object classes (DiHT: ~10 K)")
    parser.add_argument("--attributes", type=int, default=1200, help="teacher attribute classes (DiHT: ~1,200)")
    args = parser.parse_args()

    model_cfg = ModelConfig(preset=args.preset)
    size = model_cfg.image.kwargs.get("img_size", 224)
    tokenizer = build_tokenizer(model_cfg.tokenizer.kind, context_length=model_cfg.tokenizer.context_length)
    torch.manual_seed(0)
    teacher = make_teacher(model_cfg, args.objects, args.attributes, size)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate_synthcaps(data, SynthCapsConfig(image_size=size, num_train=2 * args.batch, shard_size=args.batch,
                                                 num_retrieval_test=1, num_retrieval_val=1,
                                                 zeroshot_per_class_train=1, zeroshot_per_class_val=1,
                                                 zeroshot_per_class_test=1, shift_per_class=1))
        cache = TeacherCache.open(build_teacher_cache(teacher, data, Path(tmp) / "cache", k=10, image_size=size))
        arms = build_arms(model_cfg, tokenizer, teacher, cache, lr=1e-4)

        images = torch.randn(args.batch, 3, size, size)
        tokens = tokenizer([f"a red circle chasing a blue star number {i}" for i in range(args.batch)])
        times = interleaved_step_times(arms, images, tokens, args.steps, lambda step: {
            "indices": torch.randperm(2 * args.batch)[: args.batch], "epoch": 0, "step": step,
            "total_steps": args.steps + 2})

    print(f"preset {args.preset}, batch {args.batch}, {args.steps} steps each, torch threads "
          f"{torch.get_num_threads()}, concept heads {args.objects} + {args.attributes} classes, top-10")
    print_ratios(times, base="none")


if __name__ == "__main__":
    main()
