"""Training-step cost of the thesis' momentum encoder + queue against S-SMKE (docs/methods.md, "Thesis methods";
thesis section 3.2.4.3.3: 7 h -> 10.3 h, x1.47, "the additional forward pass of the momentum encoder and a
large matrix multiplication, resulting from the large memory bank").

One whole step (online teacher CLS, EMA update + momentum forward, student forward, losses, backward, AdamW) of
the thesis' tiny student (configs/thesis_tiny.yaml's shapes, random init) for

    ssmke      S-SMKE with TTE after+LS: MSE on the teacher's CLS + InfoNCE on h' and h'' (the baseline)
    momentum   the same KD + InfoNCE on h'' against the momentum copy and queues of --queue vectors each
    (--all adds student_mb, a student memory bank of 3 x the batch, and itm, ITM with hard negatives)

Steps interleave the arms in one process (the machine is shared and noisy); the report is the median and its
ratio to ssmke.

    python benchmarks/momentum_cost.py --batch 128 --steps 10
    python benchmarks/momentum_cost.py --device cuda --batch 256 --width 768 --depth 6 --queue 65536
"""

from __future__ import annotations

import argparse

import timm
import torch

from alignlab.config import DistillConfig, LossConfig, ModelConfig
from alignlab.data.tokenizers import build_tokenizer
from alignlab.data.transforms import CLIP_MEAN, CLIP_STD
from alignlab.teachers.registry import Teacher, TimmBackbone
from alignlab.training import builders
from alignlab.training.optim import build_optimizer
from alignlab.training.teacher_targets import TeacherTargets
from alignlab.training.thesis_objectives import attach_thesis_modules
from _timing import interleaved_step_times, print_ratios


def model_config(width: int, depth: int, heads: int, image_size: int) -> ModelConfig:
    """configs/thesis_tiny.yaml's student (block, TTE after+LS) at the given width and depth, random init."""
    return ModelConfig(preset="tiny", image={"kwargs": {"img_size": image_size, "patch_size": 8, "depth": depth,
                                                        "embed_dim": width, "num_heads": heads}},
                       text={"width": width, "layers": depth, "heads": heads, "pool": "first", "causal": False},
                       tokenizer={"context_length": 32},
                       student={"shared": "block", "out_dim": width, "heads": heads, "tte": "after_ls"})


def build_arms(model_cfg: ModelConfig, tokenizer, teacher: Teacher, knowledge: dict[str, dict], device) -> dict:
    """arm -> (model, optimizer, loss_fn, targets_fn), each built as the trainer builds it."""
    targets = TeacherTargets(("embedding",), teacher=teacher, input_mean=CLIP_MEAN, input_std=CLIP_STD)
    arms = {}
    for name, settings in knowledge.items():
        torch.manual_seed(0)
        distill = DistillConfig(teacher="benchmark", knowledge={"kind": "ssmke", **settings})
        model = builders.model_from_config(model_cfg, tokenizer)
        attach_thesis_modules(model, distill.knowledge)
        model.to(device).train()
        optimizer = build_optimizer(model, model.no_weight_decay_param_names(), lr=1e-4, weight_decay=0.01,
                                    betas=(0.9, 0.98), eps=1e-6)
        arms[name] = (model, optimizer, builders.loss_from_config(LossConfig(), 1, 0, distill), targets)
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=128, help="towers' width (the thesis: 768)")
    parser.add_argument("--depth", type=int, default=4, help="student blocks per tower (the thesis: 6)")
    parser.add_argument("--teacher-depth", type=int, default=8, help="teacher blocks (the thesis: 12)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--queue", type=int, default=2048, help="momentum queue per modality (the thesis: 65,536)")
    parser.add_argument("--all", action="store_true", help="also time the student memory bank and ITM")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    heads = max(1, args.width // 64)
    model_cfg = model_config(args.width, args.depth, heads, args.image_size)
    tokenizer = build_tokenizer("clip_bpe", context_length=32)
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=args.image_size, patch_size=8,
                                 depth=args.teacher_depth, embed_dim=args.width, num_heads=heads)
    teacher = Teacher(TimmBackbone(backbone), mean=CLIP_MEAN, std=CLIP_STD, image_size=args.image_size,
                      has_logits=False, source="benchmark").to(device).eval()
    knowledge = {"ssmke": {}, "momentum": {"momentum": {"enabled": True, "queue_size": args.queue}}}
    if args.all:
        knowledge |= {"student_mb": {"student_bank_size": 3 * args.batch}, "itm": {"itm": {"negatives": "hard"}}}
    arms = build_arms(model_cfg, tokenizer, teacher, knowledge, device)

    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    tokens = tokenizer([f"a red circle left of a blue star number {i}" for i in range(args.batch)]).to(device)
    times = interleaved_step_times(arms, images, tokens, args.steps, lambda step: {
        "indices": torch.arange(args.batch), "epoch": 0, "step": step, "total_steps": args.steps + 2})

    print(f"device {args.device}, batch {args.batch}, width {args.width}, student depth {args.depth}, teacher "
          f"depth {args.teacher_depth}, {args.image_size} px, queue {args.queue}, {args.steps} steps each, "
          f"torch threads {torch.get_num_threads()}")
    print_ratios(times, base="ssmke")


if __name__ == "__main__":
    main()
