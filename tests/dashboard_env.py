"""Helpers of the dashboard tests: a small real ablation logged into a real MLflow server, hand-made runs
with known values (for the statistics checks), and the dashboard served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignlab_components.mlflow_server import start_mlflow_server
from conftest import tiny_config_tree

SPEC_NAME = "dash-mini"
# Hand-made seed values: arm "paired" has the baseline's seeds (paired t), arm "welch" other seeds (Welch's t);
# seed 3 of "welch" FAILED (shown as missing, never silently dropped).
HANDMADE = {
    "base": {0: {"acc": 0.50, "err": 0.30}, 1: {"acc": 0.52, "err": 0.28}, 2: {"acc": 0.49, "err": 0.33}},
    "paired": {0: {"acc": 0.55, "err": 0.25}, 1: {"acc": 0.58, "err": 0.27}, 2: {"acc": 0.53, "err": 0.26}},
    "welch": {5: {"acc": 0.61, "err": 0.20}, 6: {"acc": 0.57, "err": 0.24}, 7: {"acc": 0.66, "err": 0.22}},
}


def write_spec(folder: Path, data_root: Path, tracking_uri: str) -> Path:
    """A 2-arm x 3-seed spec (baseline lr 1e-3 vs lr 5e-3), 3 steps a run, evaluation off."""
    base = tiny_config_tree(data_root, folder / "runs", max_steps=3)
    base["tracking"] = {"enabled": True, "tracking_uri": tracking_uri, "experiment": SPEC_NAME}
    spec = {"name": SPEC_NAME, "description": "dashboard test ablation", "base": base,
            "arms": {"lr-low": {"train.lr": 1e-3}, "lr-high": {"train.lr": 5e-3}}, "seeds": [0, 1, 2],
            "baseline": "lr-low", "report_metrics": ["final_loss", "best_loss"]}
    specs = folder / "ablations"
    specs.mkdir(parents=True, exist_ok=True)
    path = specs / f"{SPEC_NAME}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_gate(runs_dir: Path) -> None:
    """A gate verdict as `alignlab run` writes it: final_loss of lr-low regressed (band 4.0 +- 0.05),
    train_seconds ok."""
    from alignlab.report.regression_gate import GateRule, evaluate_gate, write_gate_report

    rules = [GateRule(metric="final_loss", direction="lower", abs_tolerance=0.05, min_history=2),
             GateRule(metric="train_seconds", direction="lower", rel_tolerance=1.0, min_history=2)]
    history = [{"final_loss": 4.0, "train_seconds": 1.0}, {"final_loss": 4.0, "train_seconds": 1.0},
               {"final_loss": 4.5, "train_seconds": 1.0}]
    result = evaluate_gate({"final_loss": 4.6, "train_seconds": 1.1}, history, rules, window=3, repeat=2, arm="lr-low")
    write_gate_report(result, runs_dir / SPEC_NAME / "gate")


def log_handmade(tracking_uri: str) -> None:
    """Runs of ablation "handmade" with the values of HANDMADE, plus one FAILED run (welch seed 3)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("handmade")
    runs = [(arm, seed, values, "FINISHED") for arm, seeds in HANDMADE.items() for seed, values in seeds.items()]
    for arm, seed, values, status in runs + [("welch", 3, {"acc": 0.1, "err": 0.9}, "FAILED")]:
        run = client.create_run(experiment, run_name=f"{arm}/seed-{seed}",
                                tags={"alignlab.ablation": "handmade", "alignlab.arm": arm, "alignlab.seed": str(seed)})
        for step, scale in enumerate((0.5, 0.8, 1.0)):  # a history whose last value is the hand-made one
            for name, value in values.items():
                client.log_metric(run.info.run_id, name, value * scale, step=step)
        client.set_terminated(run.info.run_id, status)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(app, log_path: Path):
    """The app on uvicorn in a thread on a free 127.0.0.1 port, its access and error logs in `log_path`."""
    import uvicorn

    handler = logging.FileHandler(log_path)
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "alignlab")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=True))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


@dataclass
class World:
    """A real MLflow server with the small ablation (seeds 0-1 of 3 run, `alignlab report` rebuilt) and the
    hand-made runs, a tokens file of one viewer, one submitter and one admin, and the dashboard app."""

    folder: Path
    uri: str
    spec: Path
    tokens: dict
    app: object
    client: object = field(default=None)

    def headers(self, who: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


@contextlib.contextmanager
def dashboard_world(data_root: Path, folder: Path):
    from alignlab.cli import main
    from alignlab.ablation_runner import run_ablation
    from alignlab_dashboard import DashboardSettings, create_app
    from alignlab_dashboard.auth import add_token

    server = start_mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts"), folder / "mlflow.log")
    try:
        spec = write_spec(folder, data_root, server.url)
        run_ablation(spec, ["seeds=[0,1]"], print_fn=lambda *_: None)  # seed 2 stays planned but missing
        assert main(["report", str(spec)]) == 0
        log_handmade(server.url)
        tokens = {who: add_token(folder / "tokens.yaml", who, role)
                  for who, role in (("vera", "viewer"), ("sam", "submitter"), ("ada", "admin"))}
        settings = DashboardSettings(tracking_uri=server.url, specs_dir=folder / "ablations",
                                     runs_dir=folder / "runs", jobs_dir=folder / "jobs",
                                     tokens_file=folder / "tokens.yaml")
        yield World(folder, server.url, spec, tokens, create_app(settings, workdir=folder))
    finally:
        server.stop()
