"""kfp's local runner gives every step process half the cores (two runs train at once), but the prepare steps run
one at a time before the runs' loop: they take every core (SERIAL_STEP_THREADS), and nothing else changes."""

from __future__ import annotations

import os

import pytest
import torch

import alignlab.prepare
from alignlab_components.steps import SERIAL_STEP_THREADS, prepare_step, serial_step_threads
from alignlab_pipelines.local import LOCAL_PARALLELISM, cpu_share_per_step


def test_the_local_runner_shares_cores_among_steps_and_names_them_all_for_serial_steps(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(SERIAL_STEP_THREADS, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    with cpu_share_per_step():
        assert os.environ["OMP_NUM_THREADS"] == str(8 // LOCAL_PARALLELISM)
        assert os.environ[SERIAL_STEP_THREADS] == "8"
    assert "OMP_NUM_THREADS" not in os.environ and SERIAL_STEP_THREADS not in os.environ


def test_a_users_thread_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv(SERIAL_STEP_THREADS, raising=False)
    with cpu_share_per_step():
        assert os.environ["OMP_NUM_THREADS"] == "3"
        assert SERIAL_STEP_THREADS not in os.environ


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_serial_step_threads_sets_torch_and_omp_then_restores(monkeypatch, one_thread):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(SERIAL_STEP_THREADS, "2")
    with serial_step_threads():
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("value", [None, "", "0", "two"])
def test_without_a_serial_thread_count_nothing_changes(monkeypatch, one_thread, value):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if value is None:
        monkeypatch.delenv(SERIAL_STEP_THREADS, raising=False)
    else:
        monkeypatch.setenv(SERIAL_STEP_THREADS, value)
    with serial_step_threads():
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"


def test_a_prepare_step_runs_with_every_core(monkeypatch, one_thread):
    seen = {}

    def fake_run_prepare_step(entry, context):
        seen.update(torch=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"), entry=entry)
        return {"kind": "synth", "status": "skipped"}

    monkeypatch.setattr(alignlab.prepare, "run_prepare_step", fake_run_prepare_step)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(SERIAL_STEP_THREADS, "2")
    assert prepare_step({"synth": {"out": "x"}}, "spec") == {"kind": "synth", "status": "skipped"}
    assert seen == {"torch": 2, "omp": "2", "entry": {"synth": {"out": "x"}}}
    assert torch.get_num_threads() == 1
