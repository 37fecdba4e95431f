"""Run, arm and spec names are folder names that stay inside the output root and never collide; URI
credentials never reach a stored file, MLflow or the terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_tree

from alignlab.ablation import load_spec
from alignlab.config import ConfigError, check_inside, load_config, output_dir_notice
from alignlab.training.checkpoint import load_checkpoint

BASE = Path(__file__).resolve().parents[1] / "configs" / "tiny_synthcaps.yaml"


def _spec(tmp_path: Path, body: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"base: {BASE}\n{body}")
    return path


@pytest.mark.parametrize("body, message", [
    ("name: s\narms: {'..': {}}\n", "arm '..'"),
    ("name: s\narms: {'.': {}}\n", "arm '.'"),
    ("name: s\narms: {'': {}}\n", "arm ''"),
    ("name: s\narms: {../../etc: {}}\n", "arm '../../etc'"),
    ("name: s\narms: {\"a\\\\b\": {}}\n", "arm 'a\\\\b'"),  # YAML "a\\b": one backslash
    ("name: '..'\narms: {a: {}}\n", "spec name '..'"),
    ("name: '.'\narms: {a: {}}\n", "spec name '.'"),
    ("name: ../x\narms: {a: {}}\n", "name"),
])
def test_path_escaping_spec_and_arm_names_are_refused(tmp_path, body, message):
    with pytest.raises(ConfigError, match="invalid ablation spec") as error:
        load_spec(_spec(tmp_path, body))
    assert message in str(error.value) and "\n" in str(error.value)  # the CLI joins the lines


@pytest.mark.parametrize("name", ["..", ".", "", "a/../b", "../x", "a//b", "a\\b"])
def test_path_escaping_run_names_are_refused(name):
    with pytest.raises(ConfigError, match="name"):
        load_config(BASE, [f"name={name}"])


def test_slashes_in_run_names_stay_inside_the_output_root():
    from alignlab.config import default_run_dir

    cfg = load_config(BASE, ["name=psd/arm-1", "seed=2"])
    assert default_run_dir(cfg) == Path("runs/psd_arm-1/seed-2")
    assert check_inside("runs/a/seed-0", "runs", "run folder") == Path("runs/a/seed-0")
    with pytest.raises(ConfigError, match="outside its output root"):
        check_inside("runs/a/../../elsewhere", "runs", "run folder")


@pytest.mark.parametrize("body, both", [
    ("arms: {'a b': {}, a_b: {}}", ("'a b'", "'a_b'")),
    ("arms: {'x@1': {}, 'x:1': {}}", ("'x@1'", "'x:1'")),
    ("grid: {data.root: [a/b, a_b, 'a b']}", ("'root=a/b'", "'root=a_b'")),
])
def test_arms_writing_to_the_same_folder_are_refused(tmp_path, body, both):
    with pytest.raises(ConfigError, match="both write to the run folder") as error:
        load_spec(_spec(tmp_path, f"name: s\n{body}\n"))
    assert all(name in str(error.value) for name in both)


def test_slash_in_an_arm_name_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"arm 'a/b'.*rename it, e.g. 'a_b'"):
        load_spec(_spec(tmp_path, "name: s\narms: {a/b: {}, c: {}}\n"))


def test_distinct_grid_values_keep_distinct_folders(tmp_path):
    spec, plans = load_spec(_spec(tmp_path, "name: s\ngrid: {loss.name: [infonce, psd], train.lr: [1e-3, 1e-4]}\n"))
    folders = {plan.run_dir for plan in plans}
    assert len(folders) == 4 and all(folder.parent.parent == Path("runs/s") for folder in folders)
    assert {plan.config.train.lr for plan in plans} == {1e-3, 1e-4}  # YAML 1.2: 1e-4 is a float


def test_same_arm_key_twice_and_zero_arms_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"spec.yaml: not valid YAML at line 5.*duplicate key 'a' \(first at line 4\)"):
        load_spec(_spec(tmp_path, "name: s\narms:\n  a: {train.lr: 1.0e-3}\n  a: {train.lr: 2.0e-3}\n"))
    with pytest.raises(ConfigError, match="arms is empty"):
        load_spec(_spec(tmp_path, "name: s\narms: {}\n"))


def test_output_dir_outside_the_working_folder_is_allowed_with_a_notice(tmp_path, monkeypatch, capsys):
    from alignlab.cli import main

    monkeypatch.chdir(tmp_path)
    assert output_dir_notice("runs") is None and output_dir_notice("sub/../runs") is None
    assert "outside the working folder" in output_dir_notice("../../elsewhere")
    assert "an absolute path" in output_dir_notice(str(tmp_path / "runs"))
    spec = _spec(tmp_path, "name: s\narms: {a: {}}\n")
    assert main(["run", str(spec), "output_dir=../shared-runs", "--runner", "no-such-runner"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("alignlab: notice: output_dir ../shared-runs is outside the working folder")
    assert err[1].startswith("alignlab: error: --runner 'no-such-runner'")


def test_uri_credentials_are_never_stored_or_printed(synth_root, tmp_path, capfd):
    """A real training run whose config holds credentials in URIs (fields this run does not use, so it trains):
    config.yaml, the checkpoints, the MLflow params and tags, stdout and stderr only ever show `***`."""
    from mlflow.tracking import MlflowClient

    from alignlab.cli import main

    secrets = ["AKIAEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY", "hunter2"]
    tree = tiny_config_tree(synth_root, tmp_path / "out", max_steps=3)
    tree["distill"] = {"teacher": f"s3://{secrets[0]}:{secrets[1]}@bucket/teacher.pth"}
    tree["model"]["text"]["hf_name_or_path"] = f"https://user:{secrets[2]}@hub.example/model"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tree["tracking"] = {"enabled": True, "tracking_uri": store, "experiment": "secrets"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    run_dir = tmp_path / "run"

    assert main(["train", str(config), "--run-dir", str(run_dir)]) == 0
    assert main(["config", "show", str(config)]) == 0
    assert main(["config", "show", str(config), f"data.format=http://u:{secrets[2]}@x"]) == 2  # error echoes input
    out, err = capfd.readouterr()
    stored = (run_dir / "config.yaml").read_text()
    assert "teacher: s3://***@bucket/teacher.pth" in stored and "https://***@hub.example/model" in out
    checkpoints = [load_checkpoint(p)["config"] for p in [run_dir / "final.pt",
                                                                           *run_dir.glob("checkpoints/*.pt")]]
    run = MlflowClient(store).get_run((run_dir / "mlflow_run_id.txt").read_text())
    assert run.data.params["distill.teacher"] == "s3://***@bucket/teacher.pth"
    everything = "\n".join([out, err, stored, json.dumps(checkpoints), json.dumps(run.data.params),
                            json.dumps(run.data.tags), *(p.read_text() for p in run_dir.glob("*.json*"))])
    leaked = [secret for secret in secrets if secret in everything]
    assert not leaked, f"credentials leaked: {leaked}"
    assert "alignlab: error: " in err and "http://***@x" in err
