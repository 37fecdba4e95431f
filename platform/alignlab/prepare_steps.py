"""The kinds of a spec's `prepare:` steps, each declared once with `@prepare_kind`: its settings model (the
step's fields in a spec, the same model the operation's CLI flags come from), the files that mark its output
complete, and the function that runs it. `PrepareEntry`, the model of one `prepare:` entry, is built from
this registry, so a new kind is one decorated function here.

    @prepare_kind("filter", FilterSettings, completion_files=("manifest.json", "filter_stats.json", ...))
    def _filter(step: FilterSettings, *, complete: bool, interrupted: bool, context: dict, print_fn) -> dict:
        ...

A kind with `completion_files` owns its output folder (`alignlab.prepare` claims it, clears an interrupted
attempt unless `resume_interrupted`, and marks it complete after the run); its function is called with
`complete=True` when there is nothing to do and only reports the output. A kind without them (synth,
teacher_cache) decides for itself whether its output is already there. Each function returns {"out", ...,
"detail"} and, when it decided itself, "status": "done" | "skipped". Heavy imports (torch, PIL, spaCy) stay
inside the functions: loading a spec must not pay for them.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from alignlab.config import ConfigError, apply_overrides, load_yaml, validate_config
from alignlab.data.import_settings import ImportSettings
from alignlab.data.synth.config import SynthCapsConfig
from alignlab.filtering.settings import FilterSettings
from alignlab.storage import open_store
from alignlab.teachers.settings import TeacherCacheSettings, TeacherTrainSettings

PLACEHOLDERS = ("data_root",)
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class PrepareKind:
    """One kind of prepare step (module docstring)."""

    name: str
    settings: type[BaseModel]
    run: Callable[..., dict]
    completion_files: tuple[str, ...] = ()
    resume_interrupted: bool = False  # keep an interrupted attempt's files: the run resumes from them
    out_field: str = "out"  # the settings field naming the output folder

    def out(self, step: BaseModel) -> str:
        return getattr(step, self.out_field)


PREPARE_KINDS: dict[str, PrepareKind] = {}


def prepare_kind(name: str, settings: type[BaseModel], *, completion_files: tuple[str, ...] = (),
                 resume_interrupted: bool = False, out_field: str = "out"):
    """Register the decorated function as the runner of the prepare kind `name` with its settings model."""
    def register(run: Callable[..., dict]) -> Callable[..., dict]:
        if name in PREPARE_KINDS:
            raise ValueError(f"prepare kind {name!r} is registered twice")
        PREPARE_KINDS[name] = PrepareKind(name, settings, run, tuple(completion_files), resume_interrupted,
                                          out_field)
        return run
    return register


# ---- the kinds ---------------------------------------------------------------------------------------------

class SynthStep(BaseModel):
    """SynthCaps generated into `out` (reused when already there with the same settings)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    out: str = Field(min_length=1)
    config: SynthCapsConfig = Field(default_factory=SynthCapsConfig, description="SynthCaps generator settings.")


@prepare_kind("synth", SynthStep)
def _synth(step: SynthStep, *, complete: bool, interrupted: bool, context: dict, print_fn) -> dict:
    from alignlab.data.synth import generate_synthcaps

    out = Path(step.out)
    existed = (out / "manifest.json").is_file()
    manifest = generate_synthcaps(out, step.config, progress=not existed)
    return {"out": str(out), "status": "skipped" if existed else "done", "dataset_hash": manifest["dataset_hash"],
            "detail": f"{manifest['counts'].get('train', '?')} training pairs"}


@prepare_kind("import", ImportSettings, completion_files=("manifest.json",))
def _import(step: ImportSettings, *, complete: bool, interrupted: bool, context: dict, print_fn) -> dict:
    if not complete:
        from alignlab.data.importers import format_summary, import_source

        manifest = import_source(**step.model_dump())
        print_fn(format_summary(manifest))
        if not manifest["counts"]["train"]:
            raise RuntimeError(f"prepare import -> {step.out}: no pair was written (the skip table above says why)")
    manifest = json.loads(open_store(step.out).read_bytes("manifest.json"))
    return {"out": step.out, "dataset_hash": manifest["dataset_hash"],
            "detail": f"{manifest['counts']['train']} pairs, {manifest['counts']['skipped']} skipped"}


@prepare_kind("filter", FilterSettings,
              completion_files=("manifest.json", "filter_stats.json", "removed_samples.jsonl"))
def _filter(step: FilterSettings, *, complete: bool, interrupted: bool, context: dict, print_fn) -> dict:
    if not complete:
        from alignlab.filtering.dataset import filter_dataset

        print_fn(filter_dataset(**step.model_dump())["table"])
    stats = json.loads(open_store(step.out).read_bytes("filter_stats.json"))
    return {"out": step.out, "kept": stats["written"], "total": stats["total"],
            "detail": f"kept {stats['written']} of {stats['total']} pairs"}


@prepare_kind("teacher_train", TeacherTrainSettings, completion_files=("teacher.json", "teacher.pth", "backbone.pth"))
def _teacher_train(step: TeacherTrainSettings, *, complete: bool, interrupted: bool, context: dict,
                   print_fn) -> dict:
    if not complete:
        from alignlab.teachers.supervised import train_teacher

        train_teacher(Path(step.data), Path(step.out), step.config, train=step.train)
    meta = json.loads((Path(step.out) / "teacher.json").read_text())
    accuracy = meta["summary"]["holdout_accuracy"].get("shape", {}).get("top1")
    return {"out": step.out, "weights_hash": meta["weights_hash"],
            "detail": f"{meta['arch']}, hold-out shape top-1 {accuracy:.3f}" if accuracy is not None else meta["arch"]}


