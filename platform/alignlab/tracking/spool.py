"""Tracking records, the spool file that keeps them while MLflow is down, and their delivery.

MLflow's client has no offline buffer: a call to a server that is down retries for the client's budget
(MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR, _TIMEOUT) and then raises. Everything a `RunTracker`
writes is therefore a plain JSON record, delivered by a background thread (`delivery.py`); what cannot be
delivered goes to `<run folder>/tracking-spool.jsonl`, one record a line, and is sent again when the store
answers: by the same process, by the next tracker that uses the run folder (`--resume`), or by
`alignlab tracking replay RUN_DIR`.

Records (every one has "op", "run": the MLflow run id, or "pending:<hex>" for a run that could not be created
yet, and "uri": the tracking URI with credentials redacted):

  create_run  experiment, run_name, tags, start_time   (a run started while the store was down)
  params      params {key: value}       tags  tags {key: value}
  metrics     step, timestamp, metrics {key: value}     (consecutive ones go as one log_batch)
  artifact    path (local file or folder), artifact_path
  dict        name, data                end   status, end_time

Sending a record twice is harmless: the store keeps one copy of a metric with the same key, step, timestamp
and value, of a param or tag with the same value, and of an artifact with the same path.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from alignlab.redaction import REDACTED, has_credentials, redact
from alignlab.tracking.store import experiment_id, is_outage

SPOOL_FILE = "tracking-spool.jsonl"
RUN_ID_FILE = "mlflow_run_id.txt"  # in a run folder: the id of its MLflow run
PENDING = "pending:"
METRICS_PER_CALL = 1000  # MLflow's MAX_METRICS_PER_BATCH; the client splits bigger batches itself

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


class Spool:
    """The undelivered records of one folder: appended, taken whole for a replay, and put back if it fails.

    All threads of a process that use one folder share one lock; no network call happens under it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / SPOOL_FILE
        with _locks_guard:
            self._lock = _locks.setdefault(self.path.resolve(), threading.Lock())

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write("".join(json.dumps(record) + "\n" for record in records))

    def files(self) -> list[Path]:
        """The spool file and files of replays that a killed process left behind."""
        return sorted(self.folder.glob("tracking-spool*.jsonl"))

    def pending(self) -> bool:
        with self._lock:
            return any(path.stat().st_size for path in self.files())

    def take(self) -> tuple[list[Path], list[dict]]:
        """Move the spool aside (new records start a fresh file) and read every spooled record."""
        with self._lock:
            taken = []
            for path in self.files():
                if path == self.path:
                    moved = self.folder / f"tracking-spool.{uuid.uuid4().hex[:12]}.replaying.jsonl"
                    path = path.rename(moved)
                taken.append(path)
        records = []
        for path in taken:
            for line in path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a killed process: nothing to recover
                    continue
        return taken, records

    def finish(self, taken: list[Path], remaining: list[dict]) -> None:
        """After a replay: put the undelivered records back, then drop the taken files."""
        self.append(remaining)
        with self._lock:
            for path in taken:
                path.unlink(missing_ok=True)


