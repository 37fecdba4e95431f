"""What `alignlab run` prints: one line per task, the report table and where to look next; task output in
runs/<ablation>/logs/, its tail and path on failure, live with --verbose. Both runners, and the console's
progress line on a terminal and on a pipe."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
import yaml
from test_pipelines import _write_spec

from alignlab.cli import main
from alignlab.console import TaskConsole, TaskFailed, log_tail


def _done_lines(printed: str) -> list[str]:
    return re.findall(r"^\[ ?\d+/\d+\] done +(.+?) +(?:[\d.]+ s|\d+m\d\ds)$", printed, flags=re.M)


def _broken_spec(folder: Path) -> Path:
    """The two-arm spec with its dataset moved to a folder that does not exist and no generator: the data
    task fails."""
    spec = _write_spec(folder)
    base = yaml.safe_load((folder / "base.yaml").read_text())
    base["data"] = {**base["data"], "root": "no-such-data", "synth": None}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    return spec


@pytest.mark.slow
def test_inline_run_prints_one_line_per_task_then_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    spec = _write_spec(tmp_path)
    assert main(["run", str(spec), "train.max_steps=2", "train.progress=true", "--runner", "inline"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert len(lines) < 40, printed
    assert lines[0].startswith("alignlab run two-arms: 2 arms x 1 seeds = 2 runs, inline")
    assert lines[1].startswith("queued   4 tasks: data, run x2, report")
    assert sorted(_done_lines(printed)) == sorted(["run fast/seed-0", "run slow/seed-0", "report",
                                                  next(t for t in _done_lines(printed) if t.startswith("data "))])
    task_lines = lines[:lines.index("")]  # before the table: the header, the queue and task lines, nothing else
    assert all(re.match(r"(alignlab run |queued |running |\[\d/4\] done )", line) for line in task_lines), printed
    assert "2/2" in Path("runs/two-arms/logs/run-fast-seed-0.log").read_text()  # the trainer's progress bar
    assert printed.index("| metric") > printed.index("] done     report")
    assert "| final_loss" in printed and "| slow " in printed
    tail = lines[lines.index("next:"):]
    assert tail[1].split() == ["report", "runs/two-arms/report.md", "(every", "statistic:", "report.csv,",
                               "report.json)"]
    assert tail[2].split() == ["logs", "runs/two-arms/logs/"] and tail[3].split()[0] == "results"

    # --verbose shows every task's output live, prefixed with the task; --resume keeps finished runs
    assert main(["run", str(spec), "train.max_steps=2", "train.progress=true", "--runner", "inline",
                 "--verbose"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\[run slow/seed-0\] two-arms/slow: 100%.* 2/2 ", printed, flags=re.M)
    assert sorted(_done_lines(printed))[2:] == ["run fast/seed-0", "run slow/seed-0"]
    assert main(["run", str(spec), "train.max_steps=2", "--runner", "inline", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\[2/4\] kept +run fast/seed-0 +already finished$", printed, flags=re.M)
    assert "run fast/seed-0" not in _done_lines(printed) and "report" in _done_lines(printed)


def test_inline_failure_prints_the_log_tail_and_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(_broken_spec(tmp_path)), "--runner", "inline"]) == 1
    captured = capsys.readouterr()
    log = Path("runs/two-arms/logs/data-no-such-data.log")
    assert re.search(rf"^\[1/4\] FAILED +data no-such-data after [^;]+; log: {re.escape(str(log))}$",
                     captured.out, flags=re.M)
    assert "    | FileNotFoundError: data.root no-such-data does not exist" in captured.out  # the tail
    assert "Traceback" in log.read_text() and "| metric" not in captured.out
    assert captured.err.startswith("alignlab: error: task data no-such-data failed: FileNotFoundError")
    assert len(captured.out.splitlines()) < 40


@pytest.mark.slow
def test_kfp_local_failure_tail_path_and_verbose(tmp_path, monkeypatch, capsys):
    """The data task fails inside kfp's executor subprocess: its log's tail and path on the terminal, no
    executor output otherwise; with --verbose the executor's output streams live."""
    monkeypatch.chdir(tmp_path)
    spec = str(_broken_spec(tmp_path))
    assert main(["run", spec, "--runner", "kfp-local"]) == 1
    captured = capsys.readouterr()
    log = Path("runs/two-arms/logs/data-no-such-data.log")
    # open-tracking runs beside the data task: it may or may not finish before the failure
    assert re.search(rf"^\[[12]/8\] FAILED +data no-such-data after [^;]+; log: {re.escape(str(log))}$",
                     captured.out, flags=re.M)
    assert re.search(r"^    \| .*FileNotFoundError: data.root no-such-data does not exist", captured.out, flags=re.M)
    assert "KFP Executor" in log.read_text()
    outside_tail = [line for line in captured.out.splitlines() if not line.startswith("    | ")]
    assert not any("KFP Executor" in line for line in outside_tail)
    assert "alignlab: error: pipeline alignlab-two-arms failed" in captured.err
    assert len(captured.out.splitlines()) < 40

    assert main(["run", spec, "--runner", "kfp-local", "--verbose"]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"^\[data no-such-data\] .*\[KFP Executor .*Looking for component `prepare_data`", printed,
                     flags=re.M)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_redraws_in_place_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr("alignlab.console.REFRESH_S", 0.01)
    terminal = _Terminal()
    console = TaskConsole(tmp_path / "logs", stream=terminal)
    console.queued(["train a/seed-0", "train b/seed-0"])
    first, second = console.start("train a/seed-0"), console.start("train b/seed-0")
    console.write(first, "epoch 0\r a:  45%|████▌     | 9/20 [00:01<00:02]\r")
    time.sleep(0.1)
    console.finish(first, ok=True)
    time.sleep(0.05)
    console.finish(second, ok=True)
    console.close()
    screen = terminal.getvalue()
    assert "running  train a/seed-0 9/20 (45%)" in screen and "| train b/seed-0" in screen
    assert "\r\033[K[1/2] done     train a/seed-0" in screen  # the progress line is cleared, then the line
    # what stays on the screen: each line as left after its last "clear line"; the progress line is gone
    rendered = [line.split("\r\033[K")[-1] for line in screen.split("\n")]
    assert rendered[0].startswith("queued   2 tasks: train x2") and rendered[-1] == ""
    assert [re.sub(r" +[\d.]+ s$", "", line) for line in rendered[1:-1]] == [
        "[1/2] done     train a/seed-0", "[2/2] done     train b/seed-0"]
    assert (tmp_path / "logs" / "train-a-seed-0.log").read_bytes().startswith(b"epoch 0\r")


