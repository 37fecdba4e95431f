"""A parent that imports alignlab once, then forks one real process per `alignlab` command it is sent.

Starting Python and importing torch + alignlab takes 5-10 s on a busy 2-core machine; a test that kills and
restarts training a dozen times forks every run from this pre-imported parent instead. Each child is its own
process (its own pid, files and exit status) running `alignlab.cli.main(argv)`; the test kills it with a real
SIGKILL. Protocol: one JSON line per request on stdin, one JSON line per reply on stdout:
  {"op": "run", "argv": [...], "log": PATH} -> {"pid": PID}        (child's stdout and stderr go to PATH)
  {"op": "poll", "pid": PID}                -> {"returncode": None | int}  (negative: killed by that signal)
Closing stdin ends the parent.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path


def _child(argv: list[str], log: str) -> None:
    from alignlab.cli import main

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - report any crash through the exit status and the log
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import torch

    torch.set_num_threads(1)
    import alignlab.cli  # noqa: F401 - the imports every child would otherwise pay for
    import alignlab.experiment  # noqa: F401
    import alignlab.tracking  # noqa: F401 - experiment imports these inside its functions
    import alignlab.training.trainer  # noqa: F401
    import alignlab.training.run_model  # noqa: F401

    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            pid = os.fork()
            if pid == 0:
                _child(request["argv"], request["log"])
            answer = {"pid": pid}
        else:
            pid, status = os.waitpid(request["pid"], os.WNOHANG)
            answer = {"returncode": os.waitstatus_to_exitcode(status) if pid else None}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


class ForkLauncher:
    """The test's side: `run(argv, log) -> pid`, `poll(pid) -> None | returncode`."""

    def __init__(self, process):
        self.process = process

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def run(self, argv: list[str], log: Path) -> int:
        return self._ask({"op": "run", "argv": argv, "log": str(log)})["pid"]

    def poll(self, pid: int) -> int | None:
        return self._ask({"op": "poll", "pid": pid})["returncode"]


@contextmanager
def fork_launcher(env: dict):
    import subprocess

    process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=env)
    try:
        yield ForkLauncher(process)
    finally:
        process.stdin.close()
        process.wait(timeout=30)


if __name__ == "__main__":
    serve()
