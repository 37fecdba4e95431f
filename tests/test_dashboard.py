"""The dashboard's API against a real MLflow server on 127.0.0.1 holding a small real ablation (tiny preset,
3 steps a run, seeds 0-1 of a 3-seed spec) and hand-made runs with known values: the compare table equals
`alignlab report`'s, the tests and Holm's correction equal scipy's, auth answers 401 / 403 / CSRF, paths
outside their roots are 404, /metrics counts, specs validate with field paths, jobs run and cancel."""

from __future__ import annotations

import csv
import io
import json
import time

import numpy as np
import pytest
import yaml
from dashboard_env import HANDMADE, SPEC_NAME, World, dashboard_world, write_gate
from fastapi.testclient import TestClient
from scipy import stats

COMPARED = ("mean", "std", "n", "seeds", "missing_seeds", "mean_ci_low", "mean_ci_high", "delta", "ci_low",
            "ci_high", "test", "paired", "p", "p_holm", "p_perm", "p_welch", "effect_size", "significant")


@pytest.fixture(scope="module")
def env(synth_root, tmp_path_factory):
    with dashboard_world(synth_root, tmp_path_factory.mktemp("dashboard")) as world:
        with TestClient(world.app) as client:
            world.client = client
            yield world


def _get(env: World, path: str, who: str = "vera", **params):
    response = env.client.get(path, headers=env.headers(who), params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_compare_table_equals_alignlab_report(env):
    report = json.loads((env.folder / "runs" / SPEC_NAME / "report.json").read_text())
    view = _get(env, f"/api/ablations/{SPEC_NAME}/compare")
    assert view["metrics"] == ["final_loss", "best_loss"] and view["baseline"] == "lr-low"
    assert view["holm"]["family_size"] == report["holm"]["family_size"] == 2
    expected = {(c["arm"], c["metric"]): c for c in report["cells"] if c["metric"] in view["metrics"]}
    assert len(view["cells"]) == len(expected) == 4
    for cell in view["cells"]:
        want = expected[(cell["arm"], cell["metric"])]
        for key in COMPARED:
            assert cell[key] == (pytest.approx(want[key], rel=1e-12, nan_ok=True)
                                 if isinstance(want[key], float) else want[key]), (cell["arm"], cell["metric"], key)
    # seed 2 was planned and never run: n is 2 of 3, the seed listed, never silently dropped
    assert all(c["n"] == 2 and c["missing_seeds"] == [2] for c in view["cells"])
    assert {(r["arm"], r["seed"]) for r in view["missing_runs"]} == {("lr-low", 2), ("lr-high", 2)}
    # the Markdown export's table is `alignlab report`'s headline table
    exported = env.client.get(f"/api/ablations/{SPEC_NAME}/export.md", headers=env.headers("vera")).text
    report_md = (env.folder / "runs" / SPEC_NAME / "report.md").read_text()
    assert [l for l in exported.splitlines() if l.startswith("|")] == \
        [l for l in report_md.split("## Details")[0].splitlines() if l.startswith("|")]


def test_summary_choice_reads_the_history(env):
    from mlflow.tracking import MlflowClient

    report = {(c["arm"], c["metric"]): c for c in
              json.loads((env.folder / "runs" / SPEC_NAME / "report.json").read_text())["cells"]}
    best = _get(env, f"/api/ablations/{SPEC_NAME}/compare", metrics="loss", summary="best")
    final = _get(env, f"/api/ablations/{SPEC_NAME}/compare", metrics="loss", summary="final")
    first = _get(env, f"/api/ablations/{SPEC_NAME}/compare", metrics="loss", summary="step", at=1)
    samples = _get(env, f"/api/ablations/{SPEC_NAME}/compare", metrics="loss", summary="samples", at=32 * 1)
    client = MlflowClient(env.uri)
    for arm in ("lr-low", "lr-high"):
        pick = lambda view: next(c for c in view["cells"] if c["arm"] == arm)  # noqa: E731
        assert pick(best)["mean"] == pytest.approx(report[(arm, "best_loss")]["mean"], rel=1e-12)
        assert pick(final)["mean"] == pytest.approx(report[(arm, "final_loss")]["mean"], rel=1e-12)
        at_one = [next(m.value for m in client.get_metric_history(run_id, "loss") if m.step == 1)
                  for key, run_id in first["run_ids"].items() if key.startswith(f"{arm}|")]
        assert pick(first)["mean"] == pytest.approx(np.mean(at_one), rel=1e-12)
        assert pick(samples)["mean"] == pick(first)["mean"]  # batch 32: 32 samples seen = step 1
        assert pick(best)["mean"] != pick(first)["mean"]
    bad = env.client.get(f"/api/ablations/{SPEC_NAME}/compare", headers=env.headers("vera"),
                         params={"summary": "step"})
    assert bad.status_code == 422 and "needs `at`" in bad.json()["detail"]
    unknown = env.client.get(f"/api/ablations/{SPEC_NAME}/compare", headers=env.headers("vera"),
                             params={"metrics": "nope"})
    assert unknown.status_code == 422 and "nope" in unknown.json()["detail"]


def _holm(pvalues: list[float]) -> list[float]:
    """Holm (1979) written out: the k-th smallest p times (m - k + 1), running maximum, capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def test_tests_and_holm_equal_scipy_on_handmade_values(env):
    view = _get(env, "/api/ablations/handmade/compare", metrics="acc,err", baseline="base")
    cells = {(c["arm"], c["metric"]): c for c in view["cells"]}
    values = lambda arm, metric: [HANDMADE[arm][s][metric] for s in sorted(HANDMADE[arm])]  # noqa: E731
    expected_p = {}
    for metric in ("acc", "err"):
        paired, welch = cells[("paired", metric)], cells[("welch", metric)]
        assert paired["test"] == "paired t" and welch["test"] == "welch t"
        expected_p[("paired", metric)] = stats.ttest_rel(values("paired", metric), values("base", metric)).pvalue
        expected_p[("welch", metric)] = stats.ttest_ind(values("welch", metric), values("base", metric),
                                                        equal_var=False).pvalue
        differences = np.subtract(values("paired", metric), values("base", metric))
        assert paired["effect_size"] == pytest.approx(differences.mean() / differences.std(ddof=1), rel=1e-9)
        assert paired["delta"] == pytest.approx(differences.mean(), rel=1e-12)
        low, high = stats.t.interval(0.95, 2, loc=np.mean(values("base", metric)),
                                     scale=stats.sem(values("base", metric)))
        base = cells[("base", metric)]
        assert (base["mean_ci_low"], base["mean_ci_high"]) == (pytest.approx(low), pytest.approx(high))
        # the FAILED run of seed 3 is shown as missing and listed, not silently dropped
        assert welch["n"] == 3 and welch["missing_seeds"] == [3]
    keys = list(expected_p)
    for key, p, p_holm in zip(keys, [expected_p[k] for k in keys], _holm([expected_p[k] for k in keys])):
        assert cells[key]["p"] == pytest.approx(p, rel=1e-9)
        assert cells[key]["p_holm"] == pytest.approx(p_holm, rel=1e-9)
    assert [(r["arm"], r["seed"], r["reason"]) for r in view["skipped_runs"]] == [("welch", 3, "FAILED")]
    # Holm covers what is on screen: one metric alone is a family of two
    one = _get(env, "/api/ablations/handmade/compare", metrics="acc", baseline="base")
    assert one["holm"]["family_size"] == 2
    one_cell = next(c for c in one["cells"] if c["arm"] == "paired")
    assert one_cell["p_holm"] == pytest.approx(_holm([expected_p[("paired", "acc")],
                                                      expected_p[("welch", "acc")]])[0], rel=1e-9)


def test_curves_mean_and_band_across_seeds(env):
    from mlflow.tracking import MlflowClient

    curve = _get(env, f"/api/ablations/{SPEC_NAME}/curves", metric="loss", seeds="true")
    client = MlflowClient(env.uri)
    view = _get(env, f"/api/ablations/{SPEC_NAME}/compare")
    for arm in curve["arms"]:
        runs = [run_id for key, run_id in view["run_ids"].items() if key.startswith(f"{arm['arm']}|")]
        by_step = [{m.step: m.value for m in client.get_metric_history(r, "loss")} for r in runs]
        for i, x in enumerate(curve["x"]):
            seeds = [h[int(x)] for h in by_step]
            assert arm["mean"][i] == pytest.approx(np.mean(seeds), rel=1e-12)
            low, high = stats.t.interval(0.95, len(seeds) - 1, loc=np.mean(seeds), scale=stats.sem(seeds))
            assert (arm["ci_low"][i], arm["ci_high"][i]) == (pytest.approx(low), pytest.approx(high))
        assert len(arm["seeds"]) == 2 and arm["resumes"] == []
    samples = _get(env, f"/api/ablations/{SPEC_NAME}/curves", metric="loss", x="samples")
    assert samples["x"] == [x * 32 for x in curve["x"]]


def test_config_diff_protocols_and_exports(env):
    view = _get(env, f"/api/ablations/{SPEC_NAME}/compare")
    assert view["config_diff"]["keys"] == ["train.lr"]
    assert view["config_diff"]["arms"] == {"lr-low": {"train.lr": "0.001"}, "lr-high": {"train.lr": "0.005"}}
    assert view["protocols"]["mismatch"] == []
    rows = list(csv.DictReader(io.StringIO(env.client.get(f"/api/ablations/{SPEC_NAME}/export.csv",
                                                          headers=env.headers("vera")).text)))
    report_rows = [row for row in csv.DictReader((env.folder / "runs" / SPEC_NAME / "report.csv").open())
                   if row["metric"] in ("final_loss", "best_loss")]
    assert len(rows) == len(report_rows) == 4
    fields = ("arm", "metric", "mean", "std", "n", "p", "p_holm")
    assert sorted(tuple(row[k] for k in fields) for row in rows) == \
        sorted(tuple(row[k] for k in fields) for row in report_rows)
    tex = env.client.get(f"/api/ablations/{SPEC_NAME}/export.tex", headers=env.headers("vera")).text
    assert tex.startswith(r"\begin{tabular}") and r"final\_loss" in tex and "lr-high" in tex and r"$\pm$" in tex
    assert env.client.get(f"/api/ablations/{SPEC_NAME}/export.exe", headers=env.headers("vera")).status_code == 422


def test_ablations_overview_counts_the_grid(env):
    listed = {a["name"]: a for a in _get(env, "/api/ablations")}
    mini = listed[SPEC_NAME]
    assert mini["counts"] == {"done": 4, "running": 0, "failed": 0, "missing": 2}
    assert mini["arms"] == ["lr-low", "lr-high"] and mini["seeds"] == [0, 1, 2]
    assert len(mini["git_commit"] or "") > 0 and mini["experiment_ids"]
    assert listed["handmade"]["counts"]["failed"] == 1 and listed["handmade"]["counts"]["done"] == 9
    run_id = next(c["run_id"] for c in mini["cells"] if c["state"] == "done")
    run = _get(env, f"/api/runs/{run_id}")
    assert run["params"]["train.lr"] in ("0.001", "0.005") and run["checkpoint_uri"].startswith(f"runs:/{run_id}/")
    assert {"config.yaml", "results.json"} <= {a["path"] for a in run["artifacts"]}
    results = env.client.get(f"/api/runs/{run_id}/artifacts/results.json", headers=env.headers("vera"))
    assert results.status_code == 200 and "final_loss" in results.json()
    assert env.client.get("/api/ablations/nope", headers=env.headers("vera")).status_code == 404


def test_nightly_reports_the_gate_with_its_band(env):
    assert _get(env, "/api/nightly") == []
    write_gate(env.folder / "runs")
    (gate,) = _get(env, "/api/nightly")
    assert gate["ablation"] == SPEC_NAME and gate["status"] == "regression"
    verdicts = {m["metric"]: m for m in gate["metrics"]}
    assert verdicts["final_loss"]["state"] == "regression" and verdicts["train_seconds"]["state"] == "ok"
    assert verdicts["final_loss"]["band"] == [pytest.approx(3.95), pytest.approx(4.05)]
    assert verdicts["final_loss"]["run_id"] in env.client.get(f"/api/ablations/{SPEC_NAME}/compare",
                                                              headers=env.headers("vera")).json()["run_ids"].values()
    trend = gate["trends"]["lr-low|final_loss"]
    assert len(trend["points"]) == 2 and all(p["value"] is not None for p in trend["points"])
    (env.folder / "runs" / SPEC_NAME / "gate" / "gate.json").unlink()


def test_an_unreadable_ablation_does_not_hide_the_others(env, monkeypatch):
    from mlflow.tracking import MlflowClient

    from alignlab_dashboard import store

    monkeypatch.setattr(store, "LIST_TTL_S", 0.0)  # see the new run at once
    client = MlflowClient(env.uri)
    run = client.create_run(client.create_experiment("broken"), tags={"alignlab.ablation": "broken"})
    client.set_terminated(run.info.run_id, "FINISHED")
    listed = {a["name"]: a for a in _get(env, "/api/ablations")}
    assert "alignlab.arm" in listed["broken"]["error"] and listed[SPEC_NAME]["counts"]["done"] == 4
    answer = env.client.get("/api/ablations/broken/compare", headers=env.headers("vera"))
    assert answer.status_code == 422 and run.info.run_id in answer.json()["detail"]
    client.delete_run(run.info.run_id)


def test_auth_roles_and_csrf(env):
    c = env.client
    assert c.get("/api/ablations").status_code == 401
    assert c.get("/api/ablations", headers={"Authorization": "Bearer wrong"}).status_code == 401
    body = {"text": env.spec.read_text()}
    assert c.post("/api/submit", json=body).status_code == 401
    assert c.post("/api/submit", json=body, headers=env.headers("vera")).status_code == 403
    assert c.post("/api/specs/validate", json=body, headers=env.headers("vera")).json()["valid"] is True
    page = c.get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    # a browser session: the cookie alone does not make a post, the page's CSRF token must come along
    with TestClient(c.app) as browser:
        bad = browser.post("/login", data={"token": "wrong", "next": "/"}, follow_redirects=False)
        assert "error" in bad.headers["location"]
        ok = browser.post("/login", data={"token": env.tokens["sam"], "next": "//evil.example"},
                          follow_redirects=False)
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        html = browser.get("/submit").text
        csrf = html.split('name="csrf-token" content="')[1].split('"')[0]
        assert browser.post("/api/specs/validate", json=body).status_code == 403
        assert browser.post("/api/specs/validate", json=body, headers={"X-CSRF-Token": "0" * 64}).status_code == 403
        assert browser.post("/api/specs/validate", json=body, headers={"X-CSRF-Token": csrf}).json()["valid"]
        form = browser.post("/api/specs/validate", data={"text": body["text"], "csrf": csrf})
        assert form.status_code == 200 and form.json()["valid"]
        assert browser.post("/api/specs/validate", data={"text": body["text"]}).status_code == 403
        assert env.tokens["sam"] not in html


def test_paths_outside_their_roots_are_404(env):
    secret = env.folder / "secret.txt"
    secret.write_text("TOP-SECRET")
    (env.folder / "runs" / "link").symlink_to(secret)
    run_id = _get(env, f"/api/ablations/{SPEC_NAME}")["cells"][0]["run_id"]
    for path in ("/files/..%2Fsecret.txt", "/files/%2e%2e/secret.txt", "/files/link", f"/files/{secret}",
                 f"/api/runs/{run_id}/artifacts/..%2F..%2Fsecret.txt", f"/api/runs/{run_id}/artifacts/%2e%2e/x",
                 f"/api/runs/{run_id}/artifacts/nothing.txt", "/api/runs/0123456789abcdef/artifacts/x"):
        response = env.client.get(path, headers=env.headers("vera"))
        assert response.status_code == 404, path
        assert "TOP-SECRET" not in response.text
    ok = env.client.get(f"/files/{SPEC_NAME}/report.md", headers=env.headers("vera"))
    assert ok.status_code == 200 and "final_loss" in ok.text


def test_spec_validation_names_the_field(env):
    def validate(tree: dict) -> dict:
        return env.client.post("/api/specs/validate", json={"text": yaml.safe_dump(tree)},
                               headers=env.headers("sam")).json()

    good = yaml.safe_load(env.spec.read_text())
    result = validate({**good, "seeds": ["x"], "arms": {"lr-low": {"train.lr": "fast"}}})
    assert not result["valid"] and result["dry_run"] is None
    assert any(e["path"] == "seeds.0" for e in result["errors"]), result["errors"]
    result = validate({**good, "arms": {"lr-low": {"train.lr": "fast"}}})
    assert [e["path"] for e in result["errors"]] == ["train.lr"] and "fast" in result["errors"][0]["message"]
    dry = env.client.post("/api/specs/validate", json={"text": env.spec.read_text()},
                          headers=env.headers("sam")).json()["dry_run"]
    assert len(dry["runs"]) == 6 and set(dry["arms"]) == {"lr-low", "lr-high"} and dry["prepare"] == []
    assert dry["estimate"]["from_runs"] == 4 and dry["estimate"]["total_s"] > 0
    listed = _get(env, "/api/specs")
    assert [s["name"] for s in listed] == [SPEC_NAME]
    to_kfp = env.client.post("/api/submit", json={"text": env.spec.read_text(), "target": "kfp"},
                             headers=env.headers("sam"))
    assert to_kfp.status_code == 400 and "--kfp-host" in to_kfp.json()["detail"]


def test_submit_runs_a_supervised_job_and_cancels_one(env):
    spec = yaml.safe_load(env.spec.read_text())
    spec.update(name="dash-job", seeds=[0], arms={"only": {}}, baseline="only")
    spec["base"]["tracking"]["experiment"] = "dash-job"
    headers = env.headers("sam")
    started = env.client.post("/api/submit", json={"text": yaml.safe_dump(spec), "runner": "inline"}, headers=headers)
    assert started.status_code == 200, started.text
    job = started.json()["job"]
    busy = env.client.post("/api/submit", json={"text": yaml.safe_dump(spec), "runner": "inline"}, headers=headers)
    assert busy.status_code == 409
    deadline = time.monotonic() + 120
    while (state := _get(env, f"/api/jobs/{job['id']}"))["status"] == "running":
        assert time.monotonic() < deadline, state["log"]
        time.sleep(0.5)
    assert state["status"] == "succeeded", state["log"]
    assert "dash-job" in state["log"]
    assert _get(env, "/api/ablations/dash-job")["counts"]["done"] == 1

    spec.update(name="dash-cancel")
    spec["base"]["train"]["max_steps"] = 100_000
    job = env.client.post("/api/submit", json={"text": yaml.safe_dump(spec), "runner": "inline"},
                          headers=headers).json()["job"]
    time.sleep(3)
    cancelled = env.client.post(f"/api/jobs/{job['id']}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert [j["id"] for j in _get(env, "/api/jobs")][:2] == [job["id"], state["id"]]
    metrics = env.client.get("/metrics").text
    assert 'alignlab_dashboard_submissions_total{outcome="started",target="local"} 2.0' in metrics
    assert 'alignlab_dashboard_submissions_total{outcome="busy",target="local"} 1.0' in metrics


def test_metrics_histograms_per_route(env):
    _get(env, f"/api/ablations/{SPEC_NAME}/compare")
    text = env.client.get("/metrics").text
    assert ('alignlab_dashboard_request_seconds_count{method="GET",route="/api/ablations/{name}/compare",'
            'status="200"}') in text
    assert 'alignlab_dashboard_mlflow_query_seconds_count{query="search_runs"}' in text
    assert 'route="/api/ablations/dash-mini/compare"' not in text  # templates, not raw paths


def test_cli_registers_dashboard_and_adds_hashed_tokens(tmp_path, capsys):
    import argparse

    from alignlab_dashboard.auth import hash_token, load_tokens
    from alignlab_dashboard.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["dashboard", "--tokens", str(tmp_path / "t.yaml"), "--new-token", "ann:admin"])
    assert args.func(args) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert load_tokens(tmp_path / "t.yaml") == {hash_token(token): ("ann", "admin")}
    assert token not in (tmp_path / "t.yaml").read_text()
    args = parser.parse_args(["dashboard", "--host", "0.0.0.0"])
    with pytest.raises(ValueError, match="without --tokens"):
        args.func(args)
    (tmp_path / "bad.yaml").write_text("tokens: [{name: x, role: root, sha256: abc}]")
    with pytest.raises(ValueError, match=r"tokens\[0\].role"):
        load_tokens(tmp_path / "bad.yaml")


def test_curve_band_helper_equals_mean_ci_per_column():
    from alignlab.report.stats import mean_ci, mean_ci_columns

    values = np.random.default_rng(0).normal(size=(4, 30))
    values[0, 3], values[:3, 5] = np.nan, np.nan  # a seed that has not reached a step; a step with one seed
    low, high = mean_ci_columns(values)
    for j in range(values.shape[1]):
        column = values[:, j][~np.isnan(values[:, j])]
        assert (low[j], high[j]) == (pytest.approx(mean_ci(column)[0], nan_ok=True),
                                     pytest.approx(mean_ci(column)[1], nan_ok=True))
    assert np.isnan(low[5]) and not np.isnan(low[3])


def test_dashboard_command_starts_on_the_embedded_default_and_prints_its_url(tmp_path):
    import subprocess
    import sys
    import urllib.request

    from dashboard_env import free_port

    port = free_port()
    code = ("import argparse, sys; from alignlab_dashboard.cli import register; parser = argparse.ArgumentParser(); "
            "register(parser.add_subparsers()); args = parser.parse_args(sys.argv[1:]); sys.exit(args.func(args))")
    process = subprocess.Popen([sys.executable, "-c", code, "dashboard", "--port", str(port)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line and "mlflow.db" in line and "auth off" in line, line
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/ablations", timeout=5) as response:
                    assert json.load(response) == []  # no store yet, no specs: an empty overview, not an error
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(30)
    assert not (tmp_path / "mlflow.db").exists()  # reading never creates an empty store
