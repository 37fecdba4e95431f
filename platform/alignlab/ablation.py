"""Ablation specs: a base config, named arms or a grid of axes, seeds and a baseline arm.

```yaml
name: demo
base: ../configs/tiny_synthcaps.yaml   # path relative to this file, or an inline mapping
overrides: {train.epochs: 2}           # applied to every arm
arms:                                  # either arms ...
  clean: {data.synth.mismatch: 0.0}
  noisy: {data.synth.mismatch: 0.4}
grid:                                  # ... or a grid: one arm per combination, named axis=value,...
  loss.name: [infonce, psd]
seeds: [0, 1]
baseline: clean
report_metrics: [retrieval/mean_R@1, zeroshot/shape/top1]
report_plot: {x: data.synth.mismatch, group: loss.name, metrics: [retrieval/mean_R@1]}   # optional
gate: {rules: gates/nightly_gate.yaml}   # optional: regression gate against earlier runs (nightly)
prepare:                               # optional: shared steps, run once, in order, before any arm trains
  - synth: {out: data/teacher-synth, config: {seed: 1, num_train: 2000}}
  - teacher_train: {data: data/teacher-synth, out: teachers/tiny, config: {epochs: 3}}
  - teacher_cache: {teacher: teachers/tiny, data: "{data_root}", out: "{data_root}/teacher-caches"}
  - train: {run_dir: runs/scorer, overrides: {eval.enabled: false}}
  - filter: {data: "{data_root}", out: data/filtered/c-a, stages: [complexity, action]}
```
Every arm x seed is validated when the spec is loaded, so a typo fails before any work starts.

`prepare` entries are mappings with one key, the step kind (fields: the kind's settings model, registered
in `alignlab.prepare_steps`; errors name `prepare.<index>.<kind>.<field>`): `synth` (SynthCaps into `out`),
`import` (`alignlab data import`),
`filter` (`alignlab data filter`), `teacher_train`, `teacher_cache` (`alignlab teacher train / cache`) and
`train` (one run, e.g. the CLIP scorer of the CLIP-score filter; its `config` is a path relative to this
file, an inline mapping, or by default the spec's base config after the spec's overrides). Paths are
relative to the working folder, like the configs' `data/` and `runs/`; `{data_root}` stands for the data
root of the base config after the spec's (and the command line's) overrides, whose data is generated
before the prepare steps. Each step skips when its output is complete (`alignlab.prepare`).
Extra `key=value` overrides apply to every arm; the one reserved key `seeds` replaces the spec's seeds
(`alignlab run ablations/psd.yaml seeds=[0]` for a one-seed look).

Names are folder names: runs go to `<output_dir>/<spec name>/<arm>/seed-<n>`, with characters other than
letters, digits and `_ . , = + -` written as `_`. So a spec or arm name may not be empty, `.` or `..`, an arm
name may not hold `/` or `\\`, and two arms whose folder names come out the same (`a b` and `a_b`, or grid
values `x/y` and `x_y`) are refused, as is a key given twice (the YAML loader).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from alignlab.config import (
    ConfigError,
    config_to_dict,
    ExperimentConfig,
    apply_overrides,
    check_inside,
    check_path_name,
    load_yaml,
    parse_override,
    validate_config,
)
from alignlab.data.roots import resolve_data_root
from alignlab.prepare_steps import PrepareEntry, substitute_placeholders
from alignlab.redaction import redact


class ReportPlot(BaseModel):
    """Plot metrics against one config field (x), one line per value of another (group)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    x: str
    group: str | None = None
    metrics: list[str] = Field(min_length=1)


