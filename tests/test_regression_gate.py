"""Nightly regression gate: logic on synthetic histories, a real sqlite MLflow store, Prometheus exports
(textfile parsed back, a push to a local HTTP server) and the KFP schedule against a recording fake client."""

import argparse
import json
import random
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from alignlab.report.cli import main_gate
from alignlab.report.prometheus import STATUS_CODES, gate_registry, push_gate, write_gate_textfile
from alignlab.report.regression_gate import (
    STATES,
    GateRule,
    combine_gates,
    evaluate_gate,
    gate_exit_code,
    history_from_mlflow,
    load_gate_config,
    run_gate_values,
    window_median,
    write_gate_report,
)
from alignlab.tracking import RunTracker, standard_tags
from alignlab_pipelines.schedule import DEFAULT_CRON, register, schedule_nightly, validate_kfp_cron

REPO = Path(__file__).resolve().parents[1]
ACC = GateRule(metric="acc", direction="higher", abs_tolerance=0.02, min_history=3)
STEP = GateRule(metric="step_time", direction="lower", rel_tolerance=0.15, min_history=3)


def _night(acc=None, step=None):
    return {k: v for k, v in (("acc", acc), ("step_time", step)) if v is not None}


def _state(result, metric):
    return next(m for m in result.metrics if m.metric == metric)


def test_repeated_violation_is_flagged_as_regression():
    history = [_night(0.50 + 0.005 * (i % 3), 1.0) for i in range(8)] + [_night(0.40, 1.0)]  # yesterday bad
    result = evaluate_gate(_night(0.41, 1.0), history, [ACC, STEP], window=7, repeat=2)
    acc = _state(result, "acc")
    # yesterday's baseline: median of nights 1..7; today's: median of nights 2..8 (includes yesterday's 0.40)
    assert acc.baseline == pytest.approx(statistics.median([h["acc"] for h in history[-7:]]))
    assert acc.state == "regression" and acc.streak == 2
    assert _state(result, "step_time").state == "ok"
    assert result.status == "regression" and gate_exit_code(result) == 1
    # repeat=3 needs a third bad night: the same data is then only a violation
    three = evaluate_gate(_night(0.41, 1.0), history, [ACC, STEP], window=7, repeat=3)
    assert _state(three, "acc").state == "violation" and three.status == "ok" and gate_exit_code(three) == 0


def test_single_bad_night_is_a_violation_not_a_regression():
    history = [_night(0.50, 1.0) for _ in range(7)]
    result = evaluate_gate(_night(0.30, 1.0), history, [ACC, STEP], repeat=2)
    assert _state(result, "acc").state == "violation" and _state(result, "acc").streak == 1
    assert result.status == "ok" and gate_exit_code(result) == 0
    # the night after a single bad night is back to normal: ok (the median ignored the outlier)
    after = evaluate_gate(_night(0.50, 1.0), history + [_night(0.30, 1.0)], [ACC, STEP], repeat=2)
    assert _state(after, "acc").state == "ok" and _state(after, "acc").baseline == 0.50


def test_noisy_series_within_tolerance_stays_ok_every_night():
    rng = random.Random(0)
    series = [_night(0.6 + rng.uniform(-0.009, 0.009), 2.0 * (1 + rng.uniform(-0.06, 0.06))) for _ in range(40)]
    for day in range(3, len(series)):
        result = evaluate_gate(series[day], series[:day], [ACC, STEP], window=7, repeat=2)
        assert {m.state for m in result.metrics} == {"ok"}, day
        assert result.status == "ok"


