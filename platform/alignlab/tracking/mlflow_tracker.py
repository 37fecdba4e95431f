"""MLflow tracking through the client API: one `RunTracker` = one `MlflowClient` + one explicit run id.

Nothing here touches MLflow's fluent "active run" (`mlflow.start_run`), so several trackers in one process,
in threads or in separate processes never write into each other's runs.

Writes never stop training: `log_metrics`, `log_artifact`, `log_dict` and `set_tags` only queue a record
for a background thread (`delivery.py`), which keeps what the store cannot take in the run folder's
`tracking-spool.jsonl` and sends it when the store answers again (`spool.py`). `end` waits at most
`flush_timeout_s`; a run started while the store is down is created when it comes back. Values are
redacted (`alignlab.redaction`) before they are queued: URI credentials never reach MLflow.

Metric names: MLflow accepts only alphanumerics, `_ - . / : space` and rejects e.g. `image_to_text_R@1`.
`sanitise_metric_name` maps '@' -> '_at_' and every other rejected character -> '_'. Each renamed metric
gets the run tag `alignlab.metric_name.<sanitised>` = original name, so `find_runs` restores it exactly.
"""

import json
import numbers
import os
import posixpath
import re
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from alignlab.redaction import redact
from alignlab.tracking.delivery import BackgroundSender, short_error, warn
from alignlab.tracking.spool import PENDING, Delivery, Spool, write_run_id
from alignlab.tracking.store import experiment_id, is_outage, resolve_tracking_uri, sqlite_path

TAG_ABLATION = "alignlab.ablation"
TAG_ARM = "alignlab.arm"
TAG_SEED = "alignlab.seed"
TAG_GIT_COMMIT = "alignlab.git_commit"
TAG_IMAGE = "alignlab.image"  # digest of the container image the run ran in (ALIGNLAB_IMAGE_DIGEST)
TAG_IMAGE_REF = "alignlab.image_ref"  # its reference, e.g. registry/alignlab:0.1.0-cu130 (ALIGNLAB_IMAGE)
TAG_DATASET_HASH = "alignlab.dataset_hash"
TAG_TRUNCATED_PARAMS = "alignlab.truncated_params"
TAG_PARENT_RUN = "mlflow.parentRunId"
METRIC_NAME_TAG_PREFIX = "alignlab.metric_name."
RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
DEFAULT_FLUSH_TIMEOUT_S = 30.0
# MLflow's documented limits on keys and param values, and the characters it accepts in names.
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
_NAME_CHAR = re.compile(r"[/\w.\- :]")
_CHAR_REPLACEMENTS = {"@": "_at_"}
_TRUNCATION_MARKER = re.compile(r" \.\.\.\[truncated from \d+ chars\]$")


def _valid_name(name: str) -> bool:
    return all(_NAME_CHAR.fullmatch(ch) for ch in name)


def _not_a_clean_path(name: str) -> bool:
    """MLflow stores metrics under their name as a relative path: no '..', leading '/' or '//'."""
    norm = posixpath.normpath(name)
    return norm != name or norm == "." or norm.startswith("..") or norm.startswith("/")


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


