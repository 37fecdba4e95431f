"""Tracking never stops training: a real MLflow server killed mid-run, a run started while it is down, and the
run ending FINISHED / FAILED / KILLED on every exit path.

The server is `mlflow server` on 127.0.0.1 (SQLite backend, local artifacts), killed with SIGKILL and started
again on the same port with the same database. The MLflow client's own retry budget is made small
(MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, _BACKOFF_FACTOR=1, _TIMEOUT=2: about 2 s); every outage here is longer.
The tracking URI carries credentials (the server ignores them) that must never be stored or printed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_config_tree
from mlflow.tracking import MlflowClient

from alignlab_components.mlflow_server import free_port, start_mlflow_server

SECRET = "s3cr3t-pw"
CLIENT_BUDGET = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
OUTAGE_S = 4.0  # plus the seconds the restart takes: well past the client's ~2 s budget


class Server:
    """One mlflow server process at a fixed port and database, which the tests kill and start again."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.starts = folder, free_port(), 0
        self.server = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_with_credentials(self) -> str:
        return f"http://alice:{SECRET}@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.server = start_mlflow_server(f"sqlite:///{self.folder / 'mlflow.db'}", str(self.folder / "artifacts"),
                                          self.folder / f"server-{self.starts}.log", port=self.port)

    def kill(self) -> None:
        os.killpg(self.server.process.pid, signal.SIGKILL)  # the whole group: mlflow and its uvicorn worker
        self.server.process.wait(timeout=30)

    def client(self) -> MlflowClient:
        return MlflowClient(self.url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-outage"))
    yield srv
    srv.server.stop()


@pytest.fixture
def small_client_budget(monkeypatch):
    for key, value in CLIENT_BUDGET.items():
        monkeypatch.setenv(key, value)


def _config(synth_root, out: Path, server: Server, *, max_steps: int, flush_timeout_s: float):
    from alignlab.config import validate_config

    tree = tiny_config_tree(synth_root, out, max_steps=max_steps, epochs=100)
    tree["tracking"] = {"enabled": True, "tracking_uri": server.url_with_credentials, "experiment": "outage",
                        "flush_timeout_s": flush_timeout_s}
    return validate_config(tree)


def _logged_pairs(run_dir: Path) -> set[tuple[str, int]]:
    """(metric, step) of every value the trainer handed to the tracker (log_every=1: every step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(key, r["step"]) for r in records for key in r if key != "step"}


def _delivered_pairs(client: MlflowClient, run_id: str, keys: set[str]) -> list[tuple[str, int]]:
    return [(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)]


def test_server_killed_mid_run_training_goes_on_and_every_metric_arrives(server, synth_root, tmp_path, capfd,
                                                                        monkeypatch, small_client_budget):
    from alignlab.experiment import run_experiment
    from alignlab.tracking import RunTracker

    run_dir = tmp_path / "run"
    cfg = _config(synth_root, tmp_path / "out", server, max_steps=80, flush_timeout_s=60)
    calls, original = [], RunTracker.log_metrics

    def timed(self, metrics, step):  # how long the training loop waits on tracking, per step
        tic = time.perf_counter()
        original(self, metrics, step)
        calls.append(time.perf_counter() - tic)

    monkeypatch.setattr(RunTracker, "log_metrics", timed)
    events = {}

    def kill_mid_run_then_restart():
        metrics = run_dir / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 5:
            time.sleep(0.02)
        server.kill()
        events["killed"], events["steps_at_kill"] = time.monotonic(), len(metrics.read_text().splitlines())
        time.sleep(OUTAGE_S)
        server.start()
        events["back"] = time.monotonic()

    chaos = threading.Thread(target=kill_mid_run_then_restart)
    chaos.start()
    tic = time.monotonic()
    run_experiment(cfg, run_dir)
    events["run_done"] = time.monotonic()
    chaos.join(timeout=120)

    outage = events["back"] - events["killed"]
    assert 5 <= events["steps_at_kill"] < 80, "the server must die while training runs"
    assert max(calls) < 0.5, f"a log_metrics call blocked {max(calls):.2f} s during a {outage:.1f} s outage"
    # The run ends as soon as the server is back (end waits at most flush_timeout_s = 60 s).
    assert events["run_done"] - tic < 60 + (events["back"] - tic)
    client = server.client()
    run_id = (run_dir / "mlflow_run_id.txt").read_text()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    logged = _logged_pairs(run_dir)
    delivered = _delivered_pairs(client, run_id, {key for key, _ in logged})
    assert len(delivered) == len(set(delivered)), "a replayed metric value was stored twice"
    assert set(delivered) == logged and len(logged) == 80 * len({k for k, _ in logged})  # 100 %
    assert run.data.metrics["final_loss"] == pytest.approx(json.loads((run_dir / "results.json").read_text())[
        "final_loss"])
    assert not list(run_dir.glob("tracking-spool*")), "the spool is emptied once delivered"
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "was unreachable for" in line]
    assert len(warnings) == 1, err  # one warning per outage, with its length
    reported = float(re.search(r"unreachable for ([\d.]+) s", warnings[0]).group(1))
    assert reported >= OUTAGE_S
    assert SECRET not in err and SECRET not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert run.data.params["tracking.tracking_uri"] == f"http://***@127.0.0.1:{server.port}"
    print(f"\noutage {outage:.1f} s (reported {reported:.1f} s), {len(delivered)}/{len(logged)} metric values "
          f"delivered, slowest log_metrics {max(calls) * 1000:.1f} ms")


def test_run_started_while_server_is_down_is_spooled_and_replayed(server, synth_root, tmp_path, capfd,
                                                                  small_client_budget):
    """Start, train and end with the server down (each wait bounded by flush_timeout_s = 1 s), then
    `alignlab tracking replay` creates the run and sends everything once the server is back."""
    from alignlab.cli import main
    from alignlab.experiment import run_experiment

    run_dir = tmp_path / "run"
    cfg = _config(synth_root, tmp_path / "out", server, max_steps=12, flush_timeout_s=1)
    server.kill()
    try:
        tic = time.monotonic()
        run_experiment(cfg, run_dir)
        elapsed = time.monotonic() - tic
    finally:
        server.start()
    err = capfd.readouterr().err
    assert (run_dir / "tracking-spool.jsonl").is_file() and (run_dir / "final.pt").is_file()
    assert (run_dir / "mlflow_run_id.txt").read_text().startswith("pending:")
    assert f"alignlab tracking replay {run_dir}" in err and SECRET not in err
    assert elapsed < 30, f"a run with the server down took {elapsed:.0f} s"

    assert main(["tracking", "replay", str(run_dir)]) == 2  # the stored URI lost its credentials...
    assert "--tracking-uri" in capfd.readouterr().err
    assert main(["tracking", "replay", str(run_dir), "--tracking-uri", server.url_with_credentials]) == 0
    out = capfd.readouterr()
    assert "delivered" in out.out and SECRET not in out.out + out.err
    run_id = (run_dir / "mlflow_run_id.txt").read_text()
    client = server.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "test"
    logged = _logged_pairs(run_dir)
    assert set(_delivered_pairs(client, run_id, {key for key, _ in logged})) == logged
    assert "final_loss" in run.data.metrics and run.data.params["train.max_steps"] == "12"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "checkpoint"}
    assert not list(run_dir.glob("tracking-spool*"))
    assert main(["tracking", "replay", str(run_dir)]) == 0  # nothing left: a no-op


def test_failed_run_ends_failed(server, synth_root, tmp_path):
    """An error after the run started (here: a batch larger than the data) ends the MLflow run FAILED."""
    from alignlab.config import ConfigError, validate_config
    from alignlab.experiment import run_experiment

    tree = tiny_config_tree(synth_root, tmp_path / "out", batch_size=1000)
    tree["tracking"] = {"enabled": True, "tracking_uri": server.url}
    with pytest.raises(ConfigError, match="train.batch_size=1000"):
        run_experiment(validate_config(tree), tmp_path / "run")
    run_id = (tmp_path / "run" / "mlflow_run_id.txt").read_text()
    assert server.client().get_run(run_id).info.status == "FAILED"


def test_sigterm_ends_the_run_killed_with_its_metrics(server, synth_root, tmp_path):
    """A real `alignlab train` process stopped with SIGTERM: one line on stderr, exit 130, run KILLED."""
    import yaml

    store = server.url
    tree = tiny_config_tree(synth_root, tmp_path / "out", max_steps=100000, epochs=1000)
    tree["tracking"] = {"enabled": True, "tracking_uri": store}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "alignlab.cli", "train", str(config), "--run-dir",
                                str(run_dir)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "alignlab: interrupted (stopped by SIGTERM)" and "Traceback" not in err
    client = MlflowClient(store)
    run = client.get_run((run_dir / "mlflow_run_id.txt").read_text())
    assert run.info.status == "KILLED"
    steps = len(metrics.read_text().splitlines())
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= steps - 1  # the step in flight may be cut


def test_next_tracker_in_a_run_folder_sends_what_an_earlier_one_left(tmp_path, capfd, small_client_budget):
    """A run that ended while its store was unreachable leaves a spool; the next tracker in the same run
    folder (`--resume`) delivers it first, creating the earlier run, and the folder keeps the newer run's id."""
    from alignlab.tracking import RunTracker

    unreachable = f"http://127.0.0.1:{free_port()}"
    first = RunTracker.start(unreachable, "resume", "first", {}, {"lr": 0.1}, spool_dir=tmp_path, flush_timeout_s=1)
    first.log_metrics({"loss": 1.0}, step=1)
    assert first.end("FINISHED") is False
    assert (tmp_path / "tracking-spool.jsonl").is_file()
    assert (tmp_path / "mlflow_run_id.txt").read_text() == first.run_id and first.run_id.startswith("pending:")

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    second = RunTracker.start(store, "resume", "second", {}, {}, spool_dir=tmp_path)
    second.log_metrics({"loss": 0.5}, step=1)
    assert second.end("FINISHED") is True
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("resume").experiment_id
    runs = {run.info.run_name: run for run in client.search_runs([experiment])}
    assert runs["first"].info.status == "FINISHED" and runs["first"].data.metrics == {"loss": 1.0}
    assert runs["first"].data.params == {"lr": "0.1"} and runs["second"].data.metrics == {"loss": 0.5}
    assert (tmp_path / "mlflow_run_id.txt").read_text() == second.run_id
    assert not list(tmp_path.glob("tracking-spool*"))
    assert "left in" in capfd.readouterr().err
