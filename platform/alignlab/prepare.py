"""An ablation's shared preparation steps (the spec's `prepare:` list), run once, in order, before any arm.

Each step calls the core function its CLI calls (no subprocesses):

  synth          alignlab.data.synth.generate_synthcaps            (`alignlab data synth`)
  import         alignlab.data.import_cli.run_import               (`alignlab data import <format>`)
  filter         alignlab.filtering.cli.filter_dataset             (`alignlab data filter`)
  teacher_train  alignlab.teachers.supervised.train_teacher        (`alignlab teacher train`)
  teacher_cache  alignlab.teachers.cache.build_teacher_cache       (`alignlab teacher cache`)
  train          alignlab.experiment.run_experiment                (`alignlab train`, e.g. a CLIP scorer)

Every step is idempotent: it skips when its output is complete and says so. "Complete" never trusts a
half-written output:

- synth: the dataset's manifest.json (SynthCaps writes into a temporary folder and renames it; a different
  generator config at the same `out` is an error from the generator);
- teacher_cache: the cache is content-addressed (`<out>/<key>/cache.json`, written last), so an existing
  complete cache with the same key is reused and anything else is built;
- import, filter, teacher_train, train: `<out>/.alignlab-prepare.json` (PREPARE_MARKER), written after the
  step's own completion files (manifest.json, filter_stats.json, teacher.json, final.pt / results.json) and
  recording the step's settings. A step whose output holds another step's marker with other settings fails
  (delete the output or choose another `out`); an output holding `.alignlab-prepare-started.json` but no
  complete marker is an interrupted attempt of this step: import, filter and teacher_train clear it and start
  over, train resumes from its checkpoints. Files that no prepare step wrote are never deleted: the step
  fails and names them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from alignlab.ablation import PrepareEntry, RunPlan, substitute_placeholders
from alignlab.config import ConfigError, apply_overrides, load_yaml, validate_config
from alignlab.storage import open_store

PREPARE_MARKER = ".alignlab-prepare.json"  # written last: the step's output is complete
STARTED_MARKER = ".alignlab-prepare-started.json"  # written first: an attempt of this step owns the output
COMPLETION_FILES = {"import": ("manifest.json",),
                    "filter": ("manifest.json", "filter_stats.json", "removed_samples.jsonl"),
                    "teacher_train": ("teacher.json", "teacher.pth", "backbone.pth")}


def run_prepare(spec, plans: list[RunPlan], *, print_fn: Callable[[str], None] = print) -> list[dict]:
    """Run the spec's prepare steps in order (after the caller generated the runs' datasets); returns one
    result per step ({"kind", "out", "status": "done" | "skipped", ...}). The dataset that `{data_root}`
    names (the base config's) is generated first when a step uses it."""
    if not spec.prepare:
        return []
    if spec.prepare_data_config is not None:
        from alignlab.experiment import prepare_data

        root = prepare_data(spec.prepare_data_config)
        print_fn(f"[alignlab] prepare: {{data_root}} = {root}")
    print_fn(f"[alignlab] prepare: {len(spec.prepare)} shared step(s) before the {len(plans)} runs")
    results = []
    for index, entry in enumerate(spec.prepare):
        results.append(run_prepare_step(entry, {"ablation": spec.name, "index": index,
                                                "total": len(spec.prepare), "print_fn": print_fn}))
    return results


def run_prepare_step(step: PrepareEntry | dict, context: dict[str, Any] | None = None) -> dict:
    """Run one prepare step, or skip it when its output is complete; returns {"kind", "out", "status", ...}.

    `step`: a PrepareEntry or its mapping ({kind: fields}, as in a spec). `context` (all optional):
    "data_root" fills a `{data_root}` left in the step (load_spec already filled them), "ablation" (MLflow
    tags of a train step), "index" / "total" (for the printed line), "print_fn"."""
    context = dict(context or {})
    entry = step if isinstance(step, PrepareEntry) else PrepareEntry.model_validate(step)
    if context.get("data_root") is not None:
        entry = PrepareEntry.model_validate({entry.kind: substitute_placeholders(entry.step.model_dump(mode="json"),
                                                                     {"data_root": str(context["data_root"])})})
    left = [name for name in ("data_root",) if entry.uses(name)]
    if left:
        raise ConfigError(f"prepare step {entry.kind} still has {{{left[0]}}} in it: load the spec with "
                          f"load_spec, or pass context={{'data_root': ...}}")
    print_fn = context.get("print_fn", print)
    where = f"prepare {context['index'] + 1}/{context.get('total', '?')}" if "index" in context else "prepare"
    started = time.perf_counter()
    result = _RUNNERS[entry.kind](entry.step, context, print_fn)
    result = {"kind": entry.kind, **result, "seconds": round(time.perf_counter() - started, 2)}
    detail = f" ({result['detail']})" if result.get("detail") else ""
    verb = "skipped, already complete" if result["status"] == "skipped" else "done"
    print_fn(f"[alignlab] {where} {entry.kind} -> {result['out']}: {verb}{detail}")
    return result


# ---- completion markers --------------------------------------------------------------------------------

def _keys(store) -> list[str]:
    try:
        return sorted(store.list())
    except FileNotFoundError:  # a local folder that does not exist yet
        return []


def _claim_output(out: str, kind: str, settings: dict, required: tuple[str, ...], *,
                  clear_interrupted: bool = True) -> tuple[bool, bool]:
    """(complete, interrupted) of the output folder `out` of a `kind` step with `settings`; when it is not
    complete, mark it as owned by this attempt (STARTED_MARKER) after clearing an interrupted attempt's
    files (unless `clear_interrupted` is False: the caller resumes from them)."""
    store = open_store(out)
    if store.exists(PREPARE_MARKER):
        recorded = json.loads(store.read_bytes(PREPARE_MARKER))
        if recorded.get("kind") != kind or recorded.get("settings") != settings:
            changed = sorted(k for k in set(settings) | set(recorded.get("settings", {}))
                             if settings.get(k) != recorded.get("settings", {}).get(k))
            raise ConfigError(f"{store.uri(PREPARE_MARKER)} records a {recorded.get('kind')} step with other settings "
                              f"(differing: {', '.join(changed) or 'kind'}): delete {out} to make it again, or "
                              f"choose another out")
        if all(store.exists(name) for name in required):
            return True, False
    present = [key for key in _keys(store) if key != STARTED_MARKER]
    interrupted = store.exists(STARTED_MARKER) or store.exists(PREPARE_MARKER)
    if present and not interrupted:
        raise FileExistsError(f"{out} already holds {len(present)} file(s) that no prepare step wrote (first: "
                              f"{present[0]}); delete them or choose another out for this {kind} step")
    if present and clear_interrupted:
        for key in present:
            store.delete(key)
    store.write_bytes(STARTED_MARKER, json.dumps({"kind": kind, "settings": settings}).encode())
    return False, bool(present)


def _mark_complete(out: str, kind: str, settings: dict) -> None:
    store = open_store(out)
    store.write_bytes(PREPARE_MARKER, json.dumps({"kind": kind, "settings": settings,
                                                  "completed": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                                 indent=1).encode())
    store.delete(STARTED_MARKER)


# ---- the steps -----------------------------------------------------------------------------------------

def _synth(step, context: dict, print_fn) -> dict:
    from alignlab.data.synth import generate_synthcaps

    out = Path(step.out)
    existed = (out / "manifest.json").is_file()
    manifest = generate_synthcaps(out, step.config, progress=not existed)
    return {"out": str(out), "status": "skipped" if existed else "done", "dataset_hash": manifest["dataset_hash"],
            "detail": f"{manifest['counts'].get('train', '?')} training pairs"}


def _import(step, context: dict, print_fn) -> dict:
    from alignlab.data.import_cli import add_import_arguments, run_import

    settings = step.model_dump(mode="json")
    complete, interrupted = _claim_output(step.out, "import", settings, COMPLETION_FILES["import"])
    if not complete:
        if interrupted:
            print_fn(f"[alignlab] {step.out}: cleared the files of an interrupted import")
        args = add_import_arguments(argparse.ArgumentParser(prog="alignlab data import")).parse_args(_import_argv(step))
        status = run_import(args)
        if status != 0:
            raise RuntimeError(f"prepare import -> {step.out}: `alignlab data import {step.format}` exited with "
                               f"status {status} (its error and skip table are printed above)")
        _mark_complete(step.out, "import", settings)
    manifest = json.loads(open_store(step.out).read_bytes("manifest.json"))
    return {"out": step.out, "status": "skipped" if complete else "done", "dataset_hash": manifest["dataset_hash"],
            "detail": f"{manifest['counts']['train']} pairs, {manifest['counts']['skipped']} skipped"}


def _import_argv(step) -> list[str]:
    """The `alignlab data import` arguments of an import step."""
    argv = [step.format]
    if step.format == "coco":
        argv += ["--annotations", step.sources[0]] if step.sources else []
        argv += ["--karpathy", step.karpathy, "--split", step.split] if step.karpathy else []
    elif step.format == "tsv":
        argv += [step.sources[0], "--header", step.header, "--image-column", step.image_column,
                 "--caption-column", step.caption_column]
    else:
        argv += list(step.sources)
    if step.image_root and step.format != "webdataset":
        argv += ["--image-root", step.image_root]
    return argv + ["--out", step.out, "--shard-size", str(step.shard_size)]


def filter_arguments(step) -> argparse.Namespace:
    """The parsed `alignlab data filter` options of a filter step (the filter's own parser: its defaults
    fill what the step does not set)."""
    from alignlab.filtering.cli import add_filter_arguments

    argv = ["--data", step.data, "--out", step.out, "--stages", ",".join(step.stages), "--format", step.format,
            "--train", step.train, "--min-complexity", str(step.min_complexity), "--min-actions",
            str(step.min_actions), "--clip-threshold", str(step.clip_threshold), "--workers", str(step.workers),
            "--shard-size", str(step.shard_size)]
    if step.clip_checkpoint:
        argv += ["--clip-checkpoint", step.clip_checkpoint]
    return add_filter_arguments(argparse.ArgumentParser(prog="alignlab data filter")).parse_args(argv)


def _filter(step, context: dict, print_fn) -> dict:
    from alignlab.filtering.cli import filter_dataset

    settings = step.model_dump(mode="json")
    args = filter_arguments(step)
    complete, interrupted = _claim_output(step.out, "filter", settings, COMPLETION_FILES["filter"])
    if not complete:
        if interrupted:
            print_fn(f"[alignlab] {step.out}: cleared the files of an interrupted filter")
        report = filter_dataset(args)
        print_fn(report["table"])
        _mark_complete(step.out, "filter", settings)
    stats = json.loads(open_store(step.out).read_bytes("filter_stats.json"))
    return {"out": step.out, "status": "skipped" if complete else "done", "kept": stats["written"],
            "total": stats["total"], "detail": f"kept {stats['written']} of {stats['total']} pairs"}


def _teacher_train(step, context: dict, print_fn) -> dict:
    from alignlab.teachers.concepts import ConceptHeadConfig
    from alignlab.teachers.supervised import TeacherTrainConfig, train_teacher

    settings = step.model_dump(mode="json")
    complete, interrupted = _claim_output(step.out, "teacher_train", settings, COMPLETION_FILES["teacher_train"])
    if not complete:
        c = step.config
        concepts = ConceptHeadConfig(min_count=c.concepts.min_count, epochs=c.concepts.epochs,
                                     batch_size=c.concepts.batch_size, base_lr=c.concepts.base_lr,
                                     resample=c.concepts.resample, seed=c.seed)
        config = TeacherTrainConfig(arch=c.arch or "", kwargs=dict(c.kwargs or {}),
                                    image_size=c.image_size or (c.kwargs or {}).get("img_size") or 64,
                                    epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, holdout=c.holdout, seed=c.seed,
                                    concepts=concepts)
        train_teacher(Path(step.data), Path(step.out), config, train=step.train)
        _mark_complete(step.out, "teacher_train", settings)
    meta = json.loads((Path(step.out) / "teacher.json").read_text())
    accuracy = meta["summary"]["holdout_accuracy"].get("shape", {}).get("top1")
    return {"out": step.out, "status": "skipped" if complete else "done", "weights_hash": meta["weights_hash"],
            "detail": f"{meta['arch']}, hold-out shape top-1 {accuracy:.3f}" if accuracy is not None else meta["arch"]}


def _complete_caches(out: str) -> set[str]:
    """Keys of the complete teacher caches directly under `out` (those with cache.json)."""
    from alignlab.teachers.cache import CACHE_JSON

    return {key.split("/")[0] for key in _keys(open_store(out)) if key.count("/") == 1 and key.endswith(CACHE_JSON)}


def _teacher_cache(step, context: dict, print_fn) -> dict:
    import torch

    from alignlab.teachers import load_teacher
    from alignlab.teachers.cache import build_teacher_cache

    before = _complete_caches(step.out)
    teacher = load_teacher(step.teacher)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = step.data if step.data.startswith("s3://") else Path(step.data)
    uri = build_teacher_cache(teacher.to(device), data, step.out, targets=list(step.targets), k=step.k,
                              views=step.views, batch_size=step.batch_size, image_size=step.image_size,
                              train=step.train, progress=True)
    key = uri.rstrip("/").rsplit("/", 1)[1]
    return {"out": step.out, "status": "skipped" if key in before else "done", "cache": uri,
            "detail": f"cache {key}, targets {','.join(step.targets)}, k={step.k}, views={step.views}"}


def _train(step, context: dict, print_fn) -> dict:
    from alignlab.experiment import run_experiment

    if step.config is None:
        raise ConfigError("prepare train step without a config: load the spec with load_spec (it fills in the "
                          "spec's base config) or give `config`")
    tree = load_yaml(step.config) if isinstance(step.config, str) else step.config
    cfg = validate_config(apply_overrides(tree, step.overrides), source=f"prepare train -> {step.run_dir}")
    settings = step.model_dump(mode="json")
    required = ("final.pt", "results.json")
    complete, interrupted = _claim_output(step.run_dir, "train", settings, required, clear_interrupted=False)
    if not complete:
        resume = interrupted and (Path(step.run_dir) / "checkpoints").is_dir()
        if resume:
            print_fn(f"[alignlab] {step.run_dir}: resuming an interrupted prepare train from its checkpoints")
        ablation = context.get("ablation") or cfg.name
        run_experiment(cfg, Path(step.run_dir), ablation=ablation, arm=f"prepare/{Path(step.run_dir).name}",
                       resume=resume)
        _mark_complete(step.run_dir, "train", settings)
    metrics = json.loads((Path(step.run_dir) / "results.json").read_text())
    final_loss = metrics.get("final_loss")
    return {"out": step.run_dir, "status": "skipped" if complete else "done",
            "checkpoint": str(Path(step.run_dir) / "final.pt"),
            "detail": f"final_loss {final_loss:.4f}" if isinstance(final_loss, (int, float)) else ""}


_RUNNERS: dict[str, Callable[[Any, dict, Callable], dict]] = {
    "synth": _synth, "import": _import, "filter": _filter, "teacher_train": _teacher_train,
    "teacher_cache": _teacher_cache, "train": _train,
}
