"""Configs and ablation specs: overrides, presets, and errors that name the bad field before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignlab.ablation import load_spec
from alignlab.cli import main
from alignlab.config import ConfigError, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg = load_config(_write(tmp_path / "c.yaml", {"train": {"lr": 0.1}}),
                      ["train.lr=1e-4", "data.synth.mismatch=0.4", "eval.shifts=[sketch]", "data.synth.num_train=64"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.synth.mismatch == pytest.approx(0.4) and cfg.data.synth.num_train == 64
    assert cfg.eval.shifts == ["sketch"]
    assert parse_override("a.b=null") == ("a.b", None)


def test_preset_fills_fields_and_explicit_fields_win():
    cfg = load_config(None, ["model.preset=vit-b-32", "model.text.layers=2"])
    assert cfg.model.embed_dim == 512 and cfg.model.image.name == "vit_base_patch32_224"
    assert cfg.model.text.layers == 2 and cfg.model.text.width == 512


@pytest.mark.parametrize(
    "override, field, reason",
    [
        ("train.lr=-1", "train.lr", "greater than 0"),
        ("train.batch_size=lots", "train.batch_size", "valid integer"),
        ("data.synth.mismatch=1.5", "data.synth.mismatch", "less than or equal to 1"),
        ("train.optimiser=sgd", "train.optimiser", "Extra inputs are not permitted"),
        ("loss.name=triplet", "loss.name", "infonce"),
        ("data.crop_scale=[0.9,0.5]", "data.crop_scale", "crop_scale"),
        ("model.preset=vit-z-99", "model", "vit-z-99"),
    ],
)
def test_bad_values_name_the_field_and_the_reason(override, field, reason):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value) and reason in str(err.value)


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere.yaml")


def test_cli_reports_bad_config_before_any_work(tmp_path, capsys):
    code = main(["train", str(_write(tmp_path / "c.yaml", {"output_dir": str(tmp_path / "out")})), "train.epochs=-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "greater than or equal to 0" in err
    assert not (tmp_path / "out").exists()


def test_spec_expands_arms_by_seeds_with_baseline(tmp_path):
    base = _write(tmp_path / "base.yaml", {"train": {"epochs": 1}})
    spec = _write(tmp_path / "spec.yaml", {
        "name": "noise", "base": "base.yaml", "overrides": {"train.lr": 0.01},
        "arms": {"clean": {"data.synth.mismatch": 0.0}, "noisy": {"data.synth.mismatch": 0.4}},
        "seeds": [0, 1], "baseline": "clean"})
    parsed, plans = load_spec(spec, ["train.batch_size=64"])
    assert base.exists() and parsed.baseline_arm == "clean"
    assert [(p.arm, p.seed) for p in plans] == [("clean", 0), ("clean", 1), ("noisy", 0), ("noisy", 1)]
    assert {p.config.train.lr for p in plans} == {0.01} and {p.config.train.batch_size for p in plans} == {64}
    assert plans[2].config.data.synth.mismatch == pytest.approx(0.4) and plans[3].config.seed == 1
    assert plans[3].run_dir == Path("runs") / "noise" / "noisy" / "seed-1"
    _, one_seed = load_spec(spec, ["seeds=[1]", "train.batch_size=32"])
    assert [(p.arm, p.seed, p.config.train.batch_size) for p in one_seed] == [("clean", 1, 32), ("noisy", 1, 32)]
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        load_spec(spec, ["seeds=[2, 2]"])


def test_grid_spec_and_spec_errors(tmp_path):
    spec = _write(tmp_path / "grid.yaml", {"name": "g", "grid": {"train.lr": [0.1, 0.01], "train.epochs": [1, 2]},
                                           "seeds": [0]})
    _, plans = load_spec(spec)
    assert [p.arm for p in plans] == ["lr=0.1,epochs=1", "lr=0.1,epochs=2", "lr=0.01,epochs=1", "lr=0.01,epochs=2"]
    bad = _write(tmp_path / "bad.yaml", {"name": "b", "arms": {"a": {"train.lr": -1}}, "seeds": [0]})
    with pytest.raises(ConfigError, match=r"(?s)arm 'a' seed 0.*train.lr"):
        load_spec(bad)
    no_baseline = _write(tmp_path / "nb.yaml", {"name": "b", "arms": {"a": {}}, "baseline": "z"})
    with pytest.raises(ConfigError, match="baseline 'z' is not an arm"):
        load_spec(no_baseline)


def test_every_shipped_config_and_spec_validates():
    specs = sorted((REPO / "ablations").glob("*.yaml"))
    assert specs, "ablations/ ships no spec"
    for spec in specs:
        _, plans = load_spec(spec)
        assert plans
    for config in sorted((REPO / "configs").glob("*.yaml")):
        load_config(config)
