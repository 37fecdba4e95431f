"""One settings model per operation: the CLI flags, a spec's prepare step and the spec's JSON schema all come
from it, so `alignlab teacher train` and a spec's `teacher_train` step cannot drift apart."""

from __future__ import annotations

import argparse
import json

import pytest

from alignlab.cli import build_parser
from alignlab.cli import main as cli_main
from alignlab.config import ConfigError
from alignlab.filtering.settings import FilterSettings
from alignlab.prepare_steps import PREPARE_KINDS, PrepareEntry
from alignlab.settings.cli import add_settings_arguments, settings_from_args
from alignlab.teachers.cli import TRAIN_FLAGS
from alignlab.teachers.settings import TeacherCacheSettings, TeacherTrainSettings


def _parsed(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_cli_and_spec_step_share_the_defaults():
    args = _parsed(["teacher", "train", "--data", "d", "--out", "o"])
    from_cli = settings_from_args(TeacherTrainSettings, args, flags=TRAIN_FLAGS)
    from_spec = PrepareEntry.model_validate({"teacher_train": {"data": "d", "out": "o"}}).step
    assert from_cli == from_spec and from_cli.config.concepts.epochs == 30
    args = _parsed(["data", "filter", "--data", "d", "--out", "o"])
    assert settings_from_args(FilterSettings, args) == PrepareEntry.model_validate({"filter": {"data": "d",
                                                                                              "out": "o"}}).step
    args = _parsed(["teacher", "cache", "--teacher", "t", "--data", "d", "--out", "o"])
    assert settings_from_args(TeacherCacheSettings, args) == TeacherCacheSettings(teacher="t", data="d", out="o")


def test_flags_carry_their_types_and_nested_names():
    args = _parsed(["teacher", "train", "--data", "d", "--out", "o", "--epochs", "2", "--concept-epochs", "4",
                    "--arch-kwargs", '{"img_size": 32}', "--resample", "none"])
    settings = settings_from_args(TeacherTrainSettings, args, flags=TRAIN_FLAGS)
    assert settings.config.epochs == 2 and settings.config.concepts.epochs == 4
    assert settings.config.kwargs == {"img_size": 32} and settings.config.concepts.resample == "none"
    args = _parsed(["data", "filter", "--data", "d", "--out", "o", "--stages", "action, complexity",
                    "--min-confidence", "0.5"])
    settings = settings_from_args(FilterSettings, args)
    assert settings.stages == ["action", "complexity"] and settings.min_confidence == 0.5


def test_a_bad_value_names_its_flag():
    parser = add_settings_arguments(argparse.ArgumentParser(), FilterSettings)
    with pytest.raises(ConfigError, match=r"^--stages: 'colour' is not a choice; choose from"):
        settings_from_args(FilterSettings, parser.parse_args(["--data", "d", "--out", "o", "--stages", "colour"]))
    with pytest.raises(ConfigError, match=r"^--clip-checkpoint: stage clip_score needs an alignlab checkpoint"):
        settings_from_args(FilterSettings, parser.parse_args(["--data", "d", "--out", "o", "--stages", "clip_score"]))
    with pytest.raises(ConfigError, match=r"^--workers: Input should be greater than or equal to 1"):
        settings_from_args(FilterSettings, parser.parse_args(["--data", "d", "--out", "o", "--workers", "0"]))


def test_config_schema_lists_every_prepare_kind(capsys):
    assert cli_main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    entry = schema["$defs"]["PrepareEntry"]
    assert set(entry["properties"]) == set(PREPARE_KINDS) and entry["maxProperties"] == 1
    assert schema["properties"]["prepare"]["items"] == {"$ref": "#/$defs/PrepareEntry"}
    filter_fields = schema["$defs"]["FilterSettings"]["properties"]
    assert set(filter_fields) == set(FilterSettings.model_fields)
    assert filter_fields["min_complexity"]["default"] == FilterSettings.model_fields["min_complexity"].default
    assert cli_main(["config", "schema", "config"]) == 0
    assert "TrainConfig" in json.loads(capsys.readouterr().out)["$defs"]


def test_each_prepare_kind_is_declared_once_with_its_model():
    assert set(PREPARE_KINDS) == {"synth", "import", "filter", "teacher_train", "teacher_cache", "train"}
    assert PREPARE_KINDS["filter"].settings is FilterSettings
    assert PREPARE_KINDS["teacher_train"].settings is TeacherTrainSettings
    assert "filter_stats.json" in PREPARE_KINDS["filter"].completion_files
    with pytest.raises(ValueError, match="exactly one step kind"):
        PrepareEntry.model_validate({"filter": {"data": "d", "out": "o"}, "synth": {"out": "s"}})


def test_a_plugin_that_cannot_be_imported_leaves_the_other_commands_working(monkeypatch, capsys):
    """A package whose `alignlab.commands` entry point no longer imports (removed, or missing from an image)
    gives one warning naming it; `alignlab` and its other commands keep working."""
    from importlib import metadata

    broken = metadata.EntryPoint(name="ghost", value="alignlab_no_such_package.cli:register",
                                 group="alignlab.commands")
    original = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points",
                        lambda **kw: list(original(**kw)) + [broken] if kw.get("group") == "alignlab.commands"
                        else original(**kw))
    parser = build_parser()
    err = capsys.readouterr().err
    assert "the 'ghost' commands (alignlab_no_such_package.cli:register) are unavailable" in err
    assert parser.parse_args(["config", "schema"]).config_command == "schema"


def test_overrides_after_an_option_still_reach_the_command(monkeypatch, capsys):
    import alignlab.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_cmd_run", lambda args: seen.append(args) or 0)
    assert cli_main(["run", "spec.yaml", "seeds=[0]", "--resume", "train.threads=1", "seeds=[1]"]) == 0
    assert seen[0].resume and seen[0].overrides == ["seeds=[0]", "train.threads=1", "seeds=[1]"]  # order kept
    with pytest.raises(SystemExit):
        cli_main(["run", "spec.yaml", "--resume", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
