"""An ablation's shared preparation steps (the spec's `prepare:` list), run once, in order, before any arm.

Each step calls the library function its CLI calls, with the same settings model (no subprocesses); the
kinds, their settings, completion files and runners are declared once in `alignlab.prepare_steps`:

  synth          alignlab.data.synth.generate_synthcaps            (`alignlab data synth`)
  import         alignlab.data.importers.import_source             (`alignlab data import <format>`)
  filter         alignlab.filtering.dataset.filter_dataset         (`alignlab data filter`)
  teacher_train  alignlab.teachers.supervised.train_teacher        (`alignlab teacher train`)
  teacher_cache  alignlab.teachers.cache.cache_teacher_targets     (`alignlab teacher cache`)
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

import json
import time
from typing import Any, Callable

from alignlab.config import ConfigError
from alignlab.prepare_steps import PREPARE_KINDS, PrepareEntry, substitute_placeholders
from alignlab.storage import open_store

PREPARE_MARKER = ".alignlab-prepare.json"  # written last: the step's output is complete
STARTED_MARKER = ".alignlab-prepare-started.json"  # written first: an attempt of this step owns the output


def run_prepare(spec, plans: list, *, print_fn: Callable[[str], None] = print) -> list[dict]:
    """Run the prepare steps of `spec` (an AblationSpec from load_spec) in order, before the runs `plans`
    (after the caller generated their datasets); returns one result per step ({"kind", "out", "status":
    "done" | "skipped", ...}). The dataset that `{data_root}` names (the base config's) is generated first
    when a step uses it."""
    if not spec.prepare:
        return []
    if spec.prepare_data_config is not None:
        from alignlab.experiment import ensure_dataset

        root = ensure_dataset(spec.prepare_data_config)
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
    kind = PREPARE_KINDS[entry.kind]
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
    complete = interrupted = False
    settings = entry.step.model_dump(mode="json")
    if kind.completion_files:
        out = kind.out(entry.step)
        complete, interrupted = _claim_output(out, kind.name, settings, kind.completion_files,
                                              clear_interrupted=not kind.resume_interrupted)
        if interrupted and not kind.resume_interrupted:
            print_fn(f"[alignlab] {out}: cleared the files of an interrupted {kind.name}")
    result = kind.run(entry.step, complete=complete, interrupted=interrupted, context=context, print_fn=print_fn)
    if kind.completion_files and not complete:
        _mark_complete(out, kind.name, settings)
    result = {"kind": entry.kind, "status": "skipped" if complete else "done", **result,
              "seconds": round(time.perf_counter() - started, 2)}
    detail = f" ({result['detail']})" if result.get("detail") else ""
    verb = "skipped, already complete" if result["status"] == "skipped" else "done"
    print_fn(f"[alignlab] {where} {entry.kind} -> {result['out']}: {verb}{detail}")
    return result


# ---- completion markers ------------------------------------------------------------------------------

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
