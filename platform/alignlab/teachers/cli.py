"""`alignlab teacher train` and `alignlab teacher cache` (registered by `register_teacher_commands`).

  alignlab teacher train --data ROOT --out DIR [--config CONFIG.yaml] [--epochs N] ...
  alignlab teacher cache --teacher SRC --data ROOT --out URI --targets objects,attributes --k 10 [--views 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alignlab.config import ConfigError


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}); e.g. '{{\"img_size\": 64}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"img_size\": 64}'")
    return value


def _user_errors(command):
    """Report ValueErrors (bad arguments, data or caches; their messages say how to fix them) as CLI errors."""
    def run(args) -> int:
        try:
            return command(args)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None

    return run


def _cmd_teacher_train(args) -> int:
    from alignlab.teachers.concepts import ConceptHeadConfig
    from alignlab.teachers.supervised import TeacherTrainConfig, default_arch, train_teacher

    if args.config is not None:
        from alignlab.config import load_config

        cfg = load_config(args.config, args.overrides)
        arch, kwargs, image_size = cfg.model.image.name, dict(cfg.model.image.kwargs), cfg.data.image_size
    elif args.overrides:
        raise ConfigError(f"key=value overrides {args.overrides} need --config (they apply to its model/data)")
    else:
        arch, kwargs, image_size = default_arch()
    if args.arch:
        arch, kwargs = args.arch, args.arch_kwargs if args.arch_kwargs is not None else {}
    elif args.arch_kwargs is not None:
        kwargs = {**kwargs, **args.arch_kwargs}
    image_size = args.image_size or kwargs.get("img_size") or image_size
    try:
        concepts = ConceptHeadConfig(min_count=args.min_count, epochs=args.concept_epochs,
                                     batch_size=args.concept_batch_size, base_lr=args.concept_base_lr,
                                     resample=args.resample, seed=args.seed)
        config = TeacherTrainConfig(arch=arch, kwargs=kwargs, image_size=image_size, epochs=args.epochs,
                                    batch_size=args.batch_size, lr=args.lr, holdout=args.holdout, seed=args.seed,
                                    concepts=concepts)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    meta = train_teacher(args.data, args.out, config, train=args.train)
    summary = meta["summary"]
    print(json.dumps({"out": str(args.out), "arch": meta["arch"], "weights_hash": meta["weights_hash"],
                      "vocab_sizes": {k: len(v) for k, v in meta["concepts"].items()},
                      "holdout_accuracy": summary["holdout_accuracy"], "seconds": summary["seconds"]}, indent=2))
    return 0


def _cmd_teacher_cache(args) -> int:
    import torch

    from alignlab.teachers import load_teacher
    from alignlab.teachers.cache import TeacherCache, build_teacher_cache

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    teacher = load_teacher(args.teacher, arch=args.arch, kwargs=args.arch_kwargs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    uri = build_teacher_cache(teacher.to(device), args.data, args.out, targets=targets, k=args.k, views=args.views,
                              batch_size=args.batch_size, image_size=args.image_size, view_seed=args.view_seed,
                              shard_size=args.shard_size, train=args.train, num_workers=args.num_workers,
                              force=args.force, progress=True)
    cache = TeacherCache.open(uri, verify=False)
    print(json.dumps({"cache": uri, "key": cache.key, "samples": len(cache), "targets": list(cache.targets),
                      "k": cache.k, "views": cache.views, "bytes_per_sample": cache.bytes_per_sample,
                      "dataset_hash": cache.dataset_hash, "build_seconds": cache.meta["build_seconds"]}, indent=2))
    return 0


def register_teacher_commands(subparsers) -> None:
    """Add `teacher train` and `teacher cache` to the `alignlab` sub-command parsers."""
    teacher = subparsers.add_parser("teacher", help="vision teachers: train one, cache its targets")
    sub = teacher.add_subparsers(dest="teacher_command", required=True)

    tr = sub.add_parser("train", help="train a supervised teacher + DiHT concept heads on SynthCaps")
    tr.add_argument("--data", required=True, type=Path, help="SynthCaps root (train shards with metadata)")
    tr.add_argument("--out", required=True, type=Path, help="teacher folder to write")
    tr.add_argument("--config", type=Path, help="experiment config whose model.image / data.image_size to use")
    tr.add_argument("overrides", nargs="*", help="key=value overrides of --config, e.g. model.image.kwargs.depth=2")
    tr.add_argument("--arch", help="timm:<name> instead of the config's image tower")
    tr.add_argument("--arch-kwargs", type=_json_dict, help="JSON kwargs of the timm model (merged into the config's)")
    tr.add_argument("--image-size", type=int, help="input size (default: the tower's img_size, else data.image_size)")
    tr.add_argument("--train", default="train", help="training shards under --data (dir, glob or brace pattern)")
    tr.add_argument("--epochs", type=int, default=3)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=2e-3, help="AdamW peak lr of the supervised backbone")
    tr.add_argument("--holdout", type=float, default=0.1, help="fraction of pairs held out for accuracy")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--min-count", type=int, default=5, help="concept vocabulary: captions a concept must occur in")
    tr.add_argument("--concept-epochs", type=int, default=30)
    tr.add_argument("--concept-batch-size", type=int, default=256)
    tr.add_argument("--concept-base-lr", type=float, default=0.001, help="SGD lr = this * batch / 256 (DiHT)")
    tr.add_argument("--resample", choices=("inv_sqrt", "none"), default="inv_sqrt",
                    help="inverse-square-root resampling of rare concepts (DiHT) or none")
    tr.set_defaults(func=_user_errors(_cmd_teacher_train))

    ca = sub.add_parser("cache", help="precompute a teacher's targets for every training image")
    ca.add_argument("--teacher", required=True, help="timm:<name>, hf:<dir>, a teacher folder or a checkpoint")
    ca.add_argument("--arch", help="timm:<name> of a timm checkpoint file given as --teacher")
    ca.add_argument("--arch-kwargs", type=_json_dict, help="JSON kwargs of the timm model")
    ca.add_argument("--data", required=True, type=Path, help="dataset root with manifest.json and train shards")
    ca.add_argument("--train", default="train", help="training shards under --data")
    ca.add_argument("--out", required=True, help="cache root (local path or s3://bucket/prefix); writes <out>/<key>/")
    ca.add_argument("--targets", default="objects,attributes", help="comma list of objects,attributes,logits,embedding")
    ca.add_argument("--k", type=int, default=10, help="top-k kept of each concept head")
    ca.add_argument("--views", type=int, default=1, help="view 0 = eval transform; more = seeded train augmentations")
    ca.add_argument("--view-seed", type=int, default=0)
    ca.add_argument("--image-size", type=int, help="student image size (default: the dataset manifest's)")
    ca.add_argument("--batch-size", type=int, default=128)
    ca.add_argument("--shard-size", type=int, default=65536, help="samples per cache shard")
    ca.add_argument("--num-workers", type=int, default=0)
    ca.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ca.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    ca.set_defaults(func=_user_errors(_cmd_teacher_cache))
