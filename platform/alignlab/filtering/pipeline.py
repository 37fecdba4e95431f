"""CAT filtering of image-caption pairs, stage by stage, with the statistics of DiHT Table A.3 (docs/methods.md "CAT
filtering").

Stages run in the order given and each sees only the pairs that survived the previous ones, so the
table reads like Table A.3 ("C1" -> "C1+A" -> "C1+A+T"), and the expensive OCR runs only on the pairs the
caption filters kept. Every removed pair is attributed to the first stage that rejected it.

- `complexity`: caption complexity >= `min_complexity` (data/text/semantic_parser).
- `action`: caption has >= `min_actions` actions (data/text/semantic_parser).
- `text_spotting`: drop if the image shows text matching the caption (text_spotting).
- `clip_score`: the baseline, drop if the CLIP score < `clip_threshold` (clip_score). It runs in this
  process, batched on `device`; the other stages run in `workers` processes, each loading spaCy once.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from dataclasses import dataclass, field

from PIL import Image

from alignlab.data.text.semantic_parser import graph_from_doc, load_spacy_model
from alignlab.filtering.clip_score import clip_scores, keep_clip_score
from alignlab.filtering.settings import CAT_STAGES, STAGES, FilterSettings
from alignlab.filtering.text_spotting import require_tesseract, spot_text, text_matches_caption

_DEFAULT = FilterSettings.model_fields  # the thresholds' defaults are FilterSettings' (one definition)
_PARSER_STAGES = {"complexity", "action"}
_IMAGE_STAGES = {"text_spotting", "clip_score"}


@dataclass
class FilterStats:
    """Counts after each stage (DiHT Table A.3) and up to `max_examples` removed pairs per stage."""

    stages: tuple[str, ...]
    labels: tuple[str, ...]
    total: int = 0
    removed_by: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per stage: the filters applied so far, pairs left, and their % of the full set."""
        rows, count, applied = [], self.total, []
        rows.append({"filters": "none", "count": count, "percent": 100.0 if self.total else 0.0})
        for stage, label in zip(self.stages, self.labels):
            count -= self.removed_by.get(stage, 0)
            applied.append(label)
            rows.append({"filters": "+".join(applied), "count": count,
                         "percent": 100.0 * count / self.total if self.total else 0.0})
        return rows

    def format_table(self) -> str:
        width = max(len(row["filters"]) for row in self.rows())
        lines = [f"{'filters':<{width}}  {'# examples':>12}  {'% of full':>9}"]
        lines += [f"{r['filters']:<{width}}  {r['count']:>12,}  {r['percent']:>9.2f}" for r in self.rows()]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The table as Markdown (DiHT Table A.3 layout: filters applied so far, count, % of the full set)."""
        lines = ["| filters | # examples | % of full |", "|---|---:|---:|"]
        lines += [f"| {r['filters']} | {r['count']:,} | {r['percent']:.2f} |" for r in self.rows()]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """JSON-ready: stages, their labels, the total, removals per stage, the table rows and the examples."""
        return {"stages": list(self.stages), "labels": list(self.labels), "total": self.total,
                "removed_by": dict(self.removed_by), "rows": self.rows(),
                "kept": self.total - sum(self.removed_by.values()), "examples": self.examples}


@dataclass
class FilterResult:
    kept_ids: list
    removed: dict  # sample_id -> the stage that removed it
    stats: FilterStats


def run_filters(samples, stages=CAT_STAGES, workers: int = 1, *,
                min_complexity: int = _DEFAULT["min_complexity"].default,
                min_actions: int = _DEFAULT["min_actions"].default, min_chars: int = _DEFAULT["min_chars"].default,
                min_confidence: float = _DEFAULT["min_confidence"].default, clip_model=None, tokenizer=None,
                image_transform=None, clip_threshold: float = _DEFAULT["clip_threshold"].default,
                clip_batch_size: int = 256, device="cpu", max_examples: int = _DEFAULT["max_examples"].default,
                task_size: int = 256) -> FilterResult:
    """Filter an iterable of `(sample_id, PIL image, caption)` through `stages` (see module docstring).

    Samples are read in chunks, so the iterable may stream from shards. Results do not depend on
    `workers`: tasks are mapped in order and each verdict is a pure function of its sample.
    """
    stages = _checked_stages(stages, clip_model, tokenizer, image_transform)
    if workers < 1 or task_size < 1 or max_examples < 0:
        raise ValueError(f"need workers >= 1, task_size >= 1, max_examples >= 0; got {workers}, {task_size}, "
                         f"{max_examples}")
    labels = tuple(_label(s, min_complexity, min_actions, clip_threshold) for s in stages)
    stats = FilterStats(stages, labels, removed_by={s: 0 for s in stages}, examples={s: [] for s in stages})
    result = FilterResult([], {}, stats)
    params = (min_complexity, min_actions, min_chars, min_confidence)
    needs_parser = bool(_PARSER_STAGES & set(stages))
    if "text_spotting" in stages:
        require_tesseract()  # fail here with the install hint, not inside a worker
    _load_parser(needs_parser)  # here too: a missing spaCy model must fail before workers start

    # spawn, not fork: the parent may hold CUDA (the CLIP model) and threads that a fork would copy.
    pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (needs_parser,))
            if workers > 1 else None)
    seen: set = set()
    try:
        iterator = iter(samples)
        while chunk := list(itertools.islice(iterator, task_size * workers * 4)):
            alive = _checked_chunk(chunk, seen, stages)
            stats.total += len(alive)
            for segment in _segments(stages):
                if segment == ("clip_score",):
                    scores = clip_scores(clip_model, tokenizer, image_transform, [s[1] for s in alive],
                                         [s[2] for s in alive], clip_batch_size, device)
                    verdicts = [(None, "") if keep_clip_score(x, clip_threshold) else ("clip_score", f"{x:.3f}")
                                for x in scores.tolist()]
                else:
                    keep_image = "text_spotting" in segment  # do not ship images to workers that ignore them
                    tasks = [([(i, img if keep_image else None, cap) for i, img, cap in alive[k:k + task_size]],
                              segment, params) for k in range(0, len(alive), task_size)]
                    mapped = pool.map(_run_worker_stages, tasks) if pool else map(_run_worker_stages, tasks)
                    verdicts = [v for task_verdicts in mapped for v in task_verdicts]
                alive = _apply_verdicts(alive, verdicts, result, max_examples)
            result.kept_ids += [sample_id for sample_id, _, _ in alive]
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return result


def _apply_verdicts(alive: list, verdicts: list, result: FilterResult, max_examples: int) -> list:
    survivors = []
    for (sample_id, image, caption), (stage, detail) in zip(alive, verdicts, strict=True):
        if stage is None:
            survivors.append((sample_id, image, caption))
            continue
        result.removed[sample_id] = stage
        result.stats.removed_by[stage] += 1
        if len(result.stats.examples[stage]) < max_examples:
            result.stats.examples[stage].append({"sample_id": sample_id, "caption": caption, "detail": detail})
    return survivors


_NLP = None  # per process: the spaCy pipeline, loaded once


def _load_parser(needs_parser: bool) -> None:
    global _NLP
    if needs_parser and _NLP is None:
        _NLP = load_spacy_model()


def _init_worker(needs_parser: bool) -> None:
    # Tesseract's own OpenMP threads would oversubscribe the cores that the workers already share.
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    _load_parser(needs_parser)


def _run_worker_stages(task) -> list[tuple[str | None, str]]:
    """(first failed stage or None, detail) for each sample of the task, stages tried in order."""
    samples, stages, (min_complexity, min_actions, min_chars, min_confidence) = task
    graphs = [None] * len(samples)
    if _PARSER_STAGES & set(stages):
        graphs = [graph_from_doc(doc) for doc in _NLP.pipe([s[2] for s in samples], batch_size=len(samples))]
    verdicts = []
    for (_, image, caption), graph in zip(samples, graphs):
        verdict = (None, "")
        for stage in stages:
            if stage == "complexity" and graph.complexity < min_complexity:
                verdict = (stage, f"C{graph.complexity}")
            elif stage == "action" and graph.num_actions < min_actions:
                verdict = (stage, f"{graph.num_actions} actions")
            elif stage == "text_spotting":
                words = spot_text(image)
                if text_matches_caption(words, caption, min_chars, min_confidence):
                    verdict = (stage, " ".join(w for w, c in words if c >= min_confidence))
            if verdict[0] is not None:
                break
        verdicts.append(verdict)
    return verdicts


def _segments(stages: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Split stages into runs that execute together: clip_score alone, consecutive worker stages together."""
    return [tuple(group) for _, group in itertools.groupby(stages, key=lambda s: s == "clip_score")]


