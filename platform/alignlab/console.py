"""What `alignlab run` prints: one line per task as it changes state, and each task's own output in a log.

A run is a handful of tasks (data, train, evaluate, report, ...). The terminal gets: one "queued" line,
a progress line while tasks run (redrawn in place on a terminal; on a pipe or file, a line every
`sparse_interval_s` seconds), a "done" line with the duration per task, and for a failed task its log's
path and last lines. Everything a task prints (executor logs, progress bars, tracebacks) goes to
`<log_dir>/<task>.log`; `verbose` also echoes it live, each line prefixed with the task.

Both runners use this: the inline runner through `TaskConsole.task` (redirects this process's
stdout/stderr while a task runs), kfp's local runner by routing each task thread's output with
`start` / `write` / `finish` (alignlab_pipelines.local_output).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

TAIL_LINES = 20
SPARSE_INTERVAL_S = 60.0
REFRESH_S = 0.5
_PROGRESS = re.compile(r"(\d+)%\|[^|]*\|\s*(\d+/\d+)")  # a tqdm bar: " 45%|████▌     | 9/20 [00:01<..."
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RULE = re.compile(r"^\s*-{20,}\s*$")  # kfp's separator after each task


class TaskFailed(RuntimeError):
    """A task of a run failed; its log's tail and path were printed."""


def duration_text(seconds: float) -> str:
    """12.3 s, 2m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of a task log as a terminal would show them: a carriage return overwrites
    its line, and a run of progress-bar refreshes counts as its last state only."""
    shown: list[str] = []
    for raw in _ANSI.sub("", path.read_bytes().decode(errors="replace")).split("\n"):  # "\r" kept as written
        line = raw.rstrip("\r").rsplit("\r", 1)[-1]
        if _RULE.match(line):
            continue
        if shown and _PROGRESS.search(line) and _PROGRESS.search(shown[-1]):
            shown[-1] = line
        else:
            shown.append(line)
    while shown and not shown[-1].strip():
        shown.pop()
    return shown[-lines:]


@dataclass
class TaskLog:
    """One task's log file, its start time and its latest progress-bar state."""

    label: str
    path: Path
    handle: TextIO
    started: float = field(default_factory=time.monotonic)
    progress: str = ""
    pending: str = ""  # verbose echo: text after the last line break

    def record(self, text: str) -> None:
        self.handle.write(text)
        self.handle.flush()  # the log is complete when the task fails, and `tail -f` works meanwhile
        for match in _PROGRESS.finditer(text):
            self.progress = f"{match.group(2)} ({match.group(1)}%)"


