"""Ablation specs for the dashboard: the shipped ones in `specs_dir`, pasted YAML validated with the core
schema (`alignlab.ablation.load_spec`, the CLI's own loader), and the dry run of a valid spec.

A pasted spec is written to a scratch file before `load_spec` reads it; its relative `base` and
`gate.rules` paths are first made absolute against `specs_dir`, so it means what it would mean there.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import yaml

from alignlab.ablation import AblationSpec, RunPlan, load_spec
from alignlab.config import ConfigError
from alignlab.redaction import redact

_FIELD_LINE = re.compile(r"^\s+(?:(?P<path>[^\s:]+): )?(?P<message>\S.*)$")


class SpecCatalog:
    """The specs shipped in `specs_dir` (top-level *.yaml), loaded once per file modification."""

    def __init__(self, specs_dir: Path):
        self.specs_dir = Path(specs_dir)
        self._lock = threading.Lock()
        self._loaded: dict[Path, tuple[float, AblationSpec | None, list[RunPlan], str]] = {}

    def files(self) -> list[Path]:
        return sorted(self.specs_dir.glob("*.yaml")) if self.specs_dir.is_dir() else []

    def load(self, path: Path) -> tuple[AblationSpec | None, list[RunPlan], str]:
        """(spec, plans, error) of one file; spec None and the error message when it does not load."""
        mtime = path.stat().st_mtime
        with self._lock:
            cached = self._loaded.get(path)
        if cached and cached[0] == mtime:
            return cached[1:]
        try:
            spec, plans = load_spec(path)
            entry = (mtime, spec, plans, "")
        except (ConfigError, ValueError, OSError) as err:
            entry = (mtime, None, [], redact(str(err)))
        with self._lock:
            self._loaded[path] = entry
        return entry[1:]

    def by_name(self) -> dict[str, tuple[Path, AblationSpec, list[RunPlan]]]:
        """Ablation name -> (file, spec, plans) of every shipped spec that loads."""
        out = {}
        for path in self.files():
            spec, plans, _ = self.load(path)
            if spec is not None:
                out.setdefault(spec.name, (path, spec, plans))
        return out

    def find(self, name: str) -> tuple[Path, AblationSpec, list[RunPlan]] | None:
        return self.by_name().get(name)


def field_errors(message: str) -> list[dict]:
    """The "  field.path: message" lines of a core ConfigError as [{"path", "message"}] (path "" for a line
    about the whole spec); a message without indented lines is one error with an empty path."""
    found = [{"path": m["path"] or "", "message": m["message"]}
             for m in map(_FIELD_LINE.match, message.splitlines()[1:]) if m]
    return found or [{"path": "", "message": message.strip()}]


def absolutise(text: str, specs_dir: Path) -> str:
    """The spec YAML with its relative `base` and `gate.rules` made absolute against `specs_dir`; a text that
    is not a YAML mapping comes back unchanged (the loader names the problem)."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if not isinstance(tree, dict):
        return text
    root = Path(specs_dir).resolve()
    if isinstance(tree.get("base"), str) and not Path(tree["base"]).is_absolute():
        tree["base"] = str(root / tree["base"])
    gate = tree.get("gate")
    if isinstance(gate, dict) and isinstance(gate.get("rules"), str) and not Path(gate["rules"]).is_absolute():
        gate["rules"] = str(root / gate["rules"])
    return yaml.safe_dump(tree, sort_keys=False)


def validate_text(text: str, specs_dir: Path, scratch: Path) -> tuple[AblationSpec | None, list[RunPlan], list[dict]]:
    """(spec, plans, []) for a valid spec text, else (None, [], field errors). `scratch` is a folder the
    absolutised text is written to."""
    path = Path(scratch) / "spec.yaml"
    path.write_text(absolutise(text, specs_dir))
    try:
        spec, plans = load_spec(path)
    except ConfigError as err:
        return None, [], field_errors(redact(str(err)).replace(str(path), "spec"))
    except ValueError as err:
        return None, [], [{"path": "", "message": redact(str(err)).replace(str(path), "spec")}]
    return spec, plans, []


def dry_run(spec: AblationSpec, plans: list[RunPlan], earlier_train_seconds: list[float]) -> dict:
    """What running the spec would do: arms x seeds with their overrides and run folders, the prepare
    steps, and a cost estimate from the measured `train_seconds` of earlier runs of this ablation."""
    estimate = None
    if earlier_train_seconds:
        per_run = sum(earlier_train_seconds) / len(earlier_train_seconds)
        estimate = {"per_run_s": per_run, "total_s": per_run * len(plans), "from_runs": len(earlier_train_seconds)}
    return {
        "name": spec.name, "baseline": spec.baseline_arm, "seeds": spec.seeds,
        "arms": {arm: redact(str(overrides)) for arm, overrides in spec.arm_overrides().items()},
        "runs": [{"arm": p.arm, "seed": p.seed, "run_dir": str(p.run_dir),
                  "max_steps": p.config.train.max_steps, "epochs": p.config.train.epochs} for p in plans],
        "prepare": [{"kind": entry.kind, "settings": redact(str(entry.step.model_dump(mode="json")))}
                    for entry in spec.prepare],
        "report_metrics": spec.report_metrics or [],
        "estimate": estimate,
    }
