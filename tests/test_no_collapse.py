"""Regression guard for the early collapse (issue: every run sat at ln N inside the warm-up): the shipped
benchmark recipe, trained briefly on clean SynthCaps of the shipped difficulty, leaves ln N at once and
logs the collapse statistics a researcher watches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignlab.config import load_config
from alignlab.data.synth import SynthCapsConfig, generate_synthcaps
from alignlab.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
BATCH = 128


@pytest.mark.slow
def test_shipped_recipe_never_sits_at_ln_n(tmp_path):
    shipped = load_config(REPO / "configs" / "tiny_synthcaps.yaml")
    synth = shipped.data.synth.model_copy(update={
        "num_train": STEPS * BATCH // 2, "shard_size": 1000, "num_retrieval_test": 8, "num_retrieval_val": 8,
        "zeroshot_per_class_train": 1, "zeroshot_per_class_val": 1, "zeroshot_per_class_test": 1,
        "shift_per_class": 1})
    data = tmp_path / "data"
    generate_synthcaps(data, SynthCapsConfig(**synth.model_dump()))
    cfg = load_config(REPO / "configs" / "tiny_synthcaps.yaml", [
        f"data.root={data}", "data.synth=null", "data.num_workers=0", f"train.batch_size={BATCH}",
        f"train.max_steps={STEPS}", "train.checkpoint_every=1000", "train.progress=false", "eval.enabled=false",
        "tracking.enabled=false", f"output_dir={tmp_path}"])
    train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ln_n = math.log(BATCH)
    at_ln_n = [r["step"] for r in rows if abs(r["loss"] - ln_n) < 0.02]
    assert len(at_ln_n) <= 5, f"loss sat within 0.02 of ln N at steps {at_ln_n}"
    tail = sum(r["loss"] for r in rows[-5:]) / 5
    assert tail < ln_n - 0.15, f"mean loss of the last 5 steps {tail:.3f} is not clearly below ln N = {ln_n:.3f}"
    for key in ("collapse/image_mean_cos", "collapse/text_mean_cos", "data/duplicate_caption_frac"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[-1]["collapse/text_mean_cos"] < 0.95