def test_sparse_progress_lines_on_a_pipe(tmp_path, monkeypatch):
    monkeypatch.setattr("alignlab.console.REFRESH_S", 0.01)
    pipe = io.StringIO()
    console = TaskConsole(tmp_path, stream=pipe, sparse_interval_s=0.2)
    task = console.start("train a/seed-0")
    time.sleep(0.5)
    console.finish(task, ok=True)
    console.close()
    lines = pipe.getvalue().splitlines()
    running = [line for line in lines if line.startswith("running  train a/seed-0")]
    assert 1 <= len(running) <= 3 and "\r" not in pipe.getvalue()  # sparse, never redrawn
    assert re.fullmatch(r"\[1\] done     train a/seed-0 +0\.\d s", lines[-1])


def test_inline_task_captures_output_and_turns_errors_into_task_failed(tmp_path, capsys):
    console = TaskConsole(tmp_path, stream=io.StringIO())
    with console.task("ok"):
        print("to the log")
    assert "to the log" in (tmp_path / "ok.log").read_text() and capsys.readouterr().out == ""
    with pytest.raises(TaskFailed, match=r"task ok failed: ValueError: bad value \(log: .*ok-2.log\)"):
        with console.task("ok"):
            raise ValueError("bad value")
    screen = console.stream.getvalue()
    assert "FAILED   ok after" in screen and "    | ValueError: bad value" in screen
    console.close()


def test_log_tail_shows_what_a_terminal_would(tmp_path):
    log = tmp_path / "t.log"
    bars = "".join(f"x: {p}%|##  | {p}/100 [00:01<00:02]\n" for p in range(0, 101, 10))
    log.write_text("start\n" + bars + "a\rb\n\x1b[91mred\x1b[0m\n" + "-" * 80 + "\n\n")
    assert log_tail(log) == ["start", "x: 100%|##  | 100/100 [00:01<00:02]", "b", "red"]
    assert log_tail(log, lines=2) == ["b", "red"]