class GateSpec(BaseModel):
    """A regression gate after the report (the nightly suite): each run against the earlier runs of its arm
    in MLflow, with the rules of `alignlab gate --rules` (see ablations/gates/nightly_gate.yaml)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rules: str = Field(min_length=1, description="Gate rules YAML, relative to the spec file.")
    textfile: str | None = Field(None, description="Also write the gauges to this Prometheus textfile (*.prom).")
    pushgateway: str | None = Field(None, description="Also push the gauges to this Pushgateway URL.")


class PaperClaim(BaseModel):
    """One claim of the paper a spec mirrors: `arm` beats (direction higher) or undercuts (lower) the spec's
    baseline arm on `metric`; the results book judges it from the runs (alignlab.report.book)."""

    model_config = ConfigDict(extra="forbid")

    claim: str
    arm: str
    metric: str
    direction: Literal["higher", "lower"] = "higher"
    baseline: str | None = Field(None, description="The arm compared against; default: the spec's baseline.")


class PaperRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="The paper's row, e.g. 'swapped, dynamic, progressive'.")
    values: dict[str, float | None] = Field(default_factory=dict, description="Paper column -> its number.")


class PaperBlock(BaseModel):
    """The paper's own numbers next to a spec (results book): its table, which SynthCaps metric stands for
    each paper column, and the claims to judge."""

    model_config = ConfigDict(extra="forbid")

    title: str
    source: str = Field(description="Paper, table and setting, e.g. 'PSD (001) Table 4, COCO, ViT-B/32'.")
    columns: dict[str, str] = Field(default_factory=dict, description="Paper column -> metric reported here.")
    rows: dict[str, PaperRow] = Field(default_factory=dict, description="Arm here -> the paper's row.")
    claims: list[PaperClaim] = Field(default_factory=list)
    notes: str | None = None


class AblationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: str | dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)
    arms: dict[str, dict[str, Any]] | None = None
    grid: dict[str, list[Any]] | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    baseline: str | None = None
    report_metrics: list[str] | None = None
    report_plot: ReportPlot | None = None
    gate: GateSpec | None = None
    prepare: list[PrepareEntry] = Field(default_factory=list)
    paper: PaperBlock | None = None

    # Set by load_spec when a prepare step uses {data_root}: the base config whose data must exist first.
    _prepare_data_config: ExperimentConfig | None = PrivateAttr(None)

    @property
    def prepare_data_config(self) -> ExperimentConfig | None:
        """The base config whose dataset the prepare steps read through `{data_root}` (None: none does)."""
        return self._prepare_data_config

    @model_validator(mode="after")
    def _check(self) -> "AblationSpec":
        check_path_name(self.name, "spec name")
        if (self.arms is None) == (self.grid is None):
            raise ValueError("give exactly one of `arms` (named overrides) or `grid` (axes to combine)")
        if self.arms is not None and not self.arms:
            raise ValueError("arms is empty: give at least one arm, e.g. `arms: {baseline: {}}`")
        if self.grid is not None and not self.grid:
            raise ValueError("grid has no axes: give at least one, e.g. `grid: {loss.name: [infonce, psd]}`")
        if self.grid is not None and any(not values for values in self.grid.values()):
            raise ValueError("every grid axis needs at least one value")
        for arm in self.arms or {}:
            if "/" in arm or "\\" in arm or arm in ("", ".", ".."):
                raise ValueError(f"arm {arm!r}: an arm name is one folder name (not empty, '.', '..', no '/' or "
                                 f"'\\'); rename it, e.g. {_safe(arm).strip('.') or 'arm'!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        names = self.arm_overrides().keys()
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not an arm; arms are {sorted(names)}")
        if self.paper is not None:
            named = {c.arm for c in self.paper.claims} | {c.baseline for c in self.paper.claims if c.baseline}
            unknown = sorted((named | set(self.paper.rows)) - set(names))
            if unknown:
                raise ValueError(f"paper: arms {unknown} are not arms of this spec; arms are {sorted(names)}")
        return self

    def arm_overrides(self) -> dict[str, dict[str, Any]]:
        """Arm name -> overrides; grid arms are named `axis=value,...` (URI credentials redacted). Two arms
        whose run folders would be the same raise ValueError naming both."""
        if self.arms is not None:
            named = list(self.arms.items())
        else:
            axes = list(self.grid)
            named = [(",".join(f"{a.split('.')[-1]}={redact(str(v))}" for a, v in zip(axes, combo)),
                      dict(zip(axes, combo))) for combo in itertools.product(*(self.grid[a] for a in axes))]
        out, first = {}, {}
        for name, overrides in named:
            folder = _safe(name)
            if folder in first:
                what = "grid arms" if self.grid is not None else "arms"
                raise ValueError(f"{what} {first[folder]!r} and {name!r} both write to the run folder {folder!r}: "
                                 f"rename one (characters other than letters, digits and _.,=+- become '_')")
            first[folder] = name
            out[name if self.arms is not None else folder] = overrides
        return out

    @property
    def baseline_arm(self) -> str:
        return self.baseline or next(iter(self.arm_overrides()))


@dataclass(frozen=True)
class RunPlan:
    """One arm x seed: the validated config and where its outputs go."""

    ablation: str
    arm: str
    seed: int
    config: ExperimentConfig
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return f"{self.arm}/seed-{self.seed}"

    def config_value(self, dotted: str):
        """The value of a config field by dotted path, e.g. `data.synth.mismatch`."""
        value = self.config.model_dump(mode="json")
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(f"report_plot field {dotted!r} is not a config field")
            value = value[part]
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir) / self.ablation / _safe(self.arm) / f"seed-{self.seed}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def load_spec(path: str | Path, extra_overrides: list[str] | None = None) -> tuple[AblationSpec, list[RunPlan]]:
    """Load and expand a spec; `extra_overrides` (key=value) apply to every arm, after the spec's own."""
    path = Path(path)
    raw = load_yaml(path)
    extra = [parse_override(o) for o in extra_overrides or []]
    for key, value in extra:
        if key == "seeds":
            raw["seeds"] = value if isinstance(value, list) else [value]
    extra = [(key, value) for key, value in extra if key != "seeds"]
    try:
        spec = AblationSpec.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid ablation spec {path}:\n" + "\n".join(lines)) from None
    if spec.gate is not None:
        rules = (path.parent / spec.gate.rules).resolve()
        if not rules.is_file():
            raise ConfigError(f"invalid ablation spec {path}:\n  gate.rules: {rules} does not exist")
        spec = spec.model_copy(update={"gate": spec.gate.model_copy(update={"rules": str(rules)})})
    if isinstance(spec.base, str):
        base_path = (path.parent / spec.base).resolve()
        base = load_yaml(base_path)
    else:
        base = spec.base
    base = apply_overrides(base, spec.overrides)
    base = apply_overrides(base, dict(extra))
    if spec.prepare:
        spec = _resolve_prepare(spec, base, path)
    plans = []
    for arm, overrides in spec.arm_overrides().items():
        for seed in spec.seeds:
            tree = apply_overrides(base, overrides)
            tree = apply_overrides(tree, {"seed": seed, "name": f"{spec.name}/{arm}"})
            cfg = validate_config(tree, source=f"{path} arm {arm!r} seed {seed}")
            plan = RunPlan(ablation=spec.name, arm=arm, seed=seed, config=cfg, overrides=overrides)
            check_inside(plan.run_dir, cfg.output_dir, f"{path} arm {arm!r}: run folder")
            plans.append(plan)
    return spec, plans


