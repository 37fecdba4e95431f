"""`alignlab teacher train` and `alignlab teacher cache` (registered by `register_teacher_commands`).

  alignlab teacher train --data ROOT --out DIR [--config CONFIG.yaml] [--epochs N] ...
  alignlab teacher cache --teacher SRC --data ROOT --out URI --targets objects,attributes --k 10 [--views 1]

The flags are the fields of `TeacherTrainSettings` and `TeacherCacheSettings` (teachers/settings.py), the
same models a spec's `teacher_train` and `teacher_cache` prepare steps use.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignlab.config import ConfigError
from alignlab.settings.cli import add_settings_arguments, settings_from_args
from alignlab.teachers.settings import TeacherCacheSettings, TeacherTrainSettings

# `alignlab teacher train` flags of the nested settings, as they were before the settings model
TRAIN_FLAGS = {f"config.{name}": f"--{name.replace('_', '-')}" for name in
               ("arch", "image_size", "epochs", "batch_size", "lr", "loss", "holdout", "seed")} | {
    "config.kwargs": "--arch-kwargs", "config.concepts.min_count": "--min-count",
    "config.concepts.epochs": "--concept-epochs", "config.concepts.batch_size": "--concept-batch-size",
    "config.concepts.base_lr": "--concept-base-lr", "config.concepts.resample": "--resample"}


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
    from alignlab.teachers.supervised import default_arch, train_teacher

    settings = settings_from_args(TeacherTrainSettings, args, flags=TRAIN_FLAGS)
    if args.config is not None:
        from alignlab.config import load_config

        cfg = load_config(args.config, args.overrides)
        tower = cfg.model.image.name, dict(cfg.model.image.kwargs), cfg.data.image_size
    elif args.overrides:
        raise ConfigError(f"key=value overrides {args.overrides} need --config (they apply to its model/data)")
    else:
        tower = default_arch()
    meta = train_teacher(Path(settings.data), Path(settings.out), settings.config.with_default_arch(*tower),
                         train=settings.train)
    summary = meta["summary"]
    print(json.dumps({"out": settings.out, "arch": meta["arch"], "weights_hash": meta["weights_hash"],
                      "vocab_sizes": {k: len(v) for k, v in meta["concepts"].items()},
                      "holdout_accuracy": summary["holdout_accuracy"], "seconds": summary["seconds"]}, indent=2))
    return 0


def _cmd_teacher_cache(args) -> int:
    from alignlab.teachers.cache import TeacherCache, cache_teacher_targets

    uri = cache_teacher_targets(**settings_from_args(TeacherCacheSettings, args).model_dump(), progress=True)
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
    add_settings_arguments(tr, TeacherTrainSettings, flags=TRAIN_FLAGS)
    tr.add_argument("--config", type=Path, help="experiment config whose model.image / data.image_size to use")
    tr.add_argument("overrides", nargs="*", help="key=value overrides of --config, e.g. model.image.kwargs.depth=2")
    tr.set_defaults(func=_user_errors(_cmd_teacher_train))

    ca = sub.add_parser("cache", help="precompute a teacher's targets for every training image")
    add_settings_arguments(ca, TeacherCacheSettings)
    ca.set_defaults(func=_user_errors(_cmd_teacher_cache))
