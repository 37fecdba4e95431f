"""MLflow reads for the dashboard: ablation runs by tag, metric histories, artifacts; timed and cached.

Why a cache: a page view asks for the same runs many times and MLflow answers in tens of ms per call. Run
lists are kept `LIST_TTL_S` seconds (a running ablation shows new runs within that); the history of a run
that has ended never changes, so it is kept under (run id, status) until evicted, a running run's for
`LIST_TTL_S` only. Histories of many runs are fetched in parallel threads (one HTTP call each).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from alignlab.tracking import TAG_ABLATION, find_runs, get_run, resolve_tracking_uri
from alignlab_dashboard.metrics import DashboardMetrics

LIST_TTL_S = 5.0
HISTORY_CACHE_SIZE = 20_000  # (run, metric) histories kept
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
FETCH_THREADS = 8
RESULT_CACHE_SIZE = 256  # computed tables and curves kept


class NotFound(LookupError):
    """A run, ablation or file the caller asked for does not exist (the API answers 404)."""


class RunStore:
    def __init__(self, tracking_uri: str | None, metrics: DashboardMetrics):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._lists: dict[tuple, tuple[float, list[dict]]] = {}
        self._list_locks: dict[tuple, threading.Lock] = {}
        self._histories: OrderedDict[tuple, tuple[float, list[tuple[int, float, int]]]] = OrderedDict()
        self._results: OrderedDict[tuple, object] = OrderedDict()
        self._computing: dict[tuple, threading.Lock] = {}
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="mlflow-history")

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, ablation: str | None = None, tag: str = TAG_ABLATION) -> list[dict]:
        """`find_runs` records whose `tag` equals `ablation` (every run with that tag when None). An expired
        list is refreshed by one caller while the others keep getting the previous list."""
        key = (tag, ablation)
        with self._lock:
            cached = self._lists.get(key)
            lock = self._list_locks.setdefault(key, threading.Lock())
        if cached and time.monotonic() - cached[0] < LIST_TTL_S:
            return cached[1]
        if not lock.acquire(blocking=cached is None):
            return cached[1]  # another request is refreshing it
        try:
            with self._lock:
                cached = self._lists.get(key)
            if cached and time.monotonic() - cached[0] < LIST_TTL_S:
                return cached[1]
            with self.metrics.mlflow_query("search_runs"):
                try:
                    runs = find_runs(self.uri, None, {tag: ablation} if ablation else None)
                except FileNotFoundError:  # no local store yet: nothing has run
                    runs = []
            if ablation is None:
                runs = [r for r in runs if r["tags"].get(tag)]
            with self._lock:
                self._lists[key] = (time.monotonic(), runs)
            return runs
        finally:
            lock.release()

    def ablations(self) -> dict[str, list[dict]]:
        """Ablation name -> its runs (oldest first)."""
        grouped: dict[str, list[dict]] = {}
        for run in self.runs():
            grouped.setdefault(run["tags"][TAG_ABLATION], []).append(run)
        return grouped

    def run(self, run_id: str) -> dict:
        with self.metrics.mlflow_query("get_run"):
            try:
                return get_run(self.uri, run_id)
            except ValueError as err:
                raise NotFound(str(err)) from None

    def history(self, run: dict, metric: str) -> list[tuple[int, float, int]]:
        """(step, value, timestamp ms) of `metric` in `run` (a `find_runs` record), in logging order."""
        key = (run["run_id"], metric, run["status"])
        with self._lock:
            cached = self._histories.get(key)
            if cached and (run["status"] in END_STATUSES or time.monotonic() - cached[0] < LIST_TTL_S):
                self._histories.move_to_end(key)
                return cached[1]
        stored = _sanitised(run, metric)
        with self.metrics.mlflow_query("get_metric_history"):
            points = [(m.step, m.value, m.timestamp) for m in self._client().get_metric_history(run["run_id"], stored)]
        with self._lock:
            self._histories[key] = (time.monotonic(), points)
            while len(self._histories) > HISTORY_CACHE_SIZE:
                self._histories.popitem(last=False)
        return points

    def histories(self, runs: list[dict], metric: str) -> list[list[tuple[int, float, int]]]:
        """`history` of every run, fetched in parallel."""
        return list(self._pool.map(lambda run: self.history(run, metric), runs))

    def artifacts(self, run_id: str, path: str | None = None) -> list[dict]:
        with self.metrics.mlflow_query("list_artifacts"):
            return [{"path": a.path, "is_dir": a.is_dir, "size": a.file_size}
                    for a in self._client().list_artifacts(run_id, path)]

    def download(self, run_id: str, path: str, into: Path) -> Path:
        """Download one artifact file into the folder `into`; NotFound unless `path` is a clean relative path
        to a file of the run that lands inside `into`."""
        parts = PurePosixPath(path).parts
        if not parts or path.startswith("/") or "\\" in path or any(p in ("..", ".", "") for p in parts):
            raise NotFound(f"no artifact {path!r}")
        from mlflow.exceptions import MlflowException

        try:
            with self.metrics.mlflow_query("download_artifact"):
                local = Path(self._client().download_artifacts(run_id, path, str(into))).resolve()
        except (MlflowException, OSError):
            raise NotFound(f"no artifact {path!r} in run {run_id}") from None
        if not local.is_file() or not local.is_relative_to(into.resolve()):
            raise NotFound(f"no artifact {path!r} in run {run_id}")
        return local

    def memo(self, key: tuple, runs: list[dict], compute):
        """`compute()` cached under `key` and the state of `runs`: kept while no run changes status, and for
        LIST_TTL_S while one is still running. Concurrent callers of one key wait for a single computation
        (50 users opening one cold page must not fetch the same histories 50 times)."""
        live = any(run["status"] not in END_STATUSES for run in runs)
        full = key + (tuple((run["run_id"], run["status"]) for run in runs),
                      int(time.monotonic() // LIST_TTL_S) if live else 0)
        with self._lock:
            if full in self._results:
                self._results.move_to_end(full)
                return self._results[full]
            lock = self._computing.setdefault(full, threading.Lock())
        with lock:
            with self._lock:
                if full in self._results:
                    return self._results[full]
            value = compute()
            with self._lock:
                self._results[full] = value
                self._computing.pop(full, None)
                while len(self._results) > RESULT_CACHE_SIZE:
                    self._results.popitem(last=False)
        return value


def _sanitised(run: dict, metric: str) -> str:
    """The name MLflow stores `metric` under (the tracker sanitises names and tags the original)."""
    from alignlab.tracking import METRIC_NAME_TAG_PREFIX

    for key, original in run["tags"].items():
        if key.startswith(METRIC_NAME_TAG_PREFIX) and original == metric:
            return key[len(METRIC_NAME_TAG_PREFIX):]
    return metric