class TaskConsole:
    """Task lines on `stream` (default: sys.stdout when created) and task logs under `log_dir`."""

    def __init__(self, log_dir: str | Path, *, verbose: bool = False, stream: TextIO | None = None,
                 sparse_interval_s: float = SPARSE_INTERVAL_S):
        self.log_dir = Path(log_dir)
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.sparse_interval_s = sparse_interval_s
        self.total = 0
        self.finished = 0
        self.width = 0
        self.running: list[TaskLog] = []
        self._names: set[str] = set()
        self._lock = threading.RLock()
        self._status_shown = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- terminal lines -------------------------------------------------------------------------------
    def line(self, text: str) -> None:
        """Print a permanent line (above the progress line on a terminal)."""
        with self._lock:
            self._clear_status()
            self.stream.write(text + "\n")
            self._draw_status()
            self.stream.flush()

    def queued(self, labels: list[str]) -> None:
        """The queued state of every task, in one line (grouped by their first word)."""
        self.total = len(labels)
        self.width = min(40, max((len(label) for label in labels), default=0))
        groups = Counter(label.split(" ")[0] for label in labels)
        self.line(f"queued   {len(labels)} tasks: "
                  + ", ".join(name if count == 1 else f"{name} x{count}" for name, count in groups.items()))

    def _counter(self) -> str:
        return f"[{self.finished:>{len(str(self.total))}}/{self.total}]" if self.total else f"[{self.finished}]"

    def skipped(self, label: str, reason: str) -> None:
        """A task that did not need to run (e.g. a finished run kept by --resume)."""
        with self._lock:
            self.finished += 1
            self.line(f"{self._counter()} kept     {label.ljust(self.width)} {reason}")

    # -- task lifecycle -------------------------------------------------------------------------------
    def open_log(self, label: str) -> TaskLog:
        """A log file under log_dir named after `label` (made unique within this console)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            name = re.sub(r"[^A-Za-z0-9._=-]+", "-", label).strip("-") or "task"
            unique, index = name, 2
            while unique in self._names:
                unique, index = f"{name}-{index}", index + 1
            self._names.add(unique)
            path = self.log_dir / f"{unique}.log"
            return TaskLog(label, path, open(path, "w"))

    def start(self, label: str) -> TaskLog:
        """A task starts: open its log and show it on the progress line."""
        task = self.open_log(label)
        with self._lock:
            self.running.append(task)
            if self._ticker is None and not self.verbose:
                self._ticker = threading.Thread(target=self._tick, name="alignlab-progress", daemon=True)
                self._ticker.start()
        return task

    def write(self, task: TaskLog, text: str) -> None:
        """Output of a running task: into its log; with `verbose`, also to the terminal line by line."""
        with self._lock:
            task.record(text)
            if self.verbose:
                task.pending += text
                *complete, task.pending = re.split(r"\r\n|\r|\n", task.pending)
                for piece in complete:
                    self.stream.write(f"[{task.label}] {piece}\n")
                self.stream.flush()

    def finish(self, task: TaskLog, ok: bool, status: str | None = None) -> None:
        """A task ends: a done line with its duration, or a failed line with its log's path and tail."""
        with self._lock:
            if task.pending and self.verbose:
                self.stream.write(f"[{task.label}] {task.pending}\n")
            task.handle.close()
            if task in self.running:
                self.running.remove(task)
            self.finished += 1
            took = duration_text(time.monotonic() - task.started)
            if ok:
                self.line(f"{self._counter()} done     {task.label.ljust(self.width)} {took:>8}")
                return
            tail = log_tail(task.path)
            self.line(f"{self._counter()} {(status or 'FAILED'):<8} {task.label} after {took}; log: {task.path}")
            if tail:
                self.line(f"    last {len(tail)} lines of {task.path}:")
                for text in tail:
                    self.line(f"    | {text}")

    @contextlib.contextmanager
    def task(self, label: str):
        """Run the block as a task of this process: its stdout/stderr go to the task log; an exception
        becomes TaskFailed (the traceback is in the log, its tail on the terminal); Ctrl-C passes through."""
        task = self.start(label)
        stream = _TaskStream(self, task)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield task
        except Exception as err:
            self.write(task, traceback.format_exc())
            self.finish(task, ok=False)
            raise TaskFailed(f"task {label} failed: {type(err).__name__}: {err} (log: {task.path})") from err
        except BaseException:
            self.finish(task, ok=False, status="STOPPED")
            raise
        self.finish(task, ok=True)

    def close(self) -> None:
        """Stop the progress line (call once every task has finished)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._clear_status()
            self.stream.flush()

    # -- the progress line ------------------------------------------------------------------------------
    def status_text(self) -> str:
        """"running  train a/seed-0 3/4 (75%) 0:12 | ..." for the tasks running now."""
        now = time.monotonic()
        parts = [" ".join(filter(None, (t.label, t.progress, duration_text(now - t.started))))
                 for t in self.running]
        return "running  " + " | ".join(parts) if parts else ""

    def _draw_status(self) -> None:
        if self.tty and not self.verbose and self.running:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self.stream.write(self.status_text()[:width])
            self._status_shown = True

    def _clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r\033[K")
            self._status_shown = False

    def _tick(self) -> None:
        last_sparse = time.monotonic()
        while not self._stop.wait(REFRESH_S):
            with self._lock:
                if self.tty:
                    self._clear_status()
                    self._draw_status()
                    self.stream.flush()
                elif self.running and time.monotonic() - last_sparse >= self.sparse_interval_s:
                    last_sparse = time.monotonic()
                    self.stream.write(self.status_text() + "\n")
                    self.stream.flush()


class _TaskStream(io.TextIOBase):
    """sys.stdout / sys.stderr while an inline task runs: everything goes to the task's log."""

    def __init__(self, console: TaskConsole, task: TaskLog):
        self.console, self.task = console, task

    def write(self, text: str) -> int:
        self.console.write(self.task, text)
        return len(text)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False


def next_steps(out_dir: str | Path, tracking_uri: str | None, mlflow_bin: str = "mlflow") -> list[str]:
    """Where to look after a run: the report, the task logs, MLflow (when tracked) and the results book."""
    out = Path(out_dir)
    lines = ["", "next:", f"  report   {out / 'report.md'}  (every statistic: report.csv, report.json)"]
    if (out / "logs").is_dir():
        lines.append(f"  logs     {out / 'logs'}/")
    if tracking_uri:
        lines.append(f"  MLflow   {mlflow_bin} ui --backend-store-uri {tracking_uri}")
    if Path("docs/results").is_dir():
        lines.append("  results  docs/results/  (the results book: write up what you found)")
    return lines
