"""A slice of a shipped thesis spec at test size, for end-to-end runs on kfp's local runner: a tiny base config
(student from the first block of the spec's own teacher), the spec's prepare steps shrunk, one seed, and the
chosen arms with the paper's rows and claims cut to them."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import SMALL_SYNTH, tiny_config_tree

REPO = Path(__file__).resolve().parents[1]
VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def write_thesis_slice(folder: Path, spec_name: str, arms: dict[str, dict]) -> Path:
    """Write `base.yaml` and `spec.yaml` into `folder` (the working directory of the run) and return the spec.
    `arms`: shipped arm name -> overrides added to it (e.g. a bank or queue small enough for the test)."""
    shipped = yaml.safe_load((REPO / "ablations" / f"{spec_name}.yaml").read_text())
    base = tiny_config_tree(folder / "data", folder / "runs", max_steps=3)
    base["data"]["synth"] = dict(SMALL_SYNTH, num_train=96)
    base["model"]["image"] = {"name": "vit_tiny_patch16_224", "kwargs": VIT, "blocks": 1,
                              "pretrained": "teachers/thesis-vit/backbone.pth"}
    base["model"]["text"] = {"width": 32, "layers": 1, "heads": 2, "pool": "first", "causal": False}
    base["model"]["student"] = {"shared": "block", "out_dim": 32, "heads": 2, "tte": "after_ls"}
    base["distill"] = {"teacher": "teachers/thesis-vit", "knowledge": {"kind": "ssmke"}}
    base["eval"] = {"enabled": True, "zeroshot_tasks": ["shape_color"], "linear_probe_task": None, "shifts": [],
                    "histogram": False, "batch_size": 64}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    teacher_synth, teacher_train = (entry for entry in shipped["prepare"])
    teacher_synth["synth"]["config"] = dict(SMALL_SYNTH, seed=1, num_train=64)
    teacher_train["teacher_train"]["config"].update(kwargs=VIT, epochs=1, batch_size=32)
    spec = shipped | {"base": "base.yaml", "seeds": [0],
                      "arms": {arm: dict(shipped["arms"][arm], **extra) for arm, extra in arms.items()}}
    paper = spec["paper"]
    paper["rows"] = {arm: row for arm, row in paper["rows"].items() if arm in arms}
    paper["claims"] = [claim for claim in paper.get("claims", []) if claim["arm"] in arms]
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
