"""Prometheus from training and the dashboard, end to end: real `prometheus` and `prometheus-node-exporter`
(Debian) on 127.0.0.1 scrape a finished training run's textfile, a running training subprocess's port and a
running `alignlab dashboard`; the chart's PrometheusRule passes `promtool check rules` and its alerts fire
(and stay quiet) in `promtool test rules`.
"""

import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
import yaml
from helm_chart import render_objects
from prometheus_server import free_port, running, start_node_exporter, start_prometheus, wait_for_series

from alignlab.config import validate_config
from alignlab.training.prometheus_exporter import TrainingExporter, training_exporter
from alignlab.training.trainer import train
from conftest import tiny_config_tree

SERIES = ["alignlab_train_step", "alignlab_train_step_seconds", "alignlab_train_samples_per_second",
          "alignlab_train_loss", "alignlab_train_logit_scale", "alignlab_train_learning_rate",
          "alignlab_train_data_wait_seconds", "alignlab_train_last_step_timestamp_seconds", "alignlab_train_running"]


def sane(name: str, value: float, running: float) -> bool:
    checks = {"alignlab_train_step": value >= 1, "alignlab_train_step_seconds": 0 < value < 60,
              "alignlab_train_samples_per_second": value > 0, "alignlab_train_loss": 0 < value < 20,
              "alignlab_train_logit_scale": 1 <= value <= 100, "alignlab_train_learning_rate": 0 <= value <= 1e-2,  # cosine: 0 after the last step
              "alignlab_train_data_wait_seconds": 0 <= value < 60,
              "alignlab_train_last_step_timestamp_seconds": abs(time.time() - value) < 600,
              "alignlab_train_running": value == running}
    return math.isfinite(value) and checks[name]


@pytest.fixture
def config_tree(synth_root, tmp_path):
    def make(**prometheus):
        tree = tiny_config_tree(synth_root, tmp_path / "runs", max_steps=6)
        tree["tracking"]["prometheus"] = {"every_s": 0.1, **prometheus}
        return tree
    return make


