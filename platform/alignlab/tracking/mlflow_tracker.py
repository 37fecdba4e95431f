"""MLflow tracking through the client API: one `RunTracker` = one `MlflowClient` + one explicit run id.

Nothing here touches MLflow's fluent "active run" (`mlflow.start_run`), so several trackers in one process,
in threads or in separate processes never write into each other's runs.

Tracking store: the `tracking_uri` argument, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`
(MLflow 3's own default, made absolute; the file store is deprecated in MLflow 3). View it with
`mlflow ui --backend-store-uri sqlite:///<cwd>/mlflow.db`. Experiments that this module creates on a
sqlite store keep their artifacts next to the database, in `<db folder>/mlartifacts/<experiment slug>`,
rather than in MLflow's cwd-relative `./mlruns`, so the store and its artifacts travel together.

Metric names: MLflow accepts only alphanumerics, `_ - . / : space` and rejects e.g. `image_to_text_R@1`.
`sanitise_metric_name` maps '@' -> '_at_' and every other rejected character -> '_'. Each renamed metric
gets the run tag `alignlab.metric_name.<sanitised>` = original name, so `find_runs` restores it exactly.
"""

import json
import numbers
import os
import re
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    path_not_unique,
    validate_param_and_metric_name,
)

TAG_ABLATION = "alignlab.ablation"
TAG_ARM = "alignlab.arm"
TAG_SEED = "alignlab.seed"
TAG_GIT_COMMIT = "alignlab.git_commit"
TAG_DATASET_HASH = "alignlab.dataset_hash"
TAG_TRUNCATED_PARAMS = "alignlab.truncated_params"
METRIC_NAME_TAG_PREFIX = "alignlab.metric_name."
RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_CHAR_REPLACEMENTS = {"@": "_at_"}
_TRUNCATION_MARKER = re.compile(r" \.\.\.\[truncated from \d+ chars\]$")


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The store to use: the argument, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    if tracking_uri:
        return tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _sqlite_path(tracking_uri: str) -> Path | None:
    """Database file of a `sqlite:///path` URI (None for other stores and in-memory sqlite)."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri.endswith(":memory:"):
        return None
    return Path(unquote(tracking_uri[len("sqlite:///"):].split("?")[0])).resolve()


def git_commit(repo_dir: str | Path | None = None) -> str:
    """HEAD sha of the git repository holding `repo_dir` (default: this package's source), else "unknown"."""
    folder = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    sha = result.stdout.strip()
    return sha if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else "unknown"


def standard_tags(ablation: str, arm: str, seed: int, dataset_hash: str) -> dict[str, str]:
    """The alignlab tags every ablation run carries (the git commit is added by `RunTracker.start`)."""
    return {TAG_ABLATION: ablation, TAG_ARM: arm, TAG_SEED: str(seed), TAG_DATASET_HASH: dataset_hash}


def _param_value(value) -> str:
    """Stringify one config value; lists as JSON so they read back unambiguously."""
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, Mapping):  # only reached for an empty mapping: record that it was empty
        return "{}"
    return str(value)


