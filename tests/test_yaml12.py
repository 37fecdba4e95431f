"""Configs, specs and overrides are read as YAML 1.2: `off` is a string, `1e-4` a float, a duplicate key an error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from alignlab.config import ConfigError, load_config, parse_override
from alignlab.yaml12 import DuplicateKeyError, dump_yaml, load_yaml_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, value", [
    ("off", "off"), ("on", "on"), ("yes", "yes"), ("No", "No"), ("y", "y"),
    ("true", True), ("False", False), ("TRUE", True),
    ("1e-4", 1e-4), ("1e4", 1e4), ("3e-4", 3e-4), ("3.0e-4", 3e-4), ("-2.5E+3", -2500.0), (".5", 0.5), ("1.", 1.0),
    ("12", 12), ("-7", -7), ("0777", 777), ("0o17", 15), ("0x1F", 31),
    ("1_000", "1_000"), ("1:30", "1:30"), ("2024-01-01", "2024-01-01"), ("=", "="), ("0b11", "0b11"),
    ("~", None), ("null", None), ("", None),
])
def test_scalars_follow_the_yaml_1_2_core_schema(text, value):
    loaded = load_yaml_text(f"v: {text}\n")["v"]
    assert loaded == value and type(loaded) is type(value)


def test_infinities_and_nan_are_floats():
    loaded = load_yaml_text("a: .inf\nb: -.Inf\nc: .nan\n")
    assert loaded["a"] == math.inf and loaded["b"] == -math.inf and math.isnan(loaded["c"])


def test_duplicate_keys_name_the_key_and_both_lines():
    with pytest.raises(DuplicateKeyError) as error:
        load_yaml_text("train:\n  lr: 1\n  epochs: 2\n  lr: 3\n")
    assert "duplicate key 'lr' (first at line 2)" in error.value.problem and error.value.problem_mark.line == 3
    assert load_yaml_text("a: {x: 1}\nb: {x: 1}\n") == {"a": {"x": 1}, "b": {"x": 1}}  # same key, other mappings


def test_dumped_yaml_reads_back_the_same_in_1_1_and_1_2():
    data = {"targets": "off", "lr_text": "1e-4", "lr": 3e-4, "tiny": 1e-10, "octal": "0o17", "flag": True,
            "none": None, "inf": math.inf, "date": "2024-01-01", "list": ["yes", 1, 2.5]}
    text = dump_yaml(data)
    assert load_yaml_text(text) == data and yaml.safe_load(text) == data


def test_a_config_file_reads_off_and_1e_4_as_yaml_1_2_says(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  eps: 1e-8\ndistill:\n  concepts:\n    targets: off\n"
                    "model:\n  image:\n    kwargs: {drop_path_rate: 1e-1}\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-4 and cfg.train.eps == 1e-8 and cfg.distill.concepts.targets == "off"
    assert cfg.model.image.kwargs["drop_path_rate"] == 0.1


def test_overrides_read_off_and_1e_4_as_yaml_1_2_says():
    assert parse_override("distill.concepts.targets=off") == ("distill.concepts.targets", "off")
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("train.max_steps=1e4") == ("train.max_steps", 1e4)
    assert parse_override("train.eps=.inf") == ("train.eps", math.inf)
    cfg = load_config(ROOT / "configs" / "tiny_synthcaps.yaml",
                      ["distill.concepts.targets=off", "train.lr=1e-4", "model.image.kwargs={drop_path_rate: 1e-1}"])
    assert cfg.distill.concepts.targets == "off" and cfg.train.lr == 1e-4
    assert cfg.model.image.kwargs["drop_path_rate"] == 0.1


def test_the_float_reaches_timm_as_a_float():
    """`{drop_path_rate: 1e-1}` in model.image.kwargs builds a tower whose stochastic depth is 0.1 (with
    PyYAML's YAML 1.1 it reached timm as the string '1e-1')."""
    from alignlab.data.tokenizers import build_tokenizer
    from alignlab.training.builders import model_from_config

    cfg = load_config(ROOT / "configs" / "tiny_synthcaps.yaml",
                      ["model.preset=tiny", "model.image.kwargs={drop_path_rate: 1e-1, depth: 2}"])
    model = model_from_config(cfg.model, build_tokenizer("clip_bpe", context_length=cfg.model.tokenizer.context_length))
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)


def test_duplicate_keys_in_a_config_file_and_in_an_override_are_errors(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\ntrain:\n  lr: 1e-3\n  lr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: not valid YAML at line 4, column 3: duplicate key 'lr' "
                                          r"\(first at line 3\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'train=\{lr: 1, lr: 2\}'.*duplicate key 'lr'"):
        load_config(None, ["train={lr: 1, lr: 2}"])


def test_every_shipped_config_and_spec_loads(tmp_path, monkeypatch):
    from alignlab.ablation import load_spec

    assert "lr: 2e-3" in (ROOT / "configs" / "tiny_synthcaps.yaml").read_text()
    assert load_config(ROOT / "configs" / "tiny_synthcaps.yaml").train.lr == 2e-3
    monkeypatch.chdir(tmp_path)
    specs = sorted((ROOT / "ablations").glob("*.yaml"))
    assert specs and all(load_spec(spec)[1] for spec in specs)
