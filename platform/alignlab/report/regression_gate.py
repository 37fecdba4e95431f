"""Nightly regression gate: compare today's metrics with the previous nightly runs (issue 5, section 6).

Per metric (one `GateRule`), with `past` = the metric's finite values in the previous nightlies, oldest first:

    baseline  = median(past[-window:])                                  (window median)
    allowed   = max(abs_tolerance, rel_tolerance * |baseline|)          (either tolerance may be left out)
    violation = today < baseline - allowed   for direction "higher"      (accuracy down is bad)
                today > baseline + allowed   for direction "lower"       (loss, step time up is bad)

A NaN today is a violation whatever the direction (a diverged run is worse than any number); NaN or absent
values in the history are left out of the baselines. The median keeps one odd night from moving the
baseline; a lasting shift becomes the new baseline once it fills half the window.

States: "insufficient_history" (fewer than `min_history` past values), "missing" (no value today: counted
and reported, never dropped), "ok", "violation" (today alone violates), "regression" (today and each of the
`repeat - 1` previous nightlies violate, each night against the window median of the nights before it, so
one noisy night never pages anyone). The gate's status is "regression" when any metric is one, else "ok"
when at least one metric was compared, else "insufficient_history"; `gate_exit_code` is 1 only for
"regression".
"""

import json
import math
import numbers
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from mlflow.tracking import MlflowClient

from alignlab.tracking import TAG_ABLATION, TAG_ARM, find_runs, resolve_tracking_uri, sanitise_metric_name
from alignlab.tracking.mlflow_tracker import _run_record  # one run by id, in find_runs' shape and names
from alignlab.yaml12 import describe_yaml_error, load_yaml_text

DIRECTIONS = ("higher", "lower")
STATES = ("ok", "violation", "regression", "insufficient_history", "missing")
STEP_MEDIANS = ("step_time",)  # per-step metrics whose median over a run is gated as `median_<name>`


