"""R1: `alignlab train` killed with SIGKILL at many points, each time resumed with --resume, ends bit for bit
where an uninterrupted run ends: same metrics.jsonl rows (one per step), same final weights, no stray files.

The kill points come from a seeded RNG: during start-up, before the first checkpoint, at random moments
within random steps, right after a checkpoint's temporary file appears (a kill during the write) and during
the final.pt write. The uninterrupted reference is a plain `python -m alignlab.cli train` subprocess; the
killed runs are forked from a pre-imported parent (tests/fork_launcher.py), which saves ~10 s of imports
per launch on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from conftest import tiny_config_tree
from fork_launcher import fork_launcher

TOTAL_STEPS = 16  # two epochs of 8 batches
SEED = 20240607


def _max_step(metrics: Path) -> int:
    """Largest step in metrics.jsonl as it is being appended to (a torn last line is ignored)."""
    best = 0
    for line in metrics.read_text().splitlines():
        try:
            best = max(best, json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return best


def _temp_files(folder: Path, prefix: str) -> set[str]:
    return {p.name for p in folder.glob(f"{prefix}*.tmp")} if folder.is_dir() else set()


def _checkpoint_step(run_dir: Path) -> int:
    names = sorted((run_dir / "checkpoints").glob("step-*.pt")) if (run_dir / "checkpoints").is_dir() else []
    return int(names[-1].stem.split("-")[1]) if names else 0


def _trigger(kind: tuple, run_dir: Path):
    """A function that returns True once the moment to kill has come (state kept in a closure)."""
    metrics, ckpt_dir = run_dir / "metrics.jsonl", run_dir / "checkpoints"
    started = time.monotonic()
    if kind[0] == "startup":
        return lambda: time.monotonic() - started >= kind[1]
    if kind[0] in ("checkpoint_write", "final_write"):
        folder, prefix = (ckpt_dir, ".step-") if kind[0] == "checkpoint_write" else (run_dir, ".final.pt.")
        before = _temp_files(folder, prefix)  # a stray one from an earlier kill is not this launch's write
        return lambda: bool(_temp_files(folder, prefix) - before)
    # ("row", step, delay): `delay` seconds after the row of `step` (or a later one, if resumed past it) is written
    target = kind[1]
    inode = metrics.stat().st_ino if metrics.exists() else None  # rewritten on start: stale rows do not count
    seen = []

    def due() -> bool:
        if not seen:
            if metrics.exists() and metrics.stat().st_ino != inode and _max_step(metrics) >= target:
                seen.append(time.monotonic())
            return False
        return time.monotonic() - seen[0] >= kind[2]

    return due


def _kill_plan(rng: random.Random) -> list[tuple]:
    """Start-up, step 1 (before the first checkpoint), six random moments spread over both epochs with two
    checkpoint writes among them, then the final.pt write: 11 kills."""
    middle = [("row", step, rng.uniform(0.0, 0.06)) for step in sorted(rng.sample(range(2, TOTAL_STEPS), 6))]
    for _ in range(2):
        middle.insert(rng.randint(0, len(middle)), ("checkpoint_write",))
    return [("startup", rng.uniform(0.05, 0.4)), ("row", 1, 0.0)] + middle + [("final_write",)]


def _run_until(launcher, argv, log: Path, due, timeout: float = 60.0) -> int:
    """Start `argv`, SIGKILL it as soon as `due()` (None: let it finish); its return code."""
    pid = launcher.run(argv, log)
    deadline = time.monotonic() + timeout
    killed = False
    while time.monotonic() < deadline:
        returncode = launcher.poll(pid)
        if returncode is not None:
            return returncode
        if due is not None and not killed and due():
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"{argv} did not end within {timeout}s; log: {log.read_text()[-2000:]}")


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "step_time" and not k.startswith("time/")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_many_points_then_resume_matches_an_uninterrupted_run(synth_root, tmp_path):
    tree = tiny_config_tree(synth_root, tmp_path, max_steps=TOTAL_STEPS, checkpoint_every=2, keep_checkpoints=2)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = subprocess.Popen([sys.executable, "-m", "alignlab.cli", "train", str(config), "--run-dir",
                                  str(reference_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rng = random.Random(SEED)
    kills, torn_writes = [], 0
    argv = ["train", str(config), "--run-dir", str(run_dir), "--resume"]
    with fork_launcher(env) as launcher:
        for number, kind in enumerate(_kill_plan(rng)):
            log = tmp_path / f"launch-{number}.log"
            returncode = _run_until(launcher, argv, log, _trigger(kind, run_dir))
            assert returncode == -signal.SIGKILL, f"launch {number} ({kind}) was not killed: {log.read_text()[-2000:]}"
            kills.append((kind[0], _checkpoint_step(run_dir)))
            torn_writes += bool(_temp_files(run_dir / "checkpoints", ".step-") | _temp_files(run_dir, ".final.pt."))
        final_log = tmp_path / "final.log"
        assert _run_until(launcher, argv, final_log, None) == 0, final_log.read_text()[-3000:]
    output = reference.communicate(timeout=120)[0].decode()
    assert reference.returncode == 0, output[-3000:]

    assert kills[1] == ("row", 0)  # the second kill came before the first checkpoint
    assert torn_writes >= 3, kills  # two checkpoint writes and the final.pt write were cut
    rows, expected = _rows(run_dir), _rows(reference_dir)
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))  # no repeated, no missing step
    assert rows == expected  # every loss, lr and logit scale, bit for bit
    final, reference_final = (torch.load(d / "final.pt", weights_only=True)["model"] for d in (run_dir, reference_dir))
    assert final.keys() == reference_final.keys()
    for name, value in reference_final.items():
        assert torch.equal(final[name], value), name
    assert not [p for p in run_dir.rglob("*.tmp")], "a killed write's temporary file was left behind"
    assert "resumed from" in final_log.read_text()
