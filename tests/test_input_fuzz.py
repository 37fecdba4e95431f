"""Bad input never gives a traceback: >= 100 generated bad configs, overrides, files and specs through the real
CLI entry point (`alignlab.cli.main`, in this process), plus a few real `python -m alignlab.cli` processes.

Every case must exit 2 with exactly one error line on stderr, `alignlab: error: ...`, that names the bad field
(its dotted path) or the bad file, and print no traceback (a one-line `alignlab: notice:` about an output folder
outside the working folder may come before it).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_tree

BASE = Path(__file__).resolve().parents[1] / "configs" / "tiny_synthcaps.yaml"

# (override, what the message must name): out-of-range values, wrong types, unknown keys, bad names, YAML.
OVERRIDES = [
    ("train.lr=-1", "train.lr"), ("train.lr=0", "train.lr"), ("train.lr=abc", "train.lr"),
    ("train.lr={a: 1}", "train.lr"), ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=1", "train.batch_size"), ("train.batch_size=2.5", "train.batch_size"),
    ("train.betas=[2, 3]", "train.betas"), ("train.betas=[0.9, 1.0]", "train.betas"),
    ("train.betas=[-0.1, 0.5]", "train.betas"), ("train.betas=[0.9]", "train.betas"), ("train.betas=x", "train.betas"),
    ("train.epochs=-1", "train.epochs"), ("train.epochs=many", "train.epochs"), ("train.precision=fp64", "train.precision"),
    ("train.warmup=-1", "train.warmup"), ("train.grad_clip=0", "train.grad_clip"),
    ("train.accumulation_steps=0", "train.accumulation_steps"), ("train.min_lr_ratio=2", "train.min_lr_ratio"),
    ("seed=-1", "seed"), ("seed=4294967296", "seed"), ("seed=99999999999999", "seed"), ("seed=1.5", "seed"),
    ("seed=abc", "seed"), ("model.text.heads=7", "heads=7"), ("model.text.heads=0", "model.text.heads"),
    ("model.text.width=130", "width=130"), ("model.text.layers=0", "model.text.layers"),
    ("model.image.kwargs={embed_dim: 128, num_heads: 5}", "num_heads=5"), ("model.image.kwargs=[1]", "model.image.kwargs"),
    ("model.image.kwargs.img_size=48", "model.image.kwargs.img_size"), ("model.image.mode=locked", "model.image"),
    ("model.image.mode=frozen", "model.image.mode"), ("model.image.delay=1", "model.image.delay"),
    ("model.tokenizer.context_length=4", "model.tokenizer.context_length"),
    ("model.tokenizer.context_length=7", "model.tokenizer.context_length"),
    ("model.tokenizer.context_length=-5", "model.tokenizer.context_length"), ("model.tokenizer.kind=bpe", "kind"),
    ("model.preset=nope", "preset"), ("model.embed_dim=4", "model.embed_dim"), ("loss.name=clipp", "loss.name"),
    ("loss.name=3", "loss.name"), ("loss.distributed=everywhere", "loss.distributed"),
    ("loss.psd.alpha_start=1.5", "loss.psd.alpha_start"), ("loss.psd.teacher_temperature=0", "teacher_temperature"),
    ("loss.hn_nce.alpha=0", "loss.hn_nce.alpha"), ("data.image_size=4", "data.image_size"),
    ("data.image_size=big", "data.image_size"), ("data.crop_scale=[1.2, 0.3]", "data.crop_scale"),
    ("data.crop_scale=[0.5]", "data.crop_scale"), ("data.format=parquet", "data.format"), ("data.hflip=2", "data.hflip"),
    ("data.num_workers=-1", "data.num_workers"), ("data.synth.num_train=-5", "data.synth"),
    ("eval.batch_size=0", "eval.batch_size"), ("eval.zeroshot_tasks=shape", "eval.zeroshot_tasks"),
    ("distill.concepts.targets=on", "distill.concepts.targets"), ("distill.concepts.targets=yes", "targets"),
    ("distill.concepts.targets=true", "distill.concepts.targets"), ("distill.concepts.k=0", "distill.concepts.k"),
    ("distill.cache=auto", "distill"), ("distill.distribution.enabled=true", "distill"),
    ("tracking.enabled=maybe", "tracking.enabled"), ("tracking.flush_timeout_s=0", "tracking.flush_timeout_s"),
    ("name=..", "name"), ("name=.", "name"), ("name=", "name"), ("name=a/../b", "name"), ("name=a\\b", "name"),
    ("output_dir=", "output_dir"), ("train.lrr=1", "train.lrr"), ("modle.preset=tiny", "modle"), ("foo=1", "foo"),
    ("train.epochs.x=1", "train.epochs"), ("train=5", "train"), ("train.lr", "train.lr"), ("=3", "=3"),
    ("train.lr=[1,", "train.lr"), ("train={a: 1, a: 2}", "duplicate key 'a'"), ("train.lr=@x", "train.lr"),
]
# Values wrong for every numeric field below, picked by a seeded generator: more type confusion.
NUMERIC_FIELDS = ["train.lr", "train.eps", "train.weight_decay", "train.epochs", "train.log_every", "seed",
                  "data.image_size", "model.embed_dim", "model.init_logit_scale", "eval.batch_size",
                  "loss.hn_nce.beta", "distill.concepts.weight_objects"]
WRONG_VALUES = ["abc", "[1, 2]", "{a: 1}", "-1e9", "'1e-3x'", "off", "[]"]


def _generated_overrides(count: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    pairs = sorted({(f, v) for f in NUMERIC_FIELDS for v in WRONG_VALUES})
    return [(f"{field}={value}", field) for field, value in rng.sample(pairs, count)]


def _files(folder: Path) -> list[tuple[list[str], str]]:
    """(argv, expected name) of bad config files, specs and other inputs written into `folder`."""
    cases = []

    def write(name: str, text: str | bytes) -> str:
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    for name, text in [("empty.yaml", ""), ("comments.yaml", "# only a comment\n"), ("list.yaml", "- a\n- b\n"),
                       ("scalar.yaml", "42\n"), ("unclosed.yaml", "train: {lr: 1\n"), ("tab.yaml", "train:\n\tlr: 1\n"),
                       ("dup_top.yaml", "name: a\nname: b\n"), ("dup_nested.yaml", "train:\n  lr: 1e-3\n  lr: 2e-3\n"),
                       ("binary.yaml", b"\xff\xfe\x00bad"), ("bad_anchor.yaml", "train: *nothing\n")]:
        cases.append((["config", "show", write(name, text)], name))
    cases.append((["config", "show", str(folder / "missing.yaml")], "missing.yaml"))
    cases.append((["config", "show", str(folder)], folder.name))
    cases.append((["train", write("bad_train.yaml", "train: {betas: [2, 3]}\n")], "train.betas"))
    cases.append((["evaluate", str(BASE)], "tiny_synthcaps.yaml"))
    cases.append((["evaluate", write("junk.pt", b"not a checkpoint")], "junk.pt"))
    cases.append((["evaluate", str(folder / "nothing.pt")], "nothing.pt"))
    cases.append((["tracking", "replay", str(folder / "no-run")], "no-run"))

    base = f"base: {BASE}\n"
    specs = {
        "no_arms": ("name: s\n" + base + "arms: {}\n", "arms"),
        "both": ("name: s\n" + base + "arms: {a: {}}\ngrid: {loss.name: [psd]}\n", "arms"),
        "neither": ("name: s\n" + base, "arms"),
        "slash_arm": ("name: s\n" + base + "arms: {a/b: {}}\n", "'a/b'"),
        "dotdot_arm": ("name: s\n" + base + "arms: {'..': {}}\n", "'..'"),
        "dot_arm": ("name: s\n" + base + "arms: {'.': {}}\n", "'.'"),
        "empty_arm": ("name: s\n" + base + "arms: {'': {}}\n", "''"),
        "collide": ("name: s\n" + base + "arms: {'a b': {}, a_b: {}}\n", "'a_b'"),
        "grid_collapse": ("name: s\n" + base + "grid: {data.root: [a/b, a_b, 'a b']}\n", "root=a_b"),
        "dotdot_name": ("name: '..'\n" + base + "arms: {a: {}}\n", "spec name"),
        "slash_name": ("name: a/b\n" + base + "arms: {a: {}}\n", "name"),
        "dup_arm": ("name: s\n" + base + "arms:\n  a: {}\n  a: {seed: 1}\n", "duplicate key 'a'"),
        "no_seeds": ("name: s\n" + base + "arms: {a: {}}\nseeds: []\n", "seeds"),
        "same_seeds": ("name: s\n" + base + "arms: {a: {}}\nseeds: [1, 1]\n", "seeds"),
        "negative_seed": ("name: s\n" + base + "arms: {a: {}}\nseeds: [-1]\n", "seed"),
        "text_seed": ("name: s\n" + base + "arms: {a: {}}\nseeds: [x]\n", "seeds"),
        "bad_baseline": ("name: s\n" + base + "arms: {a: {}}\nbaseline: b\n", "baseline"),
        "missing_base": ("name: s\nbase: nowhere.yaml\narms: {a: {}}\n", "nowhere.yaml"),
        "unknown_key": ("name: s\n" + base + "arms: {a: {}}\narmz: {}\n", "armz"),
        "bad_arm_value": ("name: s\n" + base + "arms: {a: {train.lr: -1}}\n", "train.lr"),
        "bad_override": ("name: s\n" + base + "overrides: {train.betas: [2, 3]}\narms: {a: {}}\n", "train.betas"),
        "empty_axis": ("name: s\n" + base + "grid: {loss.name: []}\n", "grid"),
        "no_axes": ("name: s\n" + base + "grid: {}\n", "grid"),
        "plot_no_metrics": ("name: s\n" + base + "arms: {a: {}}\nreport_plot: {x: seed, metrics: []}\n", "report_plot"),
        "missing_gate": ("name: s\n" + base + "arms: {a: {}}\ngate: {rules: none.yaml}\n", "gate.rules"),
        "two_kinds": ("name: s\n" + base + "arms: {a: {}}\nprepare:\n  - {synth: {out: x}, filter: {data: a, out: b}}\n",
                      "prepare"),
        "spec_list": ("- name: s\n", "spec_list.yaml"),
        "spec_empty": ("", "spec_empty.yaml"),
    }
    for stem, (text, expected) in specs.items():
        cases.append((["run", write(f"{stem}.yaml", text), "--runner", "inline"], expected))
    good_spec = write("good.yaml", "name: s\n" + base + "arms: {a: {}}\n")
    cases.append((["run", good_spec, "seeds=[-3]", "--runner", "inline"], "seed"))
    cases.append((["run", good_spec, "train.lr=-1", "--runner", "inline"], "train.lr"))
    cases.append((["run", good_spec, "train={a: 1, a: 2}", "--runner", "inline"], "duplicate key 'a'"))
    cases.append((["report", good_spec], "no finished runs"))
    return cases


def _check(argv: list[str], expected: str, capsys) -> str | None:
    """None when `main(argv)` failed the way it should, else what went wrong."""
    from alignlab.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        return f"argparse exit {exit_.code}"
    except BaseException as err:  # noqa: BLE001 - an escaping exception is a traceback: the failure counted here
        return f"TRACEBACK {type(err).__name__}: {err}"
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if not line.startswith("alignlab: notice: ")]
    if code != 2:
        return f"exit {code}: {err.strip()}"
    if "Traceback" in out + err or len(lines) != 1 or not lines[0].startswith("alignlab: error: "):
        return f"not one error line: {err!r}"
    if expected not in lines[0]:
        return f"does not name {expected!r}: {lines[0]}"
    return None


def test_bad_inputs_give_one_line_naming_the_field_or_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a spec that slipped through would write its runs here
    cases = [(["config", "show", str(BASE), override], expected) for override, expected in OVERRIDES]
    cases += [(["config", "show", str(BASE), override], expected) for override, expected in _generated_overrides(20)]
    cases += [(["train", str(BASE), override], expected) for override, expected in OVERRIDES[::10]]
    cases += _files(tmp_path)
    assert len(cases) >= 100
    failures = {" ".join(argv): problem for argv, expected in cases
                if (problem := _check(argv, expected, capsys)) is not None}
    tracebacks = sum(problem.startswith("TRACEBACK") for problem in failures.values())
    print(f"\n{len(cases)} bad inputs, {tracebacks} tracebacks, {len(failures)} bad messages")
    assert not failures, "\n".join(f"{argv}\n    -> {problem}" for argv, problem in failures.items())


def test_batch_larger_than_the_data_is_one_line_at_dataset_build(synth_root, tmp_path, capsys):
    config = tmp_path / "big_batch.yaml"
    config.write_text(yaml.safe_dump(tiny_config_tree(synth_root, tmp_path / "out", batch_size=4096)))
    assert _check(["train", str(config)], "train.batch_size=4096", capsys) is None


@pytest.mark.parametrize("argv, expected", [
    (["config", "show", str(BASE), "train.betas=[2, 3]"], "train.betas"),
    (["evaluate", str(BASE)], "not a checkpoint"),
])
def test_real_process_prints_one_line_and_exits_2(argv, expected):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "alignlab.cli", *argv], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("alignlab: error: ") and expected in line


def test_debug_shows_the_traceback(capsys):
    from alignlab.cli import main
    from alignlab.config import ConfigError

    with pytest.raises(ConfigError, match="train.betas"):
        main(["config", "show", str(BASE), "train.betas=[2, 3]", "--debug"])