def test_insufficient_history_and_missing_metrics():
    result = evaluate_gate(_night(0.1, 9.0), [_night(0.5, 1.0), _night(0.5, 1.0)], [ACC, STEP])
    assert [m.state for m in result.metrics] == ["insufficient_history"] * 2
    assert result.status == "insufficient_history" and gate_exit_code(result) == 0
    assert _state(result, "acc").baseline is None and _state(result, "acc").history_count == 2
    # nights without the metric (or with NaN) do not count as history
    gappy = [_night(0.5, 1.0), _night(None, 1.0), {"acc": float("nan"), "step_time": 1.0}, _night(0.5, 1.0)]
    assert _state(evaluate_gate(_night(0.5, 1.0), gappy, [ACC, STEP]), "acc").state == "insufficient_history"
    # a metric absent today is reported as missing and counted
    history = [_night(0.5, 1.0)] * 5
    result = evaluate_gate(_night(None, 1.0), history, [ACC, STEP])
    assert _state(result, "acc").state == "missing" and result.counts["missing"] == 1
    assert result.counts["ok"] == 1 and sum(result.counts.values()) == 2 and set(result.counts) == set(STATES)
    assert result.status == "ok"
    with pytest.raises(ValueError, match=r"today\['acc'\] must be a number"):
        evaluate_gate({"acc": "high"}, history, [ACC])


def test_direction_handling():
    history = [_night(0.5, 1.0)] * 5
    slower = evaluate_gate(_night(0.5, 1.2), history, [ACC, STEP])   # +20 % step time: bad
    faster = evaluate_gate(_night(0.5, 0.5), history, [ACC, STEP])   # -50 % step time: good
    worse = evaluate_gate(_night(0.45, 1.0), history, [ACC, STEP])   # accuracy -0.05: bad
    better = evaluate_gate(_night(0.9, 1.0), history, [ACC, STEP])   # accuracy +0.4: good
    assert _state(slower, "step_time").state == "violation" and _state(faster, "step_time").state == "ok"
    assert _state(worse, "acc").state == "violation" and _state(better, "acc").state == "ok"
    assert _state(evaluate_gate(_night(0.5, 1.149), history, [STEP]), "step_time").state == "ok"
    assert _state(evaluate_gate(_night(0.481, 1.0), history, [ACC]), "acc").state == "ok"
    # NaN today (a diverged run) violates whichever direction is good
    assert _state(evaluate_gate({"acc": float("nan")}, history, [ACC]), "acc").state == "violation"


def test_tolerances_combine_as_the_larger_one():
    rule = GateRule(metric="loss", direction="lower", abs_tolerance=0.02, rel_tolerance=0.05)
    assert rule.allowed_deviation(1.0) == pytest.approx(0.05)   # relative is larger
    assert rule.allowed_deviation(0.1) == pytest.approx(0.02)   # absolute is larger
    assert rule.violates(1.051, 1.0) and not rule.violates(1.049, 1.0)
    for bad in ({"direction": "up"}, {"abs_tolerance": None}, {"abs_tolerance": -1.0}, {"min_history": 0}):
        with pytest.raises(ValueError):
            GateRule(**{"metric": "x", "direction": "higher", "abs_tolerance": 0.1, **bad})


