"""Regression guard for the early collapse (every run sat at ln N inside the warm-up): the shipped benchmark
recipe, trained 40 steps on clean SynthCaps of the shipped difficulty, spends only a few steps at ln N and
its text features spread out again; the collapse statistics a researcher watches are logged every step.

Measured in this exact setting (40 steps, batch 128, 1 thread): the v2 recipe sat within 0.02 of ln N at 7
steps and ended with a mean pairwise text cosine of 0.76; the v1 recipe (tiny ViT, CLIP BPE, lr 3e-4) at 14
steps, ending at 0.94 (its text features stay collapsed). Both briefly reach a text cosine of 0.99."""

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
    assert len(at_ln_n) <= 9, f"loss sat within 0.02 of ln N at steps {at_ln_n}"
    tail = sum(r["loss"] for r in rows[-5:]) / 5
    assert tail < ln_n - 0.1, f"mean loss of the last 5 steps {tail:.3f} is not clearly below ln N = {ln_n:.3f}"
    for key in ("collapse/image_mean_cos", "collapse/text_mean_cos", "data/duplicate_caption_frac"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[-1]["collapse/text_mean_cos"] < 0.88, "the text features stayed collapsed"
