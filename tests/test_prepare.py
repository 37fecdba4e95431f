"""An ablation spec's `prepare:` steps: validation errors that name the entry and field, every step kind on
tiny data and its idempotency (a second run skips and rewrites nothing; an interrupted attempt is redone,
foreign files and other settings are refused), a spec whose only arm trains on the shards its prepare filter
wrote (inline), and the compiled pipeline of a spec with prepare steps (task order, dependencies, caching)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import SMALL_SYNTH, tiny_config_tree

from alignlab.ablation import PrepareEntry, load_spec
from alignlab.config import ConfigError
from alignlab.prepare import PREPARE_MARKER, STARTED_MARKER, run_prepare_step
from alignlab.data.roots import resolve_data_root

TINY_SYNTH = {"num_train": 12, "shard_size": 6, "num_retrieval_test": 2, "num_retrieval_val": 2,
              "zeroshot_per_class_train": 1, "zeroshot_per_class_val": 1, "zeroshot_per_class_test": 1,
              "shift_per_class": 1}
TOWER = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}


def _spec(folder: Path, prepare: list, arms: dict | None = None, **base_train) -> Path:
    """A spec with relative paths (data/, runs/) on a small SynthCaps with 30 % uninformative captions."""
    base = tiny_config_tree("data", "runs", **base_train)
    base["data"]["synth"] = dict(SMALL_SYNTH, uninformative=0.3)
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "prep", "base": "base.yaml", "arms": arms or {"a": {}}, "seeds": [0], "prepare": prepare,
            "report_metrics": ["final_loss"]}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / "spec.yaml"


@pytest.mark.parametrize("prepare, message", [
    ([{"filter": {"data": "d", "out": "o"}}, {"filter": {"data": "d", "out": "o", "stages": ["colour"]}}],
     r"prepare\.1\.filter\.stages\.0: Input should be 'complexity'"),
    ([{"filter": {"data": "d", "out": "o"}, "synth": {"out": "s"}}],
     r"prepare\.0: Value error, a prepare entry is a mapping with exactly one step kind .*got \['synth', 'filter'\]"),
    ([{"filtr": {"data": "d", "out": "o"}}], r"prepare\.0\.filtr: Extra inputs are not permitted"),
    ([{"filter": {"data": "d", "out": "o", "stages": ["clip_score"]}}],
     r"prepare\.0\.filter: Value error, clip_checkpoint: stage clip_score needs"),
    ([{"teacher_cache": {"teacher": "t", "data": "{data_dir}", "out": "o"}}],
     r"prepare\.0: Value error, teacher_cache\.data: unknown placeholder \{data_dir\}"),
    ([{"import": {"format": "tsv", "sources": ["a.tsv", "b.tsv"], "out": "o"}}],
     r"prepare\.0\.import: Value error, sources: format tsv reads exactly one TSV file"),
    ([{"synth": {"out": "s", "config": {"num_train": 0}}}], r"prepare\.0\.synth\.config\.num_train: Input should be"),
    ([{"synth": {"out": "s"}}, {"train": {"run_dir": "r", "overrides": {"train.epochs": -1}}}],
     r"prepare\.1\.train.*\n.*train\.epochs"),
])
def test_invalid_prepare_entries_fail_naming_the_entry_and_field(tmp_path, prepare, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(_spec(tmp_path, prepare))


def test_load_spec_resolves_data_root_train_config_and_teacher_arch(tmp_path):
    spec, plans = load_spec(_spec(tmp_path, [
        {"teacher_train": {"data": "{data_root}", "out": "teachers/t", "config": {"epochs": 1}}},
        {"train": {"run_dir": "runs/scorer", "overrides": {"train.max_steps": 2}}},
        {"filter": {"data": "{data_root}", "out": "{data_root}/../filtered", "stages": ["complexity"]}},
    ]), ["train.lr=0.002"])
    root = str(resolve_data_root(plans[0].config.data))
    assert spec.prepare_data_config.data == plans[0].config.data and root.startswith("data/synthcaps-")
    teacher, train, flt = (entry.step for entry in spec.prepare)
    assert teacher.data == root and (teacher.config.arch, teacher.config.kwargs, teacher.config.image_size) == \
        ("vit_tiny_patch16_224", TOWER, 32)  # the base config's image tower, like `teacher train --config`
    assert (flt.data, flt.out) == (root, f"{root}/../filtered")
    assert train.overrides == {} and train.config["train"]["max_steps"] == 2 and train.config["train"]["lr"] == 0.002
    assert train.config["name"] == "prep/prepare-scorer"
    # the resolved spec survives the JSON trip to the KFP report step
    assert type(spec).model_validate(json.loads(spec.model_dump_json())).prepare == spec.prepare
    no_placeholder, _ = load_spec(_spec(tmp_path, [{"synth": {"out": "s"}}]))
    assert no_placeholder.prepare_data_config is None


def _mtimes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _twice(entry: dict, out: Path, context=None) -> dict:
    """Run a step, then again: the second run must skip and leave every file of `out` untouched."""
    first = run_prepare_step(entry, context)
    assert first["status"] == "done", first
    stamps = _mtimes(out)
    second = run_prepare_step(entry, context)
    assert second["status"] == "skipped" and _mtimes(out) == stamps
    return first


def test_every_step_kind_runs_once_and_then_skips(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    synth = _twice({"synth": {"out": "syn", "config": TINY_SYNTH}}, tmp_path / "syn")
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert synth["dataset_hash"] == manifest["dataset_hash"] and manifest["counts"]["train"] == 12

    imported = _twice({"import": {"format": "webdataset", "sources": [str(synth_root / "train")], "out": "imp",
                                  "shard_size": 200}}, tmp_path / "imp")
    counts = json.loads((tmp_path / "imp" / "manifest.json").read_text())["counts"]
    assert counts["train"] == SMALL_SYNTH["num_train"] and counts["train_shards"] == 2 and counts["skipped"] == 0
    assert imported["detail"] == "256 pairs, 0 skipped"

    # {data_root} from the context
    flt = _twice({"filter": {"data": "{data_root}", "out": "flt", "stages": ["complexity"], "min_complexity": 1}},
                 tmp_path / "flt", {"data_root": synth_root})
    stats = json.loads((tmp_path / "flt" / "filter_stats.json").read_text())
    assert flt["kept"] == stats["written"] == json.loads((tmp_path / "flt" / "manifest.json").read_text())[
        "counts"]["train"] and stats["total"] == SMALL_SYNTH["num_train"]

    teacher = {"arch": "vit_tiny_patch16_224", "kwargs": TOWER, "image_size": 32, "epochs": 1, "batch_size": 64,
               "concepts": {"min_count": 1, "epochs": 1}}
    trained = _twice({"teacher_train": {"data": str(synth_root), "out": "teacher", "config": teacher}},
                     tmp_path / "teacher")
    assert trained["weights_hash"] == json.loads((tmp_path / "teacher" / "teacher.json").read_text())["weights_hash"]

    cache = _twice({"teacher_cache": {"teacher": "teacher", "data": str(synth_root), "out": "caches",
                                      "targets": ["objects"], "k": 3, "image_size": 32}}, tmp_path / "caches")
    key = Path(cache["cache"]).name
    assert [p.parent.name for p in (tmp_path / "caches").glob("*/cache.json")] == [key]
    other = run_prepare_step({"teacher_cache": {"teacher": "teacher", "data": str(synth_root), "out": "caches",
                                                "targets": ["objects"], "k": 2, "image_size": 32}})
    assert other["status"] == "done" and Path(other["cache"]).name != key  # other settings: another cache
    # what a CD arm's distill.cache=auto looks up (same teacher, data, transform, targets, k) is this cache
    from alignlab.config import DistillConfig
    from alignlab.training import teacher_targets

    monkeypatch.setattr(teacher_targets, "auto_cache_root", lambda data_root: "caches")
    distill = DistillConfig(teacher="teacher", cache="auto", concepts={"targets": "objects", "k": 3})
    stamp = (tmp_path / "caches" / key / "cache.json").stat().st_mtime_ns
    assert teacher_targets.prepare_teacher_cache(distill, synth_root, image_size=32) == cache["cache"]
    assert (tmp_path / "caches" / key / "cache.json").stat().st_mtime_ns == stamp

    config = tiny_config_tree(synth_root, tmp_path / "runs", max_steps=2)
    run = _twice({"train": {"config": config, "overrides": {"train.lr": 2e-3}, "run_dir": "scorer"}},
                 tmp_path / "scorer")
    assert run["checkpoint"] == "scorer/final.pt"
    assert yaml.safe_load((tmp_path / "scorer" / "config.yaml").read_text())["train"]["lr"] == 2e-3
    assert len((tmp_path / "scorer" / "metrics.jsonl").read_text().splitlines()) == 2
    assert "skipped, already complete" in capsys.readouterr().out


def test_interrupted_outputs_are_redone_and_foreign_or_changed_ones_refused(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = {"filter": {"data": str(synth_root), "out": "flt", "stages": ["complexity"]}}
    # an interrupted attempt: a shard and the started marker, no manifest -> cleared and filtered again
    (tmp_path / "flt" / "train").mkdir(parents=True)
    (tmp_path / "flt" / "train" / "shard-000000.tar").write_bytes(b"half")
    (tmp_path / "flt" / STARTED_MARKER).write_text("{}")
    assert run_prepare_step(entry)["status"] == "done"
    assert not (tmp_path / "flt" / STARTED_MARKER).exists() and (tmp_path / "flt" / PREPARE_MARKER).exists()
    assert (tmp_path / "flt" / "train" / "shard-000000.tar").stat().st_size > 4
    # a complete-looking marker whose output lost a file is not complete either
    (tmp_path / "flt" / "filter_stats.json").unlink()
    assert run_prepare_step(entry)["status"] == "done" and (tmp_path / "flt" / "filter_stats.json").is_file()
    changed = {"filter": {**entry["filter"], "stages": ["complexity", "action"]}}
    with pytest.raises(ConfigError, match=r"records a filter step with other settings \(differing: stages\)"):
        run_prepare_step(changed)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"mine already holds 1 file\(s\) that no prepare step wrote"):
        run_prepare_step({"filter": {**entry["filter"], "out": "mine"}})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match=r"still has \{data_root\}"):
        run_prepare_step({"filter": {**entry["filter"], "data": "{data_root}"}})


def test_spec_with_a_prepare_filter_trains_its_arm_on_the_filtered_shards(tmp_path, monkeypatch, capsys):
    """Inline: data -> prepare filter (complexity drops the 30 % uninformative captions) -> one arm on the
    filtered shards; its step count is the kept pairs // batch size. Run again with --resume: all skipped."""
    from alignlab.ablation_runner import run_ablation

    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, [{"filter": {"data": "{data_root}", "out": "data/filtered", "stages": ["complexity"]}}],
                 arms={"C": {"data.train": "../filtered/train"}})
    printed: list[str] = []
    run_ablation(spec, print_fn=printed.append)
    stats = json.loads((tmp_path / "data" / "filtered" / "filter_stats.json").read_text())
    assert stats["total"] == SMALL_SYNTH["num_train"] and 0 < stats["written"] < stats["total"]
    run_dir = tmp_path / "runs" / "prep" / "C" / "seed-0"
    steps = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert steps == stats["written"] // 32 < SMALL_SYNTH["num_train"] // 32
    prepare_log = tmp_path / "runs" / "prep" / "logs" / "prepare.log"
    assert "prepare 1/1 filter -> data/filtered: done" in prepare_log.read_text()
    tasks = capsys.readouterr().out
    assert tasks.index("] done     prepare") < tasks.index("] done     run C/seed-0")
    run_ablation(spec, resume=True, print_fn=printed.append)
    assert "prepare 1/1 filter -> data/filtered: skipped, already complete" in prepare_log.read_text()