def image_tags(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Tags naming the container image this process runs in, so a result names the image that produced it.
    The Helm chart's ConfigMap and `make image-test` set the variables; outside a container there are none."""
    names = {TAG_IMAGE: "ALIGNLAB_IMAGE_DIGEST", TAG_IMAGE_REF: "ALIGNLAB_IMAGE"}
    return {tag: environ[var] for tag, var in names.items() if environ.get(var)}


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

    A value longer than MLflow's limit (MAX_PARAM_LENGTH = 6000 chars) is cut and ends with
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
        if not _valid_name(name) or len(name) > MAX_KEY_LENGTH:
            raise ValueError(f"param key {name!r} is not allowed by MLflow: keys may only hold alphanumerics, "
                             f"'_', '-', '.', ' ', ':', '/' and at most {MAX_KEY_LENGTH} characters")
        text = _param_value(value)
        if len(text) > MAX_PARAM_LENGTH:
            marker = f" ...[truncated from {len(text)} chars]"
            warnings.warn(f"param {name!r} is {len(text)} chars, over MLflow's {MAX_PARAM_LENGTH}; "
                          f"logged truncated (log the full config as an artifact with log_dict)", stacklevel=2)
            text = text[:MAX_PARAM_LENGTH - len(marker)] + marker
        flat[name] = text
    return flat


def sanitise_metric_name(name: str) -> str:
    """Map a metric name onto MLflow's allowed set: '@' -> '_at_', other rejected characters -> '_'.

    A name that still is not a clean relative path (leading '/', '//', '..') gets its '/' replaced by '_'.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric names must be non-empty strings, got {name!r}")
    out = "".join(ch if _valid_name(ch) else _CHAR_REPLACEMENTS.get(ch, "_") for ch in name)
    if _not_a_clean_path(out):
        out = out.replace("/", "_")
    if _not_a_clean_path(out) or len(out) > MAX_KEY_LENGTH:
        raise ValueError(f"metric name {name!r} cannot be stored by MLflow (maps to {out!r}); rename it "
                         f"without leading '..' and within {MAX_KEY_LENGTH} characters")
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def _call_bounded(fn: Callable[[], str], timeout: float, undo: Callable[[str], None]) -> str:
    """`fn()`, or TimeoutError after `timeout` s (the client may retry for minutes); a result that arrives
    after the timeout is passed to `undo` (the run it created would otherwise stay RUNNING forever)."""
    lock, state = threading.Lock(), {}

    def target() -> None:
        try:
            value = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            value, state["error"] = None, err
        with lock:
            state["value"], late = value, state.get("abandoned", False)
        if late and value is not None:
            try:
                undo(value)
            except Exception:  # noqa: BLE001 - best effort: the store went away again
                pass

    thread = threading.Thread(target=target, name="alignlab-tracking-start", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:
        if "value" not in state:
            state["abandoned"] = True
            raise TimeoutError(f"no answer within {timeout:.0f} s")
    if "error" in state:
        raise state["error"]
    return state["value"]


class RunTracker:
    """One MLflow run, written through `MlflowClient` with its explicit run id (see the module docstring).

    Use `RunTracker.start(...)`; as a context manager it ends FINISHED, FAILED on an exception and KILLED on
    KeyboardInterrupt. `spool_dir` is where undelivered records wait: the run folder, which then also gets
    `mlflow_run_id.txt` (default: a folder per run under the system's temp folder)."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str, *, spool_dir: str | Path | None = None,
                 flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S, spooled: tuple[dict, ...] = ()):
        self.client = client
        self.uri = uri
        self.flush_timeout_s = flush_timeout_s
        self.ended = False
        self._ref = run_id
        self._metric_names: dict[str, str] = {}  # sanitised -> original, to catch two names mapping to one
        self._last_step = 0
        folder = spool_dir or Path(tempfile.gettempdir()) / "alignlab-tracking-spool" / run_id.replace(":", "-")
        self.spool = Spool(folder)
        self.spool.append(list(spooled))
        if spool_dir is not None:  # a run folder: record its run id (the sender rewrites a pending one)
            write_run_id(self.spool.folder, run_id)
        self._delivery = Delivery(client, uri)
        self._sender = BackgroundSender(self._delivery, self.spool, exit_timeout_s=flush_timeout_s)
        self._uri_redacted = redact(uri)  # goes with every record: redact once

    @property
    def run_id(self) -> str:
        """The MLflow run id ("pending:<hex>" while a run started during an outage is not created yet)."""
        return self._delivery.run_id(self._ref)

    @classmethod
    def start(cls, tracking_uri: str | None, experiment: str, run_name: str, tags: dict, params: dict,
              parent_run_id: str | None = None, *, spool_dir: str | Path | None = None,
              flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S) -> "RunTracker":
        """Create a run in `experiment` (created if missing) with tags, flattened params and optional parent.

        If the store does not answer within `flush_timeout_s`, training goes on: the run is created (with its
        original start time) once the store answers, and `run_id` is "pending:..." until then."""
        uri = resolve_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri)
        flat_params = redact(flatten_params(params))
        run_tags = redact({TAG_GIT_COMMIT: git_commit(), **image_tags(), **{str(k): str(v) for k, v in tags.items()}})
        truncated = [key for key, value in flat_params.items() if _TRUNCATION_MARKER.search(value)]
        if truncated:
            run_tags[TAG_TRUNCATED_PARAMS] = ",".join(truncated)
        if parent_run_id is not None:
            run_tags[TAG_PARENT_RUN] = parent_run_id
        create = {"op": "create_run", "run": f"{PENDING}{uuid.uuid4().hex}", "uri": redact(uri),
                  "experiment": experiment, "run_name": redact(run_name), "tags": run_tags,
                  "start_time": _now_ms()}
        try:
            run_id = _call_bounded(lambda: _create_run(client, uri, create, parent_run_id), flush_timeout_s,
                                   undo=client.delete_run)
            spooled = ()
        except Exception as err:  # noqa: BLE001 - an outage is survivable, anything else is re-raised
            if not is_outage(err):
                raise
            run_id, spooled, reason = create["run"], (create,), short_error(err)
        tracker = cls(client, run_id, uri, spool_dir=spool_dir, flush_timeout_s=flush_timeout_s, spooled=spooled)
        if spooled:
            warn(f"MLflow at {uri} is unreachable ({reason}); training goes on and the run is created when it "
                 f"answers (its records wait in {tracker.spool.path})")
        if flat_params:
            tracker._submit({"op": "params", "params": flat_params})
        return tracker

    @classmethod
    def attach(cls, tracking_uri: str | None, run_id: str, *, spool_dir: str | Path | None = None,
               flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S) -> "RunTracker":
        """Re-open an existing run by id (a later pipeline step adding to the run an earlier step created)."""
        uri = resolve_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri)
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            raise ValueError(f"MLflow run {run_id!r} does not exist in {redact(uri)}: the step that creates it "
                             f"(train) must log to the same tracking URI") from error
        if run.info.status != "RUNNING":
            raise ValueError(f"MLflow run {run_id!r} in {redact(uri)} has already ended ({run.info.status}); "
                             f"a finished run is not re-opened")
        return cls(client, run_id, uri, spool_dir=spool_dir, flush_timeout_s=flush_timeout_s)

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False

    def _submit(self, record: dict) -> None:
        self._sender.submit({"run": self.run_id, "uri": self._uri_redacted, **record})

    def _metric_key(self, name: str) -> tuple[str, bool]:
        """Sanitised key for `name` and whether its original name still has to be recorded as a tag."""
        key = sanitise_metric_name(name)
        known = self._metric_names.get(key)
        if known is not None and known != name:
            raise ValueError(f"metric names {known!r} and {name!r} both map to MLflow key {key!r}; rename one")
        self._metric_names[key] = name
        return key, known is None and key != name

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Queue {name: number} at `step` (returns at once); names are sanitised (module docstring)."""
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        values, new_tags = {}, {}
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"metric {name!r} must be a number, got {value!r}") from error
            key, record_name = self._metric_key(name)
            if record_name:
                new_tags[METRIC_NAME_TAG_PREFIX + key] = name
            values[key] = number
        if new_tags:  # names first, so readers can always map
            self._submit({"op": "tags", "tags": new_tags})
        self._submit({"op": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": values})
        self._last_step = max(self._last_step, int(step))

    def log_summary(self, metrics: dict) -> None:
        """Log final/best values at the last step seen, so they are the run's latest values."""
        self.log_metrics(metrics, step=self._last_step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a copy of a file (or a whole folder) into the run's artifacts, under `artifact_path` if given."""
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {local} does not exist; write it before logging it")
        self._submit({"op": "artifact", "path": str(local.resolve()), "artifact_path": artifact_path})

    def log_dict(self, d: dict, name: str) -> None:
        """Store `d` as the artifact `name` (JSON, or YAML when the name ends in .yaml/.yml)."""
        self._submit({"op": "dict", "name": name, "data": redact(json.loads(json.dumps(d, default=str)))})

    def set_tags(self, tags: dict) -> None:
        """Set (or overwrite) run tags; values are stringified."""
        self._submit({"op": "tags", "tags": redact({str(key): str(value) for key, value in tags.items()})})

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (at most `timeout`, default `flush_timeout_s`) until everything queued is delivered."""
        return self._sender.flush(self.flush_timeout_s if timeout is None else timeout)

    def end(self, status: str = "FINISHED") -> bool:
        """Mark the run terminated with `status` after delivering what is queued (waiting at most
        `flush_timeout_s`); later calls are no-ops. Returns False when records stay in the spool."""
        if status not in RUN_END_STATUSES:
            raise ValueError(f"status must be one of {RUN_END_STATUSES}, got {status!r}")
        if self.ended:
            return True
        self.ended = True
        self._submit({"op": "end", "status": status, "end_time": _now_ms()})
        delivered = self._sender.close(self.flush_timeout_s)
        if not delivered:
            outage = self._sender.outage_seconds
            warn(f"MLflow at {self.uri} did not answer{f' for the last {outage:.1f} s' if outage else ''}: run "
                 f"{self.run_id} ({status}) stays RUNNING there until the records kept in {self.spool.path} are "
                 f"sent: alignlab tracking replay {self.spool.folder}")
        return delivered


def _create_run(client: MlflowClient, uri: str, create: dict, parent_run_id: str | None) -> str:
    if parent_run_id is not None:
        try:
            client.get_run(parent_run_id)
        except MlflowException as error:
            if is_outage(error):
                raise
            raise ValueError(f"parent_run_id {parent_run_id!r} is not a run in {redact(uri)}") from error
    exp_id = experiment_id(client, uri, create["experiment"])
    run = client.create_run(exp_id, start_time=create["start_time"], tags=create["tags"], run_name=create["run_name"])
    return run.info.run_id


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
    db_path = sqlite_path(uri)
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


def get_run(tracking_uri: str | None, run_id: str) -> dict:
    """One run as a `find_runs` record; ValueError naming the run when the store does not know it."""
    uri = resolve_tracking_uri(tracking_uri)
    try:
        return _run_record(MlflowClient(tracking_uri=uri).get_run(run_id))
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise ValueError(f"no run {run_id!r} in {redact(uri)}") from None
        raise


def _run_record(run) -> dict:
    tags = dict(run.data.tags)
    names = {key[len(METRIC_NAME_TAG_PREFIX):]: original for key, original in tags.items()
             if key.startswith(METRIC_NAME_TAG_PREFIX)}
    metrics = {names.get(key, key): value for key, value in run.data.metrics.items()}
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
            "status": run.info.status, "start_time": run.info.start_time, "tags": tags,
            "params": dict(run.data.params), "metrics": metrics}
