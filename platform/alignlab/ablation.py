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
```
Every arm x seed is validated when the spec is loaded, so a typo fails before any work starts.
Extra `key=value` overrides apply to every arm; the one reserved key `seeds` replaces the spec's seeds
(`alignlab run ablations/psd.yaml seeds=[0]` for a one-seed look).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alignlab.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    load_yaml,
    parse_override,
    validate_config,
)


class ReportPlot(BaseModel):
    """Plot metrics against one config field (x), one line per value of another (group)."""

    model_config = ConfigDict(extra="forbid")

    x: str
    group: str | None = None
    metrics: list[str] = Field(min_length=1)


class GateSpec(BaseModel):
    """A regression gate after the report (the nightly suite): each run against the earlier runs of its arm
    in MLflow, with the rules of `alignlab gate --rules` (see ablations/gates/nightly_gate.yaml)."""

    model_config = ConfigDict(extra="forbid")

    rules: str = Field(min_length=1, description="Gate rules YAML, relative to the spec file.")
    textfile: str | None = Field(None, description="Also write the gauges to this Prometheus textfile (*.prom).")
    pushgateway: str | None = Field(None, description="Also push the gauges to this Pushgateway URL.")


class AblationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

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

    @model_validator(mode="after")
    def _check(self) -> "AblationSpec":
        if (self.arms is None) == (self.grid is None):
            raise ValueError("give exactly one of `arms` (named overrides) or `grid` (axes to combine)")
        if self.grid is not None and any(not values for values in self.grid.values()):
            raise ValueError("every grid axis needs at least one value")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        names = self.arm_overrides().keys()
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not an arm; arms are {sorted(names)}")
        return self

    def arm_overrides(self) -> dict[str, dict[str, Any]]:
        if self.arms is not None:
            return dict(self.arms)
        axes = list(self.grid)
        out = {}
        for combo in itertools.product(*(self.grid[a] for a in axes)):
            name = ",".join(f"{a.split('.')[-1]}={v}" for a, v in zip(axes, combo))
            out[re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)] = dict(zip(axes, combo))
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
        lines = [f"  {'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()]
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
    plans = []
    for arm, overrides in spec.arm_overrides().items():
        for seed in spec.seeds:
            tree = apply_overrides(base, overrides)
            tree = apply_overrides(tree, {"seed": seed, "name": f"{spec.name}/{arm}"})
            cfg = validate_config(tree, source=f"{path} arm {arm!r} seed {seed}")
            plans.append(RunPlan(ablation=spec.name, arm=arm, seed=seed, config=cfg, overrides=overrides))
    return spec, plans