def _complete_caches(out: str) -> set[str]:
    """Keys of the complete teacher caches directly under `out` (those with cache.json)."""
    from alignlab.teachers.cache import CACHE_JSON

    try:
        keys = open_store(out).list()
    except FileNotFoundError:  # a local folder that does not exist yet
        return set()
    return {key.split("/")[0] for key in keys if key.count("/") == 1 and key.endswith(CACHE_JSON)}


@prepare_kind("teacher_cache", TeacherCacheSettings)
def _teacher_cache(step: TeacherCacheSettings, *, complete: bool, interrupted: bool, context: dict,
                   print_fn) -> dict:
    from alignlab.teachers.cache import cache_teacher_targets

    before = _complete_caches(step.out)
    uri = cache_teacher_targets(**step.model_dump(), progress=True)
    key = uri.rstrip("/").rsplit("/", 1)[1]
    return {"out": step.out, "status": "skipped" if key in before else "done", "cache": uri,
            "detail": f"cache {key}, targets {','.join(step.targets)}, k={step.k}, views={step.views}"}


class TrainStep(BaseModel):
    """One training run into `run_dir` (and its evaluation when the config's eval is enabled), e.g. the CLIP
    scorer of the CLIP-score filter. `config`: a path relative to the spec file, an inline mapping, or None
    for the spec's base config after the spec's overrides; `overrides` apply on top. `load_spec` replaces both
    by the resolved config mapping."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    config: str | dict[str, Any] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    run_dir: str = Field(min_length=1)


@prepare_kind("train", TrainStep, completion_files=("final.pt", "results.json"), resume_interrupted=True,
              out_field="run_dir")
def _train(step: TrainStep, *, complete: bool, interrupted: bool, context: dict, print_fn) -> dict:
    if not complete:
        from alignlab.experiment import run_experiment

        if step.config is None:
            raise ConfigError("prepare train step without a config: load the spec with load_spec (it fills in the "
                              "spec's base config) or give `config`")
        tree = load_yaml(step.config) if isinstance(step.config, str) else step.config
        cfg = validate_config(apply_overrides(tree, step.overrides), source=f"prepare train -> {step.run_dir}")
        resume = interrupted and (Path(step.run_dir) / "checkpoints").is_dir()
        if resume:
            print_fn(f"[alignlab] {step.run_dir}: resuming an interrupted prepare train from its checkpoints")
        run_experiment(cfg, Path(step.run_dir), ablation=context.get("ablation") or cfg.name,
                       arm=f"prepare/{Path(step.run_dir).name}", resume=resume)
    metrics = json.loads((Path(step.run_dir) / "results.json").read_text())
    final_loss = metrics.get("final_loss")
    return {"out": step.run_dir, "checkpoint": str(Path(step.run_dir) / "final.pt"),
            "detail": f"final_loss {final_loss:.4f}" if isinstance(final_loss, (int, float)) else ""}


# ---- one prepare entry ---------------------------------------------------------------------------------------

def _strings(value, where: str):
    """(dotted path, text) of every string inside a JSON-like value (keys of mappings included)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key, f"{where}.{key}")
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}.{i}")


def substitute_placeholders(value, mapping: dict[str, str]):
    """`value` (a JSON-like tree) with every `{name}` of `mapping` in its strings replaced; others kept."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: mapping.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {substitute_placeholders(k, mapping): substitute_placeholders(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_placeholders(v, mapping) for v in value]
    return value


def _field(kind: str) -> str:
    return f"{kind}_" if kind in ("import",) else kind  # a Python keyword cannot be a field name


class _PrepareEntryBase(BaseModel):
    """One `prepare` entry: a mapping with exactly one key, the step kind (a union tagged by that key)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False,
                              json_schema_extra={"minProperties": 1, "maxProperties": 1})

    @model_validator(mode="after")
    def _one_kind(self) -> "_PrepareEntryBase":
        given = [kind for kind in PREPARE_KINDS if getattr(self, _field(kind)) is not None]
        if len(given) != 1:
            raise ValueError(f"a prepare entry is a mapping with exactly one step kind ({', '.join(PREPARE_KINDS)}), "
                             f"got {given or 'none'}")
        for where, text in _strings(self.step.model_dump(mode="json"), self.kind):
            for name in _PLACEHOLDER.findall(text):
                if name not in PLACEHOLDERS:
                    raise ValueError(f"{where}: unknown placeholder {{{name}}} (the only one is {{data_root}})")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in PREPARE_KINDS if getattr(self, _field(kind)) is not None)

    @property
    def step(self) -> BaseModel:
        return getattr(self, _field(self.kind))

    def uses(self, placeholder: str) -> bool:
        return any(f"{{{placeholder}}}" in text for _, text in _strings(self.step.model_dump(mode="json"), ""))

    def to_dict(self) -> dict:
        """{kind: fields} as written in a spec (JSON-able; what the KFP prepare components receive)."""
        return {self.kind: self.step.model_dump(mode="json")}


PrepareEntry = create_model(
    "PrepareEntry", __base__=_PrepareEntryBase, __module__=__name__,
    **{_field(kind.name): (kind.settings | None, Field(None, alias=kind.name,
                                                      description=inspect.cleandoc(kind.settings.__doc__ or "")))
       for kind in PREPARE_KINDS.values()})
