"""Each task's output of kfp's local runner into its own log file, and one terminal line per task state.

How kfp 2.16.1's local runner emits output (kfp/local/, read from the source):

- `task_dispatcher.run_single_task_implementation` runs every task. Inside `logging_utils.local_logger_context()`
  it swaps the root logger's handlers for one `StreamHandler(sys.stdout)` and logs "Executing task ...",
  the outputs and the status; inside `logging_utils.indented_print()` it swaps `builtins.print` for an
  indenting one; `subprocess_task_handler.run_local_subprocess` runs the executor with stderr merged into a
  pipe read in text mode (so a tqdm "\\r" also ends a line) and echoes each line with print().
- ParallelFor iterations run in a ThreadPoolExecutor (2 threads), so two tasks print at once, and both
  context managers above save and restore process-global state from two threads at once: after a run the
  root logger or `builtins.print` can be left in a task's state (the report came out indented).

So the output is captured with public means where they exist: while the pipeline runs, sys.stdout is a
stream that sends each write to the log of the task the writing thread runs (both print() and the
StreamHandler kfp creates resolve sys.stdout then), and `builtins.print` and the root logger are restored
afterwards. Which task a thread runs is only visible in `run_single_task_implementation` (its component
name and arguments: the run item with arm and seed); kfp has no per-task callback, and its SubprocessRunner
cannot be subclassed (the handler map is keyed by the exact runner type). So `capture_task_output` wraps
that one function, as a module attribute (orchestrator_utils looks it up at call time), for the duration
of the run, after checking its signature; a kfp upgrade that moves it fails here with a clear message.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import io
import json
import logging
import re
import threading
from pathlib import Path

from kfp.local import status, task_dispatcher

from alignlab.console import TaskConsole, TaskLog

HOOKED = "run_single_task_implementation"


def task_label(component_name: str, arguments: dict) -> str:
    """A task's line label from its component and arguments: "train clip-clean/seed-0",
    "evaluate clip-clean/seed-0", "data synthcaps-ec5adcb94cd1", "prepare filter", else the task name."""
    name = re.sub(r"-\d+$", "", component_name.removeprefix("comp-"))
    try:
        if name == "train":
            run = arguments["run"]
            return f"train {run['arm']}/seed-{int(run['seed'])}"
        if name == "evaluate":
            trained = json.loads(arguments["trained"])
            return f"evaluate {trained['arm']}/seed-{int(trained['seed'])}"
        if name == "prepare-data":
            from alignlab.config import validate_config
            from alignlab.data.roots import resolve_data_root

            root = resolve_data_root(validate_config(json.loads(arguments["config_json"])).data)
            return f"data {Path(str(root)).name}"
        if name == "prepare":
            return f"prepare {next(iter(json.loads(arguments['step_json'])))}"
    except (KeyError, TypeError, ValueError, StopIteration):
        pass  # an argument of another shape: the plain name still tells the task
    return name


class _ThreadRoutedStdout(io.TextIOBase):
    """sys.stdout while the pipeline runs: a write goes to the log of the task its thread runs, or to the
    pipeline's own log (kfp's orchestration messages) when the thread runs none."""

    def __init__(self, console: TaskConsole, pipeline_log: TaskLog):
        self.console, self.pipeline_log = console, pipeline_log
        self.local = threading.local()

    def write(self, text: str) -> int:
        self.console.write(getattr(self.local, "task", None) or self.pipeline_log, text)
        return len(text)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def capture_task_output(console: TaskConsole):
    """While the block runs kfp's local runner: one task line per state on `console`, each task's output in
    its log, kfp's own messages in <log_dir>/pipeline.log. Yields that pipeline log."""
    original = getattr(task_dispatcher, HOOKED, None)
    signature = inspect.signature(original) if callable(original) else None
    if signature is None or not {"component_name", "arguments"} <= set(signature.parameters):
        raise RuntimeError(f"kfp.local.task_dispatcher.{HOOKED}(component_name, arguments, ...) is not in the "
                           f"installed kfp; alignlab_pipelines/local_output.py follows kfp 2.16 and needs updating")
    pipeline_log = console.open_log("pipeline")
    router = _ThreadRoutedStdout(console, pipeline_log)

    def run_task(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        task = console.start(task_label(bound.arguments["component_name"], bound.arguments["arguments"]))
        router.local.task = task
        ok = False
        try:
            outputs, task_status = original(*args, **kwargs)
            ok = task_status == status.Status.SUCCESS
            return outputs, task_status
        finally:
            router.local.task = None
            console.finish(task, ok=ok)

    saved_print, root = builtins.print, logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    setattr(task_dispatcher, HOOKED, run_task)
    try:
        with contextlib.redirect_stdout(router):
            yield pipeline_log
    finally:
        setattr(task_dispatcher, HOOKED, original)
        builtins.print = saved_print
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        pipeline_log.handle.close()
        if pipeline_log.path.stat().st_size == 0:  # kfp said nothing outside its tasks
            pipeline_log.path.unlink()
        console.close()