def _label(stage: str, min_complexity: int, min_actions: int, clip_threshold: float) -> str:
    return {"complexity": f"C{min_complexity}", "action": "A" if min_actions == 1 else f"A{min_actions}",
            "text_spotting": "T", "clip_score": f"CLIP>={clip_threshold:g}"}[stage]


def _checked_stages(stages, clip_model, tokenizer, image_transform) -> tuple[str, ...]:
    stages = (stages,) if isinstance(stages, str) else tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or len(set(stages)) != len(stages):
        raise ValueError(f"stages must be distinct names from {STAGES}, got {stages}")
    if "clip_score" in stages:
        missing = [name for name, value in (("clip_model", clip_model), ("tokenizer", tokenizer),
                                            ("image_transform", image_transform)) if value is None]
        if missing:
            raise ValueError(f"stage 'clip_score' needs {missing}; pass them or drop the stage")
    return stages


def _checked_chunk(chunk: list, seen: set, stages: tuple[str, ...]) -> list:
    needs_image = bool(_IMAGE_STAGES & set(stages))
    checked = []
    for sample in chunk:
        if not (isinstance(sample, tuple | list) and len(sample) == 3):
            raise ValueError(f"each sample must be (sample_id, image, caption), got {sample!r:.80}")
        sample_id, image, caption = sample
        if sample_id in seen:
            raise ValueError(f"sample_id {sample_id!r} occurs twice; ids must be unique to account for each pair")
        seen.add(sample_id)
        if not isinstance(caption, str):
            raise ValueError(f"sample {sample_id!r}: caption must be a str, got {type(caption).__name__}")
        if needs_image and not isinstance(image, Image.Image):
            raise ValueError(f"sample {sample_id!r}: image must be a PIL image for stages {stages}, "
                             f"got {type(image).__name__}")
        checked.append((sample_id, image, caption))
    return checked