class GateRule(BaseModel):
    """How one metric is gated: which direction is good and how far from the baseline is still noise."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    metric: str = Field(min_length=1)
    direction: Literal["higher", "lower"]
    abs_tolerance: float | None = Field(None, ge=0)
    rel_tolerance: float | None = Field(None, ge=0)
    min_history: int = Field(3, ge=1)

    @field_validator("abs_tolerance", "rel_tolerance", mode="before")
    @classmethod
    def _int_is_a_number(cls, value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_tolerance(self) -> "GateRule":
        if self.abs_tolerance is None and self.rel_tolerance is None:
            raise ValueError("give abs_tolerance and/or rel_tolerance (e.g. abs_tolerance: 0.02)")
        return self

    def allowed_deviation(self, baseline: float) -> float:
        """max(abs_tolerance, rel_tolerance * |baseline|): a change must exceed both given tolerances."""
        return max(self.abs_tolerance or 0.0, (self.rel_tolerance or 0.0) * abs(baseline))

    def violates(self, value: float, baseline: float) -> bool:
        """True when `value` lies beyond the allowed deviation from `baseline` in the bad direction."""
        if math.isnan(value):
            return True
        allowed = self.allowed_deviation(baseline)
        return value < baseline - allowed if self.direction == "higher" else value > baseline + allowed


class GateConfig(BaseModel):
    """A rules YAML: the gate's window and repeat count, a default `min_history` and one rule per metric."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[GateRule, ...] = Field(min_length=1)
    window: int = Field(7, ge=1, strict=True)
    repeat: int = Field(2, ge=1, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _default_min_history(cls, tree):
        """`min_history` at the top is every rule's default."""
        if isinstance(tree, dict) and "min_history" in tree and isinstance(tree.get("rules"), list):
            default = tree["min_history"]
            tree = {k: v for k, v in tree.items() if k != "min_history"}
            tree["rules"] = [{"min_history": default, **r} if isinstance(r, dict) else r for r in tree["rules"]]
        return tree

    @model_validator(mode="after")
    def _one_rule_per_metric(self) -> "GateConfig":
        names = [rule.metric for rule in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"metrics {duplicates} have more than one rule; keep one rule per metric")
        return self


@dataclass(frozen=True)
class MetricGate:
    """The gate's verdict on one metric (of one arm): values, baseline and the state."""

    metric: str
    direction: str
    state: str
    today: float | None
    baseline: float | None
    allowed_deviation: float | None
    history_count: int
    window_values: tuple[float, ...]
    streak: int  # consecutive violating nights ending today (checked back to `repeat` nights)
    arm: str = ""


@dataclass(frozen=True)
class GateResult:
    """Verdicts of all gated metrics, the overall status and when the gate ran (unix seconds)."""

    status: str
    metrics: tuple[MetricGate, ...]
    window: int
    repeat: int
    evaluated_at: float = field(default_factory=time.time)

    @property
    def counts(self) -> dict[str, int]:
        """Number of metrics in each state (every state listed, zeros included)."""
        return {state: sum(m.state == state for m in self.metrics) for state in STATES}

    def to_dict(self) -> dict:
        """JSON-ready dict; NaN values become None."""
        return {"status": self.status, "window": self.window, "repeat": self.repeat,
                "evaluated_at": self.evaluated_at, "counts": self.counts,
                "metrics": [{k: _json_value(v) for k, v in asdict(m).items()} for m in self.metrics]}

    def to_markdown(self) -> str:
        """A table of every gated metric, regressions first, with how the baseline was formed."""
        order = {"regression": 0, "violation": 1, "missing": 2, "insufficient_history": 3, "ok": 4}
        lines = [f"# Nightly regression gate: {self.status.upper()}", "",
                 "States: " + ", ".join(f"{state} {n}" for state, n in self.counts.items()), "",
                 "| arm | metric | state | today | baseline | allowed | Δ | better | history | streak |",
                 "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for m in sorted(self.metrics, key=lambda m: (order[m.state], m.arm, m.metric)):
            delta = None if m.today is None or m.baseline is None else m.today - m.baseline
            lines.append(f"| {m.arm or '-'} | {m.metric.replace('|', '/')} | **{m.state}** | {_fmt(m.today)} | "
                         f"{_fmt(m.baseline)} | {_fmt(m.allowed_deviation)} | {_fmt(delta, sign=True)} | "
                         f"{m.direction} | {m.history_count} | {m.streak}/{self.repeat} |")
        lines += ["", f"Baseline = median of the last {self.window} previous nightly values; a metric is a "
                      f"regression when it violates its tolerance on {self.repeat} consecutive nights."]
        return "\n".join(lines) + "\n"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _json_value(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4g}" if sign else f"{value:.4g}"


def _checked_value(where: str, values: Mapping, metric: str) -> float | None:
    """The metric's value in `values` as a float, None when absent; anything but a number is an error."""
    value = values.get(metric)
    if value is None:
        return None
    if not _is_number(value):
        raise ValueError(f"{where}[{metric!r}] must be a number, got {value!r}")
    return float(value)


def window_median(past: Sequence[float], window: int) -> float:
    """Median of the last `window` values of `past` (the whole of `past` when it is shorter)."""
    if not past:
        raise ValueError("window_median needs at least one past value")
    return float(statistics.median(past[-window:]))


def _compare(rule: GateRule, value: float, past: list[float], window: int) -> tuple[str, float | None]:
    """("insufficient_history" | "violation" | "ok", baseline) of one night against the values before it."""
    if len(past) < rule.min_history:
        return "insufficient_history", None
    baseline = window_median(past, window)
    return ("violation" if rule.violates(value, baseline) else "ok"), baseline


def _past_values(series: list[float | None]) -> list[float]:
    return [v for v in series if v is not None and math.isfinite(v)]


def _night_violated(rule: GateRule, series: list[float | None], night: int, window: int) -> bool:
    """Whether night `night` of `series` violated against the window median of the nights before it."""
    value = series[night]
    return value is not None and _compare(rule, value, _past_values(series[:night]), window)[0] == "violation"


def _check_window_repeat(window, repeat) -> None:
    for name, value in (("window", window), ("repeat", repeat)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _flagged(flags: Mapping, metric: str) -> bool:
    state = flags.get(metric)
    return state is True or state in ("violation", "regression")


def evaluate_gate(today: Mapping[str, float], history: Sequence[Mapping[str, float]], rules: Sequence[GateRule],
                  window: int = 7, repeat: int = 2, previous_flags: Sequence[Mapping] | None = None,
                  arm: str = "") -> GateResult:
    """Gate `today` against `history` (previous nightlies, oldest first) with `rules` (module docstring).

    `previous_flags` (optional, oldest first, last = yesterday) gives per previous night {metric: state or
    bool} as recorded by earlier gates; only its last `repeat - 1` entries are read and a night it does not
    cover counts as not violated. When None, each of the last `repeat - 1` nights is re-checked against the
    window median of the nights before it in `history`. `arm` only labels the result.
    """
    _check_window_repeat(window, repeat)
    if not isinstance(today, Mapping):
        raise ValueError(f"today must be a dict of metric -> value, got {type(today).__name__}")
    for index, night in enumerate(history):
        if not isinstance(night, Mapping):
            raise ValueError(f"history[{index}] must be a dict of metric -> value, got {type(night).__name__}")
    names = [rule.metric for rule in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"metrics {duplicates} have more than one gate rule; keep one rule per metric")

    verdicts = []
    for rule in rules:
        series = [_checked_value(f"history[{i}]", night, rule.metric) for i, night in enumerate(history)]
        past = _past_values(series)
        value = _checked_value("today", today, rule.metric)
        window_values = tuple(past[-window:]) if len(past) >= rule.min_history else ()
        if value is None:
            state, baseline = "missing", None
        else:
            state, baseline = _compare(rule, value, past, window)
        streak = 0
        if state == "violation":
            streak = 1
            for back in range(1, repeat):
                night = len(history) - back
                if previous_flags is not None:
                    index = len(previous_flags) - back
                    violated = index >= 0 and _flagged(previous_flags[index], rule.metric)
                else:
                    violated = night >= 0 and _night_violated(rule, series, night, window)
                if not violated:
                    break
                streak += 1
            if streak >= repeat:
                state = "regression"
        verdicts.append(MetricGate(
            metric=rule.metric, direction=rule.direction, state=state, today=value, baseline=baseline,
            allowed_deviation=None if baseline is None else rule.allowed_deviation(baseline),
            history_count=len(past), window_values=window_values, streak=streak, arm=arm))
    return GateResult(status=overall_status(verdicts), metrics=tuple(verdicts), window=window, repeat=repeat)


def overall_status(verdicts: Sequence[MetricGate]) -> str:
    """"regression" if any metric is one, else "ok" if any was compared, else "insufficient_history"."""
    states = {m.state for m in verdicts}
    if "regression" in states:
        return "regression"
    return "ok" if states & {"ok", "violation"} else "insufficient_history"


def combine_gates(results: Sequence[GateResult]) -> GateResult:
    """One suite-level result from per-arm results that share window and repeat."""
    if not results:
        raise ValueError("combine_gates needs at least one gate result")
    if len({(r.window, r.repeat) for r in results}) > 1:
        raise ValueError("gate results to combine must use the same window and repeat")
    verdicts = tuple(m for r in results for m in r.metrics)
    keys = [(m.arm, m.metric) for m in verdicts]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"(arm, metric) pairs {repeated} appear in more than one result; gate one run per arm")
    return GateResult(status=overall_status(verdicts), metrics=verdicts, window=results[0].window,
                      repeat=results[0].repeat, evaluated_at=max(r.evaluated_at for r in results))


def gate_exit_code(result: GateResult) -> int:
    """Process exit status of a gate step: 1 for a flagged regression, else 0 (ok or insufficient history)."""
    return 1 if result.status == "regression" else 0


def write_gate_report(result: GateResult, out_dir: str | Path) -> dict[str, Path]:
    """Write `gate.md` and `gate.json` into `out_dir` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "gate.md", "json": out / "gate.json"}
    paths["md"].write_text(result.to_markdown())
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    return paths


def load_gate_config(path: str | Path) -> GateConfig:
    """Read a rules YAML: `window`, `repeat`, a default `min_history` and a list of `rules` (GateRule fields);
    errors name the file and the field (`rules[0].direction: ...`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gate rules file {path} does not exist")
    try:
        tree = load_yaml_text(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML at {describe_yaml_error(err)}") from None
    try:
        return GateConfig.model_validate(tree)
    except ValidationError as err:
        errors = err.errors()
        errors = [e for e in errors if e["type"] != "too_short" or len(errors) == 1]  # bad rules leave none
        problems = []
        for error in errors:
            where = re.sub(r"\.(\d+)", r"[\1]", ".".join(map(str, error["loc"])))
            problems.append(f"{where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')}")
        raise ValueError(f"{path}: " + "; ".join(problems)) from None


def _gate_values(client: MlflowClient, record: dict, step_medians: Sequence[str]) -> dict[str, float]:
    """The run's latest metric values plus `median_<name>` over the logged steps of each step metric."""
    values = dict(record["metrics"])
    for name in step_medians:
        steps = [m.value for m in client.get_metric_history(record["run_id"], sanitise_metric_name(name))]
        if steps:
            values[f"median_{name}"] = float(statistics.median(steps))
    return values


def history_from_mlflow(tracking_uri: str | None, experiment: str, filter_tags: Mapping[str, str] | None = None,
                        arm: str | None = None, started_before: int | None = None,
                        step_medians: Sequence[str] = STEP_MEDIANS) -> list[dict[str, float]]:
    """Metric values of the FINISHED runs of `experiment` whose tags match, oldest first (by start time).

    `arm` adds the tag filter alignlab.arm = arm; `started_before` (ms since epoch) keeps only runs that
    started earlier, so today's run and later ones never become their own baseline. Each entry holds the
    run's latest metrics under their original names plus `median_step_time` (median of its logged step
    times, steadier than one final step).
    """
    tags = {**(filter_tags or {}), **({TAG_ARM: arm} if arm is not None else {})}
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    runs = [r for r in find_runs(uri, experiment, tags) if r["status"] == "FINISHED"
            and (started_before is None or r["start_time"] < started_before)]
    runs.sort(key=lambda r: r["start_time"])
    return [_gate_values(client, r, step_medians) for r in runs]


def run_gate_values(tracking_uri: str | None, run_id: str,
                    step_medians: Sequence[str] = STEP_MEDIANS) -> tuple[dict, dict[str, float]]:
    """(run record as in `find_runs`, its gate values as in `history_from_mlflow`) of one run by id."""
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as error:  # MlflowException: unknown id, or a store that cannot be reached
        raise ValueError(f"run {run_id!r} not found in {uri}: {error}") from None
    record = _run_record(run)
    return record, _gate_values(client, record, step_medians)


def gate_runs(tracking_uri: str | None, experiment: str, run_ids: list[str], config: GateConfig) -> GateResult:
    """Gate each run against the earlier FINISHED runs of its (ablation, arm); returns the combined GateResult."""
    results = []
    for run_id in run_ids:
        record, today = run_gate_values(tracking_uri, run_id)
        if record["status"] != "FINISHED":
            raise ValueError(f"run {run_id} is {record['status']}; the gate compares FINISHED runs only")
        tags = record["tags"]
        arm = tags.get(TAG_ARM, "")
        filter_tags = {TAG_ABLATION: tags[TAG_ABLATION]} if TAG_ABLATION in tags else {}
        history = history_from_mlflow(tracking_uri, experiment, filter_tags, arm=arm if arm else None,
                                      started_before=record["start_time"])
        results.append(evaluate_gate(today, history, config.rules, window=config.window,
                                     repeat=config.repeat, arm=arm))
    return combine_gates(results)