def test_window_median_matches_brute_force():
    rng = random.Random(1)
    for _ in range(200):
        past = [rng.uniform(0, 1) for _ in range(rng.randint(1, 20))]
        window = rng.randint(1, 10)
        last = sorted(past[-window:])
        n = len(last)
        brute = last[n // 2] if n % 2 else (last[n // 2 - 1] + last[n // 2]) / 2
        assert window_median(past, window) == pytest.approx(brute)
    # the gate's baseline is that median, and values older than the window do not count
    history = [_night(0.0)] * 3 + [_night(v) for v in (0.50, 0.52, 0.49, 0.51)]
    result = evaluate_gate(_night(0.5), history, [ACC], window=4)
    assert _state(result, "acc").baseline == pytest.approx(0.505)
    assert _state(result, "acc").window_values == (0.50, 0.52, 0.49, 0.51)


def test_previous_flags_override_the_derived_ones():
    history = [_night(0.5)] * 6                                      # yesterday was fine by the numbers ...
    flagged = evaluate_gate(_night(0.3), history, [ACC], previous_flags=[{"acc": "violation"}])
    assert _state(flagged, "acc").state == "regression"              # ... but a recorded gate said otherwise
    not_flagged = evaluate_gate(_night(0.3), history, [ACC], previous_flags=[{"acc": "ok"}, {}])
    assert _state(not_flagged, "acc").state == "violation"


def test_shipped_rules_and_bad_rule_files(tmp_path):
    config = load_gate_config(REPO / "ablations" / "gates" / "nightly_gate.yaml")
    rules = {r.metric: r for r in config.rules}
    assert config.window == 7 and config.repeat == 2
    assert rules["retrieval/mean_R@1"].direction == "higher" and rules["retrieval/mean_R@1"].abs_tolerance
    assert rules["median_step_time"].direction == "lower" and rules["median_step_time"].rel_tolerance == 0.15
    assert rules["final_loss"].direction == "lower"
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {metric: acc, direction: sideways, abs_tolerance: 0.1}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: rules\[0\].*direction"):
        load_gate_config(bad)
    bad.write_text("window: 0\nrules:\n  - {metric: acc, direction: higher, abs_tolerance: 0.1}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: window: Input should be greater than or equal to 1"):
        load_gate_config(bad)
    with pytest.raises(FileNotFoundError):
        load_gate_config(tmp_path / "absent.yaml")


def _nightly_run(uri, arm, acc, step_times, status="FINISHED", ablation="nightly"):
    tracker = RunTracker.start(uri, "nightly", run_name=arm, tags=standard_tags(ablation, arm, 0, "h"), params={})
    for step, value in enumerate(step_times, 1):
        tracker.log_metrics({"step_time": value}, step=step)
    tracker.log_summary({"retrieval/mean_R@1": acc, "final_loss": 1.0})
    tracker.end(status)
    time.sleep(0.005)  # distinct start times, so the order is by start time alone
    return tracker.run_id


@pytest.fixture(scope="module")
def nightly_store(tmp_path_factory):
    """Five clip nightlies (the last one bad), noise runs that the gate must ignore, and today's bad run."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('gate_store') / 'mlflow.db'}"
    ids = {"history": []}
    for acc in (0.50, 0.51, 0.49, 0.50, 0.40):
        ids["history"].append(_nightly_run(uri, "clip", acc, [1.0, 5.0, 1.1]))
    _nightly_run(uri, "clip", 0.10, [1.0], status="FAILED")
    _nightly_run(uri, "psd", 0.90, [1.0])
    _nightly_run(uri, "clip", 0.95, [1.0], ablation="other")
    ids["today"] = _nightly_run(uri, "clip", 0.40, [1.0, 1.05, 9.0])
    _nightly_run(uri, "clip", 0.99, [1.0])  # started after today's run: never part of its baseline
    return uri, ids


def test_history_from_mlflow_order_filters_and_gate(nightly_store):
    uri, ids = nightly_store
    history = history_from_mlflow(uri, "nightly", {"alignlab.ablation": "nightly"}, arm="clip")
    assert [h["retrieval/mean_R@1"] for h in history] == [0.50, 0.51, 0.49, 0.50, 0.40, 0.40, 0.99]
    assert history[0]["median_step_time"] == pytest.approx(1.1) and history[0]["final_loss"] == 1.0
    record, today = run_gate_values(uri, ids["today"])
    before = history_from_mlflow(uri, "nightly", {"alignlab.ablation": "nightly"}, arm="clip",
                                 started_before=record["start_time"])
    assert [h["retrieval/mean_R@1"] for h in before] == [0.50, 0.51, 0.49, 0.50, 0.40]
    assert today["median_step_time"] == pytest.approx(1.05)
    rules = [GateRule(metric="retrieval/mean_R@1", direction="higher", abs_tolerance=0.02),
             GateRule(metric="median_step_time", direction="lower", rel_tolerance=0.15)]
    result = evaluate_gate(today, before, rules, window=7, repeat=2, arm="clip")
    assert _state(result, "retrieval/mean_R@1").state == "regression"
    assert _state(result, "retrieval/mean_R@1").baseline == pytest.approx(0.50)
    assert _state(result, "median_step_time").state == "ok"


def test_gate_cli_end_to_end(nightly_store, tmp_path):
    uri, ids = nightly_store
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {metric: retrieval/mean_R@1, direction: higher, abs_tolerance: 0.02}\n"
                     "  - {metric: zeroshot/shape/top1, direction: higher, abs_tolerance: 0.02}\n")
    out, prom = tmp_path / "gate", tmp_path / "textfile" / "gate.prom"
    argv = ["--tracking-uri", uri, "--experiment", "nightly", "--rules", str(rules), "--today-run", ids["today"],
            "--out", str(out), "--textfile", str(prom)]
    assert main_gate(argv) == 1
    report = json.loads((out / "gate.json").read_text())
    assert report["status"] == "regression" and report["counts"]["missing"] == 1
    assert {m["metric"]: m["state"] for m in report["metrics"]} == {"retrieval/mean_R@1": "regression",
                                                                   "zeroshot/shape/top1": "missing"}
    assert "REGRESSION" in (out / "gate.md").read_text() and prom.is_file()
    # yesterday's run judged the same way: its own yesterday was fine, so it was only a violation
    assert main_gate(argv[:7] + [ids["history"][-1], "--out", str(tmp_path / "y")]) == 0
    assert main_gate(argv[:7] + ["no-such-run", "--out", str(tmp_path / "z")]) == 2


def _sample(families, name, **labels):
    for family in families:
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _two_arm_result():
    history = [_night(0.5, 1.0)] * 4 + [_night(0.3, 1.0)]
    clip = evaluate_gate(_night(0.3, 1.0), history, [ACC, STEP], arm="clip")
    psd = evaluate_gate(_night(None, 1.0), history, [ACC, STEP], arm="psd")
    with pytest.raises(ValueError, match="one run per arm"):
        combine_gates([clip, clip])
    return combine_gates([clip, psd])


def test_prometheus_textfile_parses_back(tmp_path):
    result = _two_arm_result()
    path = write_gate_textfile(result, tmp_path / "gate.prom", suite="nightly")
    families = list(text_string_to_metric_families(path.read_text()))
    assert _sample(families, "alignlab_gate_status", suite="nightly") == STATUS_CODES["regression"] == 1
    assert _sample(families, "alignlab_gate_last_run_timestamp_seconds") == pytest.approx(result.evaluated_at)
    assert _sample(families, "alignlab_gate_metric_value", arm="clip", metric="acc") == pytest.approx(0.3)
    assert _sample(families, "alignlab_gate_metric_baseline", arm="clip", metric="acc") == pytest.approx(0.5)
    states = {s: _sample(families, "alignlab_gate_metric_state", arm="clip", metric="acc", state=s) for s in STATES}
    assert states == {s: (1.0 if s == "regression" else 0.0) for s in STATES}
    assert _sample(families, "alignlab_gate_metric_state", arm="psd", metric="acc", state="missing") == 1.0
    assert _sample(families, "alignlab_gate_metric_value", arm="psd", metric="acc") is None
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temp file left behind
    with pytest.raises(ValueError, match=r"\.prom"):
        write_gate_textfile(result, tmp_path / "gate.txt", suite="nightly")
    # a fresh registry per export: two suites never share gauges
    assert gate_registry(result, "a") is not gate_registry(result, "a")


def test_push_to_local_gateway():
    requests = []

    class Recorder(BaseHTTPRequestHandler):
        def _record(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            requests.append((self.command, self.path, body.decode()))
            self.send_response(200)
            self.end_headers()

        do_PUT = do_POST = _record

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = HTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        push_gate(_two_arm_result(), f"http://127.0.0.1:{server.server_port}", job="alignlab_gate", suite="nightly")
    finally:
        server.shutdown()
        server.server_close()
    (method, path, body), = requests
    assert method in ("PUT", "POST") and path == "/metrics/job/alignlab_gate/suite/nightly"
    families = list(text_string_to_metric_families(body))
    assert _sample(families, "alignlab_gate_status", suite="nightly") == 1.0
    assert _sample(families, "alignlab_gate_metric_state", arm="clip", metric="acc", state="regression") == 1.0


def test_gate_report_files(tmp_path):
    paths = write_gate_report(_two_arm_result(), tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["counts"]["regression"] == 1 and data["counts"]["missing"] == 1
    assert "| clip | acc | **regression** |" in paths["md"].read_text()


class FakeKfpClient:
    """Records the calls `schedule_nightly` makes (there is no KFP server here)."""

    def __init__(self, host=None):
        self.host, self.calls = host, []

    def create_experiment(self, name, description=None, namespace=None):
        self.calls.append(("create_experiment", {"name": name}))
        return argparse.Namespace(experiment_id=f"exp-{name}")

    def create_recurring_run(self, **kwargs):
        self.calls.append(("create_recurring_run", kwargs))
        return argparse.Namespace(recurring_run_id="rr-1")


def test_kfp_cron_validation():
    assert validate_kfp_cron(DEFAULT_CRON) == "0 0 2 * * *"
    assert validate_kfp_cron(" 0  30 1 ? * MON-FRI ") == "0 30 1 ? * MON-FRI"
    assert validate_kfp_cron("*/30 0,30 */2 1-15 jan-jun 0") == "*/30 0,30 */2 1-15 jan-jun 0"
    with pytest.raises(ValueError, match=r"(?s)5 fields.*Unix cron.*SECONDS first.*'0 0 2 \* \* \*'"):
        validate_kfp_cron("0 2 * * *")
    for bad, message in (("0 0 0 2 * * *", "has 7 fields"), ("0 0 25 * * *", "hour value '25'"),
                         ("0 60 2 * * *", "minute value '60'"), ("0 0 2 * * 7", "day-of-week value '7'"),
                         ("? 0 2 * * *", "second field"), ("0 0 */0 * * *", "step"), ("0 0 2 * foo *", "month")):
        with pytest.raises(ValueError, match=message):
            validate_kfp_cron(bad)


def test_schedule_nightly_with_fake_client(tmp_path, monkeypatch):
    package = tmp_path / "nightly.yaml"
    package.write_text("pipelineInfo: {name: nightly}\n")
    client = FakeKfpClient()
    run = schedule_nightly(None, package, experiment="nightly", client=client)
    assert run.recurring_run_id == "rr-1"
    (_, experiment), (_, kwargs) = client.calls
    assert experiment == {"name": "nightly"}
    assert kwargs["experiment_id"] == "exp-nightly" and kwargs["cron_expression"] == "0 0 2 * * *"
    assert len(kwargs["cron_expression"].split()) == 6
    assert kwargs["enable_caching"] is False and kwargs["max_concurrency"] == 1
    assert kwargs["pipeline_package_path"] == str(package) and kwargs["job_name"] == "alignlab-nightly"
    with pytest.raises(ValueError, match="Unix cron"):
        schedule_nightly(None, package, cron="0 2 * * *", client=FakeKfpClient())
    with pytest.raises(FileNotFoundError, match="compile"):
        schedule_nightly(None, tmp_path / "absent.yaml", client=FakeKfpClient())

    # the CLI path: `alignlab schedule nightly` builds kfp.Client(host=...) (replaced by the fake here)
    import kfp

    made = []
    monkeypatch.setattr(kfp, "Client", lambda host=None: made.append(FakeKfpClient(host)) or made[-1])
    parser = argparse.ArgumentParser(prog="alignlab")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["schedule", "nightly", "--host", "http://kfp:8080", "--package", str(package),
                              "--cron", "0 15 3 * * *", "--experiment", "bench"])
    assert args.func(args) == 0
    assert made[0].host == "http://kfp:8080"
    assert made[0].calls[1][1]["cron_expression"] == "0 15 3 * * *" and made[0].calls[0][1] == {"name": "bench"}
    with pytest.raises(SystemExit):
        parser.parse_args(["schedule", "nightly", "--host", "h", "--cron", "0 2 * * *"])