@dataclass
class Delivery:
    """Sends records through one client; remembers the runs it created (pending ref -> run id)."""

    client: MlflowClient
    uri: str
    created: dict[str, str] = field(default_factory=dict)
    on_created: Callable[[str, str], None] | None = None
    last_error: BaseException | None = None

    def __post_init__(self) -> None:
        if has_credentials(self.uri):  # MLflow prints "View run ... at: <tracking URI>" when a run ends
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

    def run_id(self, ref: str) -> str:
        return self.created.get(ref, ref)

    def with_ids(self, records: list[dict]) -> list[dict]:
        """`records` with the pending refs of runs created meanwhile replaced by their ids."""
        return [record | {"run": self.run_id(record["run"])} for record in records]

    def send(self, records: list[dict], on_reject: Callable[[list[dict], BaseException], None]) -> int:
        """Send in order; a group the store refuses goes to `on_reject` and is skipped. Returns how many
        records were handled before an outage stopped delivery (len(records) when none did)."""
        start = 0
        while start < len(records):
            stop = _group_end(records, start)
            try:
                self._send_group(records[start:stop])
            except Exception as err:  # noqa: BLE001 - classified right here
                if is_outage(err):
                    self.last_error = err
                    return start
                on_reject(records[start:stop], err)
            start = stop
        return len(records)

    def _send_group(self, group: list[dict]) -> None:
        first = group[0]
        op, run_id = first["op"], self.run_id(first["run"])
        if op == "create_run":
            if first["run"] not in self.created:
                self._create(first)
            return
        if run_id.startswith(PENDING):
            raise ValueError(f"record for run {run_id} whose create_run record was lost")
        if op == "metrics":
            metrics = [Metric(key, float(value), record["timestamp"], record["step"])
                       for record in group for key, value in record["metrics"].items()]
            self.client.log_batch(run_id, metrics=metrics)
        elif op == "params":
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in first["params"].items()])
        elif op == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in first["tags"].items()])
        elif op == "artifact":
            path = Path(first["path"])
            if not path.exists():
                raise FileNotFoundError(f"artifact {path} no longer exists")
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), first.get("artifact_path"))
            else:
                self.client.log_artifact(run_id, str(path), first.get("artifact_path"))
        elif op == "dict":
            self.client.log_dict(run_id, first["data"], first["name"])
        elif op == "end":
            self.client.set_terminated(run_id, status=first["status"], end_time=first["end_time"])
        else:
            raise ValueError(f"unknown tracking record op {op!r}")

    def _create(self, record: dict) -> None:
        exp_id = experiment_id(self.client, self.uri, record["experiment"])
        run = self.client.create_run(exp_id, start_time=record["start_time"], tags=record["tags"],
                                     run_name=record["run_name"])
        self.created[record["run"]] = run.info.run_id
        if self.on_created:
            self.on_created(record["run"], run.info.run_id)


def _group_end(records: list[dict], start: int) -> int:
    """End of the group starting at `start`: consecutive metrics of one run (up to METRICS_PER_CALL), or one."""
    stop, count = start + 1, len(records[start].get("metrics", ()))
    if records[start]["op"] != "metrics":
        return stop
    while stop < len(records) and records[stop]["op"] == "metrics" and records[stop]["run"] == records[start]["run"]:
        count += len(records[stop]["metrics"])
        if count > METRICS_PER_CALL:
            break
        stop += 1
    return stop


def write_run_id(folder: Path, run_id: str) -> None:
    """Record a run folder's MLflow run id (read by the gate and by `alignlab tracking replay`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_ID_FILE).write_text(run_id)


def resolve_pending_run_id(folder: Path, ref: str, run_id: str) -> None:
    """A run started during an outage now exists: replace its pending ref in the run folder's id file (only
    that ref: the folder may meanwhile belong to a newer run, e.g. after --resume)."""
    path = Path(folder) / RUN_ID_FILE
    if path.is_file() and path.read_text().strip() == ref:
        path.write_text(run_id)


@dataclass
class ReplayResult:
    delivered: int
    rejected: list[str]
    remaining: int
    uri: str


def replay_spool(run_dir: str | Path, tracking_uri: str | None = None) -> ReplayResult:
    """Send the records spooled in `run_dir` (after an outage outlived the run) and keep what still fails.

    The store is `tracking_uri`, else the one the records name, else $MLFLOW_TRACKING_URI (the records keep
    it with credentials redacted, so a URI that had some must be given again)."""
    spool = Spool(run_dir)
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if not spool.pending():
        return ReplayResult(0, [], 0, redact(tracking_uri or ""))
    taken, records = spool.take()
    uri = tracking_uri or next((r["uri"] for r in records if r.get("uri")), "") or os.environ.get(
        "MLFLOW_TRACKING_URI", "")
    if not uri or REDACTED in uri:
        spool.finish(taken, records)
        raise ValueError(f"the records in {spool.path} name no usable tracking URI ({uri or 'none'}): pass "
                         f"--tracking-uri (credentials are not stored) or set MLFLOW_TRACKING_URI")
    delivery = Delivery(MlflowClient(tracking_uri=uri), uri,
                        on_created=lambda ref, run_id: resolve_pending_run_id(Path(run_dir), ref, run_id))
    rejected: list[dict] = []
    done = delivery.send(records, lambda group, err: rejected.extend(
        {"op": record["op"], "error": redact(str(err))} for record in group))
    spool.finish(taken, delivery.with_ids(records[done:]))
    return ReplayResult(done - len(rejected), [f"{r['op']}: {r['error']}" for r in rejected], len(records) - done,
                        redact(uri))