def _resolve_prepare(spec: AblationSpec, base: dict, path: Path) -> AblationSpec:
    """The spec with its prepare steps resolved against the base config (after every override): `{data_root}`
    filled in, each `train` step's config resolved and validated, a teacher's default architecture set."""
    base_cfg = validate_config(apply_overrides(base, {"name": f"{spec.name}/prepare"}),
                               source=f"{path} base config (the prepare steps' {{data_root}} and defaults)")
    mapping = {"data_root": str(resolve_data_root(base_cfg.data))}
    resolved, needs_data = [], False
    for index, entry in enumerate(spec.prepare):
        needs_data = needs_data or entry.uses("data_root")
        fields = substitute_placeholders(entry.step.model_dump(mode="json"), mapping)
        where = f"{path}: prepare.{index}.{entry.kind}"
        if entry.kind == "train":
            name = f"{spec.name}/prepare-{Path(fields['run_dir']).name}"
            fields = _train_config(fields, base, path, where, name=name)
        elif entry.kind == "teacher_train":  # without arch: the base config's image tower (as `--config`)
            tower = base_cfg.model.image
            fields["config"] = entry.step.config.model_validate(fields["config"]).with_default_arch(
                tower.name, dict(tower.kwargs), base_cfg.data.image_size).model_dump(mode="json")
        try:
            resolved.append(PrepareEntry.model_validate({entry.kind: fields}))
        except ValidationError as err:
            lines = [f"  {where}.{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in err.errors()]
            raise ConfigError(f"invalid ablation spec {path}:\n" + "\n".join(lines)) from None
    spec = spec.model_copy(update={"prepare": resolved})
    spec._prepare_data_config = base_cfg if needs_data else None
    return spec


def _train_config(fields: dict, base: dict, path: Path, where: str, name: str) -> dict:
    """The resolved, validated config of a `train` step (named `name` unless its overrides name it)."""
    config = fields["config"]
    if config is None:
        tree = base
    elif isinstance(config, str):
        tree = load_yaml((path.parent / config).resolve())
    else:
        tree = config
    tree = apply_overrides(apply_overrides(tree, {"name": name}), fields["overrides"])
    cfg = validate_config(tree, source=where)
    return {"config": config_to_dict(cfg), "overrides": {}, "run_dir": fields["run_dir"]}
