"""RunTracker against a real sqlite-backed MLflow store (no server), read back with MlflowClient."""

import math
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from alignlab.tracking import (
    METRIC_NAME_TAG_PREFIX,
    TAG_GIT_COMMIT,
    TAG_TRUNCATED_PARAMS,
    RunTracker,
    find_runs,
    flatten_params,
    git_commit,
    resolve_tracking_uri,
    sanitise_metric_name,
    standard_tags,
    summarise_history,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the whole module: creating its tables costs ~2 s."""
    root = tmp_path_factory.mktemp("mlflow_store")
    return root, f"sqlite:///{root / 'mlflow.db'}"


def test_flatten_params_dotted_keys_and_truncation():
    long_text = "x" * 7000
    with pytest.warns(UserWarning, match="model.notes"):
        flat = flatten_params({"lr": 1e-4, "model": {"name": "vit", "depth": 2, "notes": long_text},
                               "crop": [0.9, 1.0], "psd": {"enabled": True, "extra": {}}, "tag": None})
    assert flat["lr"] == "0.0001" and flat["model.name"] == "vit" and flat["model.depth"] == "2"
    assert flat["crop"] == "[0.9, 1.0]" and flat["psd.enabled"] == "True" and flat["psd.extra"] == "{}"
    assert flat["tag"] == "None"
    assert len(flat["model.notes"]) == 6000 and flat["model.notes"].endswith("...[truncated from 7000 chars]")
    with pytest.raises(ValueError, match="lr@warmup"):
        flatten_params({"lr@warmup": 1})


def test_sanitise_metric_name_mapping():
    assert sanitise_metric_name("image_to_text_R@1") == "image_to_text_R_at_1"
    assert sanitise_metric_name("val/loss") == "val/loss"  # allowed characters are kept
    assert sanitise_metric_name("acc (%)") == "acc ___"
    assert sanitise_metric_name("/abs//x") == "_abs__x"
    with pytest.raises(ValueError):
        sanitise_metric_name("")


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri(None) == "http://example:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_git_commit(tmp_path):
    assert git_commit(tmp_path) == "unknown"
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("x")
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "init"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head


def test_run_roundtrip(store, tmp_path):
    root, uri = store
    tags = standard_tags("abl-roundtrip", "psd", 3, "d" * 64)
    params = {"loss": {"name": "psd", "alpha": {"start": 0.8, "end": 0.2}}, "batch_size": 256,
              "note": "y" * 6100}
    with pytest.warns(UserWarning, match="note"):
        tracker = RunTracker.start(uri, "roundtrip", "psd-seed3", tags, params)
    history = [{"loss": 2.0, "image_to_text_R@1": 10.0}, {"loss": 1.5, "image_to_text_R@1": 30.0},
               {"loss": 1.7, "image_to_text_R@1": 20.0}]
    for step, metrics in enumerate(history):
        tracker.log_metrics(metrics, step=step * 10)
    tracker.log_summary(summarise_history(history))
    artifact = tmp_path / "notes.txt"
    artifact.write_text("hello")
    tracker.log_artifact(artifact, artifact_path="extra")
    tracker.log_dict({"a": [1, 2]}, "config.json")
    tracker.set_tags({"alignlab.phase": "done"})
    tracker.end()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "psd-seed3"
    assert run.data.params["loss.alpha.start"] == "0.8" and run.data.params["batch_size"] == "256"
    assert run.data.tags[TAG_TRUNCATED_PARAMS] == "note" and len(run.data.params["note"]) == 6000
    assert run.data.tags["alignlab.arm"] == "psd" and run.data.tags["alignlab.seed"] == "3"
    assert run.data.tags["alignlab.dataset_hash"] == "d" * 64 and run.data.tags["alignlab.phase"] == "done"
    assert TAG_GIT_COMMIT in run.data.tags
    assert run.data.tags[METRIC_NAME_TAG_PREFIX + "image_to_text_R_at_1"] == "image_to_text_R@1"
    recall = client.get_metric_history(tracker.run_id, "image_to_text_R_at_1")
    assert [(m.step, m.value) for m in recall] == [(0, 10.0), (10, 30.0), (20, 20.0)]
    assert run.data.metrics["best_image_to_text_R_at_1"] == 30.0 and run.data.metrics["best_loss"] == 1.5
    assert run.data.metrics["final_loss"] == 1.7
    assert [m.step for m in client.get_metric_history(tracker.run_id, "final_loss")] == [20]
    assert sorted(f.path for f in client.list_artifacts(tracker.run_id)) == ["config.json", "extra"]
    assert [f.path for f in client.list_artifacts(tracker.run_id, "extra")] == ["extra/notes.txt"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (root / "mlartifacts" / "roundtrip").as_uri()
    assert (root / "mlartifacts" / "roundtrip" / tracker.run_id / "artifacts" / "extra" / "notes.txt").exists()


def test_nested_runs_and_failed_status(store):
    _, uri = store
    parent = RunTracker.start(uri, "nesting", "ablation", {"alignlab.ablation": "nest"}, {})
    with pytest.raises(RuntimeError, match="boom"):
        with RunTracker.start(uri, "nesting", "child", {}, {"lr": 1}, parent_run_id=parent.run_id) as child:
            child.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("boom")
    with RunTracker.start(uri, "nesting", "child-ok", {}, {}, parent_run_id=parent.run_id) as ok_child:
        ok_child.log_metrics({"loss": 0.5}, step=0)
    parent.end()
    client = MlflowClient(tracking_uri=uri)
    failed, finished = client.get_run(child.run_id), client.get_run(ok_child.run_id)
    assert failed.info.status == "FAILED" and finished.info.status == "FINISHED"
    assert failed.data.tags["mlflow.parentRunId"] == parent.run_id
    assert finished.data.tags["mlflow.parentRunId"] == parent.run_id
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="parent_run_id"):
        RunTracker.start(uri, "nesting", "orphan", {}, {}, parent_run_id="0" * 32)


def test_metric_name_collision_and_bad_inputs(store):
    _, uri = store
    with RunTracker.start(uri, "collide", "r", {}, {}) as tracker:
        tracker.log_metrics({"R@1": 1.0}, step=0)
        with pytest.raises(ValueError, match="both map"):
            tracker.log_metrics({"R_at_1": 2.0}, step=1)
        with pytest.raises(ValueError, match="must be a number"):
            tracker.log_metrics({"loss": "high"}, step=1)
        with pytest.raises(FileNotFoundError):
            tracker.log_artifact("/nonexistent/file.txt")
        with pytest.raises(ValueError, match="status"):
            tracker.end("DONE")


def test_find_runs_restores_names_and_filters(store):
    _, uri = store
    for arm, recall in [("a", 11.0), ("b", 22.0)]:
        with RunTracker.start(uri, "finder", f"{arm}-0", standard_tags("find", arm, 0, "h"), {"x": arm}) as tr:
            tr.log_metrics({"image_to_text_R@1": recall - 1, "loss": 1.0}, step=0)
            tr.log_metrics({"image_to_text_R@1": recall, "loss": math.nan}, step=1)
    runs = find_runs(uri, "finder", {"alignlab.ablation": "find", "alignlab.arm": "b"})
    assert len(runs) == 1
    run = runs[0]
    assert run["status"] == "FINISHED" and run["params"] == {"x": "b"} and run["tags"]["alignlab.arm"] == "b"
    assert run["metrics"]["image_to_text_R@1"] == 22.0 and "image_to_text_R_at_1" not in run["metrics"]
    assert math.isnan(run["metrics"]["loss"])
    assert [r["tags"]["alignlab.arm"] for r in find_runs(uri, None, {"alignlab.ablation": "find"})] == ["a", "b"]
    with pytest.raises(ValueError, match="no experiment"):
        find_runs(uri, "does-not-exist")
    with pytest.raises(FileNotFoundError):
        find_runs(f"sqlite:///{uri[len('sqlite:///'):]}.missing", None)


def test_records_from_mlflow_keeps_finished_runs(store):
    """The report's MLflow reader: FINISHED runs only, newest per (arm, seed), the rest counted."""
    from alignlab.report import build_report, fetch_ablation_runs, records_from_mlflow

    _, uri = store
    runs = [("base", 0, 1.0, "FINISHED"), ("base", 1, 3.0, "FINISHED"), ("psd", 0, 5.0, "FINISHED"),
            ("psd", 1, 9.0, "FAILED"), ("psd", 0, 6.0, "FINISHED")]  # the last one re-runs psd seed 0
    for arm, seed, recall, status in runs:
        tracker = RunTracker.start(uri, "report-src", f"{arm}-{seed}", standard_tags("rep", arm, seed, "h"), {})
        tracker.log_metrics({"image_to_text_R@1": recall}, step=0)
        tracker.end(status)
    with pytest.warns(UserWarning, match="left out 2 of 5 runs"):
        records = records_from_mlflow(uri, "rep")
    assert [(r["arm"], r["seed"], r["metrics"]["image_to_text_R@1"]) for r in records] == [
        ("base", 0, 1.0), ("base", 1, 3.0), ("psd", 0, 6.0)]
    _, skipped = fetch_ablation_runs(uri, "rep")
    assert sorted(s["reason"].split(" ")[0] for s in skipped) == ["FAILED", "superseded"]
    table = build_report(records, baseline="base", skipped_runs=skipped)
    assert table.cell("psd", "image_to_text_R@1")["delta"] == pytest.approx(4.0)
    assert "Left out 2 run(s)" in table.to_markdown()
    with pytest.raises(ValueError, match="no runs tagged"):
        records_from_mlflow(uri, "no-such-ablation")


def test_attach_reopens_an_open_run_and_refuses_ended_or_unknown_ones(store):
    """A later pipeline step adds to the run an earlier step created (RunTracker.attach)."""
    _, uri = store
    first = RunTracker.start(uri, "attach", "arm/seed-0", {}, {"lr": 0.1})
    first.log_metrics({"loss": 2.0}, step=5)
    assert first.flush()  # delivery is asynchronous; a step hands its run on after a flush (or at exit)
    later = RunTracker.attach(uri, first.run_id)
    later.log_metrics({"zeroshot/top1": 42.0}, step=5)
    later.end("FINISHED")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert run.data.metrics["loss"] == 2.0 and len(client.get_metric_history(first.run_id, "zeroshot/top1")) == 1
    with pytest.raises(ValueError, match="already ended"):
        RunTracker.attach(uri, first.run_id)
    with pytest.raises(ValueError, match="does not exist"):
        RunTracker.attach(uri, "f" * 32)
