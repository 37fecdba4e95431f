"""Honest resume: the config a run folder's checkpoints were trained with is the source of truth.

`--resume` with a different config is refused, naming every differing field, unless the caller allows the
change (`--allow-config-change`); then the trainer rebuilds the optimizer's per-group hyper-parameters and
the schedule from the new config at the resumed step, and the change is appended to `config_history.jsonl`
in the run folder, so the run's record says which steps ran with which values.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignlab.config import ConfigError, ExperimentConfig, config_to_dict, validate_config
from alignlab.redaction import redact

CONFIG_HISTORY_FILE = "config_history.jsonl"

# Fields that say where and how visibly a run goes, not what it computes: free to change on resume. One caveat:
# on a CPU the thread count (train.threads, or data.num_workers through its default) changes the order floats
# are summed in, so such a resume is sound but not bit-identical; the trainer records it in config_history.jsonl
# as "compute_threads" (measured: threads 1 vs 2 differ by 1e-5 in the loss at step 2).
FREE_FIELDS = ("name", "output_dir", "data.num_workers", "train.threads", "train.progress", "train.log_every",
               "train.checkpoint_every", "train.keep_checkpoints", "eval", "tracking")


@dataclass(frozen=True)
class ConfigChange:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field} {self.old!r} -> {self.new!r}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_free(field: str) -> bool:
    return any(field == free or field.startswith(f"{free}.") for free in FREE_FIELDS)


def config_changes(saved: dict, cfg: ExperimentConfig, source: str) -> list[ConfigChange]:
    """Fields (dotted) whose value in `cfg` differs from the `saved` config tree, free fields left out.

    The saved tree is validated first, so fields added to the schema since it was written compare as their
    defaults."""
    old = _flatten(config_to_dict(validate_config(saved, source=source)))
    new = _flatten(redact(config_to_dict(cfg)))  # the saved tree was written redacted
    return [ConfigChange(field, old.get(field), new.get(field)) for field in sorted(old.keys() | new.keys())
            if old.get(field) != new.get(field) and not _is_free(field)]


def check_config_changes(changes: list[ConfigChange], checkpoint: Path, allow: bool) -> None:
    if changes and not allow:
        listed = ", ".join(str(c) for c in changes)
        raise ConfigError(f"cannot resume from {checkpoint}: the config differs from the one it was trained with "
                          f"in {listed}; resume with the run folder's config.yaml, or pass --allow-config-change "
                          f"to continue with the new values from this step on")


def record_config_changes(run_dir: Path, step: int, changes: list[ConfigChange]) -> Path | None:
    """Append {"time", "step", "changes": {field: {"old", "new"}}} to config_history.jsonl: from `step` on,
    the run trains with these changes to its checkpoint's config.

    Read in order, a line supersedes earlier lines at the same or later steps (those steps were rolled back
    by resuming from an earlier checkpoint), so a resume without changes is still written, with empty
    changes, when an earlier line lies at or after its step. Returns the file, or None when nothing was
    written."""
    path = Path(run_dir) / CONFIG_HISTORY_FILE
    if not changes and _last_step(path) < step:
        return None
    entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "step": step,
             "changes": {c.field: {"old": c.old, "new": c.new} for c in changes}}
    torn = path.exists() and not path.read_bytes().endswith(b"\n") and path.stat().st_size > 0
    with path.open("a") as handle:
        handle.write(("\n" if torn else "") + json.dumps(entry) + "\n")  # a killed append ends in no newline
    return path


def _last_step(path: Path) -> int:
    """The largest step in config_history.jsonl (-1 without one); a torn line (a killed append) is skipped."""
    steps = [-1]
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return max(steps)