def test_compiled_pipeline_runs_prepare_steps_in_order_between_data_and_runs(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_pipelines import CLUSTER, _executor, _ir

    from alignlab_pipelines.compile import compile_spec
    from alignlab_pipelines.settings import PipelineSettings

    prepare = [{"synth": {"out": "data/t", "config": TINY_SYNTH}},
               {"teacher_train": {"data": "data/t", "out": "teachers/t"}},
               {"train": {"run_dir": "runs/scorer"}},
               {"filter": {"data": "{data_root}", "out": "data/f", "stages": ["clip_score"],
                           "clip_checkpoint": "runs/scorer/final.pt"}},
               {"teacher_cache": {"teacher": "teachers/t", "data": "{data_root}", "out": "{data_root}/caches"}}]
    # the arm changes the data: the base config's dataset ({data_root}) gets its own prepare-data task
    path = _spec(tmp_path, prepare, arms={"noisy": {"data.synth.mismatch": 0.2}})
    spec, plans = load_spec(path)
    ir, k8s = _ir(compile_spec(path, tmp_path / "p.yaml", PipelineSettings(**CLUSTER)))
    root = ir["root"]["dag"]["tasks"]
    data = sorted(name for name in root if name.startswith("prepare-data"))
    assert len(data) == 2
    roots = {json.loads(root[n]["inputs"]["parameters"]["config_json"]["runtimeValue"]["constant"])["data"]["synth"]
             ["mismatch"] for n in data}
    assert roots == {0.0, 0.2}
    order = ["prepare", "prepare-2", "prepare-3", "prepare-4", "prepare-5"]  # one task per entry, in spec order
    assert [root[name]["taskInfo"]["name"] for name in order] == \
        ["prepare 1 synth", "prepare 2 teacher_train", "prepare 3 train", "prepare 4 filter", "prepare 5 teacher_cache"]
    assert set(root) == set(data) | set(order) | {"open-tracking", "runs", "report", "close-tracking"}
    assert sorted(root[order[0]]["dependentTasks"]) == data
    for before, after in zip(order, order[1:]):
        assert root[after]["dependentTasks"] == [before]
    assert sorted(root["runs"]["dependentTasks"]) == sorted([*data, order[-1], "open-tracking"])
    for name, entry in zip(order, spec.prepare):
        step = json.loads(root[name]["inputs"]["parameters"]["step_json"]["runtimeValue"]["constant"])
        assert step == entry.to_dict() and PrepareEntry.model_validate(step) == entry
        assert root[name]["inputs"]["parameters"]["ablation"]["runtimeValue"]["constant"] == "prep"
        resources = ir["deploymentSpec"]["executors"][_executor(ir, root[name])]["container"].get("resources", {})
        if entry.kind == "train":  # train's compute settings and caching (off unless asked)
            assert root[name]["cachingOptions"] == {} and root[name]["retryPolicy"]["maxRetryCount"] == 3
            assert resources["accelerator"]["resourceCount"] == "2"
            assert k8s[_executor(ir, root[name])]["nodeSelector"] == {"labels": {"pool": "a100"}}
        else:  # data steps: cached like prepare-data, no accelerator, no retries
            assert root[name]["cachingOptions"] == {"enableCache": True} and "retryPolicy" not in root[name]
            assert "accelerator" not in resources
        assert k8s[_executor(ir, root[name])]["pvcMount"][0]["mountPath"] == "/work"
    data_root = str(resolve_data_root(spec.prepare_data_config.data))
    filter_step = json.loads(root["prepare-4"]["inputs"]["parameters"]["step_json"]["runtimeValue"]["constant"])
    assert filter_step["filter"]["data"] == data_root and data_root != str(resolve_data_root(plans[0].config.data))
    ir, _ = _ir(compile_spec(path, tmp_path / "q.yaml", PipelineSettings(cache_data=False, cache_training=True)))
    root = ir["root"]["dag"]["tasks"]
    assert root["prepare-4"]["cachingOptions"] == {} and root["prepare-3"]["cachingOptions"] == \
        {"enableCache": True}
