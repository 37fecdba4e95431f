"""Ablations submitted from the browser to the embedded default: `alignlab run SPEC --runner R` as one
supervised background process at a time, its output kept in a log file, cancellable.

Each job is a folder under `jobs_dir`: spec.yaml (what was submitted), log.txt (the process's stdout and
stderr) and job.json (id, ablation, runner, status, times, exit code). The process runs in its own session
so that a cancel reaches the pipeline's step processes too (SIGTERM, then SIGKILL after a grace period).
A job found "running" by a dashboard that did not start it (a restart) is marked "lost".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

RUNNERS = ("kfp-local", "inline")
CANCEL_GRACE_S = 10.0
LOG_TAIL_BYTES = 64_000
_CLI = "import sys; from alignlab.cli import main; sys.exit(main(sys.argv[1:]))"


class JobBusy(RuntimeError):
    """Another job is running; the embedded default runs one at a time."""


class JobRunner:
    def __init__(self, jobs_dir: Path, workdir: Path):
        self.jobs_dir = Path(jobs_dir)
        self.workdir = Path(workdir)
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._current: str | None = None
        self._cancelled: set[str] = set()

    def _path(self, job_id: str) -> Path:
        if not job_id.isalnum():
            raise KeyError(job_id)
        return self.jobs_dir / job_id

    def _write(self, job: dict) -> None:
        path = self._path(job["id"]) / "job.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job, indent=2))
        tmp.replace(path)

    def get(self, job_id: str) -> dict:
        path = self._path(job_id) / "job.json"
        if not path.is_file():
            raise KeyError(job_id)
        job = json.loads(path.read_text())
        if job["status"] == "running" and job_id != self._current:
            job.update(status="lost", ended=job.get("ended") or time.time())
            self._write(job)
        return job

    def list(self) -> list[dict]:
        if not self.jobs_dir.is_dir():
            return []
        ids = [p.parent.name for p in self.jobs_dir.glob("*/job.json")]
        return sorted((self.get(i) for i in ids), key=lambda j: j["started"], reverse=True)

    def log(self, job_id: str) -> str:
        path = self._path(job_id) / "log.txt"
        if not path.is_file():
            raise KeyError(job_id)
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return handle.read().decode(errors="replace")

    def start(self, spec_text: str, ablation: str, runner: str = "kfp-local") -> dict:
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {list(RUNNERS)}, got {runner!r}")
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                raise JobBusy(f"job {self._current} is still running; wait for it or cancel it first")
            job_id = uuid.uuid4().hex[:12]
            self._current = job_id  # before job.json exists, so that `get` never takes it for a lost job
            folder = self._path(job_id)
            folder.mkdir(parents=True)
            (folder / "spec.yaml").write_text(spec_text)
            job = {"id": job_id, "ablation": ablation, "runner": runner, "status": "running",
                   "started": time.time(), "ended": None, "returncode": None}
            self._write(job)
            with (folder / "log.txt").open("wb") as log:
                self._process = subprocess.Popen(
                    [sys.executable, "-c", _CLI, "run", str((folder / "spec.yaml").resolve()), "--runner", runner],
                    cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
            threading.Thread(target=self._watch, args=(self._process, job), daemon=True).start()
        return job

    def _watch(self, process: subprocess.Popen, job: dict) -> None:
        code = process.wait()
        status = "cancelled" if job["id"] in self._cancelled else ("succeeded" if code == 0 else "failed")
        job.update(status=status, ended=time.time(), returncode=code)
        with self._lock:
            self._write(job)
            if self._current == job["id"]:
                self._current = None

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            process = self._process if self._current == job_id else None
        if process is None or process.poll() is not None:
            return self.get(job_id)
        self._cancelled.add(job_id)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for _ in range(50):  # the watcher thread records the outcome
            if self.get(job_id)["status"] != "running":
                break
            time.sleep(0.05)
        return self.get(job_id)

    def shutdown(self) -> None:
        """Cancel the running job (the dashboard is stopping; an orphan would run unsupervised)."""
        if self._current:
            self.cancel(self._current)