def flatten_params(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into dotted keys with string values that fit MLflow's param limits.

    A value longer than MLflow's limit (MAX_PARAM_VAL_LENGTH = 6000 chars) is cut and ends with
    " ...[truncated from N chars]"; a warning names the key (log the full config with `log_dict` to keep it).
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"params must be a (nested) dict, got {type(d).__name__}")
    flat = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if not validate_param_and_metric_name(name) or len(name) > MAX_ENTITY_KEY_LENGTH:
            raise ValueError(f"param key {name!r} is not allowed by MLflow: keys may only hold alphanumerics, "
                             f"'_', '-', '.', ' ', ':', '/' and at most {MAX_ENTITY_KEY_LENGTH} characters")
        text = _param_value(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            marker = f" ...[truncated from {len(text)} chars]"
            warnings.warn(f"param {name!r} is {len(text)} chars, over MLflow's {MAX_PARAM_VAL_LENGTH}; "
                          f"logged truncated (log the full config as an artifact with log_dict)", stacklevel=2)
            text = text[:MAX_PARAM_VAL_LENGTH - len(marker)] + marker
        flat[name] = text
    return flat


def sanitise_metric_name(name: str) -> str:
    """Map a metric name onto MLflow's allowed set: '@' -> '_at_', other rejected characters -> '_'.

    A name that still is not a clean relative path (leading '/', '//', '..') gets its '/' replaced by '_'.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric names must be non-empty strings, got {name!r}")
    out = "".join(ch if validate_param_and_metric_name(ch) else _CHAR_REPLACEMENTS.get(ch, "_") for ch in name)
    if path_not_unique(out):
        out = out.replace("/", "_")
    if path_not_unique(out) or len(out) > MAX_ENTITY_KEY_LENGTH:
        raise ValueError(f"metric name {name!r} cannot be stored by MLflow (maps to {out!r}); rename it "
                         f"without leading '..' and within {MAX_ENTITY_KEY_LENGTH} characters")
    return out


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _experiment_id(client: MlflowClient, tracking_uri: str, experiment: str) -> str:
    """Id of `experiment`, creating it (artifacts under the sqlite store's folder) when missing."""
    if not experiment or not isinstance(experiment, str):
        raise ValueError(f"experiment must be a non-empty string, got {experiment!r}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        db_path = _sqlite_path(tracking_uri)
        location = None
        if db_path is not None:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-.") or "experiment"
            location = (db_path.parent / "mlartifacts" / slug).as_uri()
        try:
            return client.create_experiment(experiment, artifact_location=location)
        except MlflowException:
            found = client.get_experiment_by_name(experiment)  # another process created it meanwhile
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise ValueError(f"experiment {experiment!r} in {tracking_uri} is deleted; restore it "
                         f"(MlflowClient.restore_experiment) or pick another experiment name")
    return found.experiment_id


class RunTracker:
    """One MLflow run, written through `MlflowClient` with its explicit run id.

    Use `RunTracker.start(...)`; as a context manager it ends FINISHED, FAILED on an exception and KILLED on
    KeyboardInterrupt.
    """

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self.ended = False
        self._metric_names: dict[str, str] = {}  # sanitised -> original, to catch two names mapping to one
        self._last_step = 0

    @classmethod
    def start(cls, tracking_uri: str | None, experiment: str, run_name: str, tags: dict, params: dict,
              parent_run_id: str | None = None) -> "RunTracker":
        """Create a run in `experiment` (created if missing) with tags, flattened params and optional parent."""
        uri = resolve_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, uri, experiment)
        if parent_run_id is not None:
            try:
                client.get_run(parent_run_id)
            except MlflowException as error:
                raise ValueError(f"parent_run_id {parent_run_id!r} is not a run in {uri}") from error
        flat_params = flatten_params(params)
        run_tags = {TAG_GIT_COMMIT: git_commit(), **{str(k): str(v) for k, v in tags.items()}}
        truncated = [key for key, value in flat_params.items() if _TRUNCATION_MARKER.search(value)]
        if truncated:
            run_tags[TAG_TRUNCATED_PARAMS] = ",".join(truncated)
        if parent_run_id is not None:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        tracker = cls(client, run.info.run_id)
        try:
            entries = [Param(key, value) for key, value in flat_params.items()]
            for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(tracker.run_id, params=chunk)
        except BaseException:
            tracker.end("FAILED")
            raise
        return tracker

    @classmethod
    def attach(cls, tracking_uri: str | None, run_id: str) -> "RunTracker":
        """Re-open an existing run by id (a later pipeline step adding to the run an earlier step created)."""
        uri = resolve_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri)
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            raise ValueError(f"MLflow run {run_id!r} does not exist in {uri}: the step that creates it (train) "
                             f"must log to the same tracking URI") from error
        if run.info.status != "RUNNING":
            raise ValueError(f"MLflow run {run_id!r} in {uri} has already ended ({run.info.status}); "
                             f"a finished run is not re-opened")
        return cls(client, run_id)

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False

    def _metric_key(self, name: str) -> tuple[str, bool]:
        """Sanitised key for `name` and whether its original name still has to be recorded as a tag."""
        key = sanitise_metric_name(name)
        known = self._metric_names.get(key)
        if known is not None and known != name:
            raise ValueError(f"metric names {known!r} and {name!r} both map to MLflow key {key!r}; rename one")
        self._metric_names[key] = name
        return key, known is None and key != name

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log {name: number} at `step` in batches; names are sanitised (module docstring)."""
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        timestamp = int(time.time() * 1000)
        entries, new_tags = [], []
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"metric {name!r} must be a number, got {value!r}") from error
            key, record_name = self._metric_key(name)
            if record_name:
                new_tags.append(RunTag(METRIC_NAME_TAG_PREFIX + key, name))
            entries.append(Metric(key, number, timestamp, step))
        for chunk in _chunks(new_tags, MAX_PARAMS_TAGS_PER_BATCH):  # names first, so readers can always map
            self.client.log_batch(self.run_id, tags=chunk)
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)
        self._last_step = max(self._last_step, step)

    def log_summary(self, metrics: dict) -> None:
        """Log final/best values at the last step seen, so they are the run's latest values."""
        self.log_metrics(metrics, step=self._last_step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (or a whole folder) into the run's artifacts, under `artifact_path` if given."""
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {local} does not exist; write it before logging it")
        if local.is_dir():
            self.client.log_artifacts(self.run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(local), artifact_path)

    def log_dict(self, d: dict, name: str) -> None:
        """Store `d` as the artifact `name` (JSON, or YAML when the name ends in .yaml/.yml)."""
        self.client.log_dict(self.run_id, d, name)

    def set_tags(self, tags: dict) -> None:
        """Set (or overwrite) run tags; values are stringified."""
        entries = [RunTag(str(key), str(value)) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated with `status`; later calls are no-ops."""
        if status not in RUN_END_STATUSES:
            raise ValueError(f"status must be one of {RUN_END_STATUSES}, got {status!r}")
        if not self.ended:
            self.client.set_terminated(self.run_id, status=status)
            self.ended = True


def _quoted(value: str) -> str:
    """A literal for MLflow's filter syntax, which has no escape for a quote inside a quoted string."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"tag filter value {value!r} holds both quote characters, which MLflow cannot filter on")


def find_runs(tracking_uri: str | None, experiment: str | None, filter_tags: dict | None = None) -> list[dict]:
    """Runs of `experiment` (all experiments when None) whose tags equal `filter_tags`, oldest first.

    Each run is {"run_id", "run_name", "experiment_id", "status", "start_time", "tags", "params", "metrics"}
    with `metrics` the latest value of each metric under its original (un-sanitised) name.
    """
    uri = resolve_tracking_uri(tracking_uri)
    db_path = _sqlite_path(uri)
    if db_path is not None and not db_path.exists():  # MLflow would silently create an empty store here
        raise FileNotFoundError(f"no MLflow database at {db_path}; check the tracking URI {uri!r}")
    client = MlflowClient(tracking_uri=uri)
    if experiment is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no experiment named {experiment!r} in {uri}")
        experiment_ids = [found.experiment_id]
    filter_string = " and ".join(f"tags.`{key}` = {_quoted(str(value))}"
                                 for key, value in (filter_tags or {}).items())
    runs, token = [], None
    while experiment_ids:
        page = client.search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [_run_record(run) for run in runs]


def _run_record(run) -> dict:
    tags = dict(run.data.tags)
    names = {key[len(METRIC_NAME_TAG_PREFIX):]: original for key, original in tags.items()
             if key.startswith(METRIC_NAME_TAG_PREFIX)}
    metrics = {names.get(key, key): value for key, value in run.data.metrics.items()}
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
            "status": run.info.status, "start_time": run.info.start_time, "tags": tags,
            "params": dict(run.data.params), "metrics": metrics}