def test_prometheus_scrapes_a_finished_and_a_running_training_job(config_tree, tmp_path):
    textfiles = tmp_path / "textfiles"
    train(validate_config(config_tree(textfile=str(textfiles / "train.prom"))), tmp_path / "finished")
    port = free_port()
    tree = config_tree(port=port, host="127.0.0.1")
    tree["train"] |= {"max_steps": 100000, "epochs": 10000}
    (tmp_path / "running.yaml").write_text(yaml.safe_dump(tree))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "running.log", "wb") as log:
        job = subprocess.Popen([sys.executable, "-m", "alignlab.cli", "train", str(tmp_path / "running.yaml"),
                                "--run-dir", str(tmp_path / "running")], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        with start_node_exporter(tmp_path, textfiles) as node, \
                start_prometheus(tmp_path, {"finished": node, "running": f"127.0.0.1:{port}"}) as prom:
            # the running job's exporter serves step 0 until its first step ends: wait for that step first
            wait_for_series(prom, 'alignlab_train_step{job="running"} >= 1', want=1)
            series = {name: wait_for_series(prom, name, want=2) for name in SERIES}
            assert job.poll() is None, (tmp_path / "running.log").read_text()[-2000:]
    finally:
        job.terminate()
        job.wait(timeout=30)
    for name, result in series.items():
        by_job = {r["metric"]["job"]: float(r["value"][1]) for r in result}
        assert set(by_job) == {"finished", "running"}, (name, result)
        assert all(r["metric"]["run"] == "test/seed-3" for r in result)
        for job_name, value in by_job.items():
            assert sane(name, value, running=1.0 if job_name == "running" else 0.0), (name, job_name, value)
    finished = {r["metric"]["job"]: float(r["value"][1]) for r in series["alignlab_train_step"]}["finished"]
    assert finished == 6


def test_prometheus_scrapes_the_dashboard(tmp_path):
    """`alignlab dashboard` on the embedded default serves /metrics: Prometheus finds its request-latency
    histogram's count per route and status (the counter the chart's Dashboard5xx alert reads)."""
    port = free_port()
    args = [sys.executable, "-m", "alignlab.cli", "dashboard", "--port", str(port), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", "--specs", str(tmp_path), "--runs", str(tmp_path / "runs")]
    base = f"http://127.0.0.1:{port}"
    with running(args, f"{base}/healthz", tmp_path / "dashboard.log"):
        for path in ("/api/ablations", "/api/ablations", "/healthz", "/api/no-such-route"):
            try:
                urllib.request.urlopen(base + path, timeout=10).read()
            except urllib.error.HTTPError as error:
                assert error.code == 404
        with start_prometheus(tmp_path, {"dashboard": f"127.0.0.1:{port}"}) as prom:
            requests = wait_for_series(prom, 'alignlab_dashboard_request_seconds_count{job="dashboard"}', want=2)
    counts = {(r["metric"]["route"], r["metric"]["status"]): float(r["value"][1]) for r in requests}
    assert counts[("/api/ablations", "200")] >= 2, counts
    assert any(status == "404" for _, status in counts), counts


def test_port_exporter_serves_and_closes(config_tree):
    cfg = validate_config(config_tree(port=0, host="127.0.0.1"))
    exporter = training_exporter(cfg.tracking.prometheus, "r/seed-0", 64, torch.device("cpu"), is_main=True)
    exporter.observe({"step": 3, "step_time": 0.5, "loss": 2.5, "logit_scale": 14.3, "lr": 1e-3}, data_wait_s=0.25)
    url = f"http://127.0.0.1:{exporter.server.server_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'alignlab_train_samples_per_second{run="r/seed-0"} 128.0' in text
    assert 'alignlab_train_data_wait_seconds{run="r/seed-0"} 0.25' in text
    assert "gpu_memory" not in text  # CPU run
    exporter.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
    assert training_exporter(cfg.tracking.prometheus, "r", 64, torch.device("cpu"), is_main=False) is None


def test_unreachable_pushgateway_warns_once_and_training_goes_on(config_tree, tmp_path):
    cfg = validate_config(config_tree(pushgateway=f"http://127.0.0.1:{free_port()}"))
    with pytest.warns(RuntimeWarning, match="pushgateway export failed") as caught:
        result = train(cfg, tmp_path / "run")
    assert result.steps == 6
    assert len([w for w in caught if "pushgateway" in str(w.message)]) == 1


def test_bad_prometheus_settings_name_the_field(config_tree):
    from alignlab.config import ConfigError

    with pytest.raises(ConfigError, match="textfile"):
        validate_config(config_tree(textfile="metrics.txt"))
    assert isinstance(TrainingExporter, type)


def rules_file(tmp_path) -> str:
    rule = next(o for o in render_objects({}) if o["kind"] == "PrometheusRule")
    path = tmp_path / "alignlab-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return str(path)


def test_promtool_checks_the_chart_rules(tmp_path):
    result = subprocess.run(["promtool", "check", "rules", rules_file(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_chart_alerts_fire_on_what_alignlab_exports(tmp_path):
    """promtool's rule unit tests: each alert fires on the series alignlab writes and not on healthy ones."""
    dashboard = 'alignlab_dashboard_request_seconds_count{job="al-alignlab-dashboard",status="%s"}'
    tests = {"rule_files": [rules_file(tmp_path)], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": [
            {"series": 'alignlab_gate_status{suite="nightly"}', "values": "0 0 1 1"},
            {"series": 'alignlab_gate_last_run_timestamp_seconds{suite="nightly"}', "values": "0x200"},
            {"series": dashboard % "200", "values": "0+100x30"},
            {"series": dashboard % "500", "values": "0+0x10 0+20x20"},
            {"series": 'alignlab_train_last_step_timestamp_seconds{run="a/seed-0"}', "values": "0+60x5 300x30"},
            {"series": 'alignlab_train_running{run="a/seed-0"}', "values": "1x35"},
            {"series": 'alignlab_train_last_step_timestamp_seconds{run="b/seed-0"}', "values": "0+60x5 300x30"},
            {"series": 'alignlab_train_running{run="b/seed-0"}', "values": "1x5 0x30"}],
         "alert_rule_test": [
            {"eval_time": "1m", "alertname": "AlignlabNightlyGateFailed", "exp_alerts": []},
            {"eval_time": "3m", "alertname": "AlignlabNightlyGateFailed",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "suite": "nightly"}, "exp_annotations": {
                 "summary": "The nightly regression gate found a regression",
                 "description": "Suite nightly: see runs/nightly/gate/gate.md of the last nightly run."}}]},
            {"eval_time": "2h", "alertname": "AlignlabNightlyMissing", "exp_alerts": []},
            {"eval_time": "9m", "alertname": "AlignlabDashboard5xx", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "AlignlabDashboard5xx",
             "exp_alerts": [{"exp_labels": {"severity": "critical"}, "exp_annotations": {
                 "summary": "Dashboard answers more than 5 % of requests with 5xx",
                 "description": "Share of 5xx over 5 minutes: 16.67%."}}]},
            {"eval_time": "10m", "alertname": "AlignlabTrainingStalled", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "AlignlabTrainingStalled",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "run": "a/seed-0"}, "exp_annotations": {
                 "summary": "Training run a/seed-0 made no step for 900 s",
                 "description": "The job still reports running: a hung data loader, a dead rank or a stuck "
                                "collective."}}]}]},
        {"interval": "1h", "input_series": [
            {"series": 'alignlab_gate_last_run_timestamp_seconds{suite="nightly"}', "values": "0x40"}],
         "alert_rule_test": [
            {"eval_time": "30h", "alertname": "AlignlabNightlyMissing", "exp_alerts": []},
            {"eval_time": "38h", "alertname": "AlignlabNightlyMissing",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "suite": "nightly"}, "exp_annotations": {
                 "summary": "No nightly gate result for 36 h",
                 "description": "The nightly pipeline did not run or did not reach its gate step (check the KFP "
                                "recurring run)."}}]}]}]}
    path = tmp_path / "alerts.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
