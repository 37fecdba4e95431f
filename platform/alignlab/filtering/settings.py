"""The settings of `alignlab data filter`: the one definition used by the CLI (its flags are derived from this
model), a spec's `filter` prepare step and the KFP prepare component. Kept free of torch, spaCy and PIL so
the CLI can build its parser without them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Stage = Literal["complexity", "action", "text_spotting", "clip_score"]
STAGES: tuple[str, ...] = Stage.__args__
CAT_STAGES: tuple[str, ...] = ("complexity", "action", "text_spotting")


class FilterSettings(BaseModel):
    """CAT (DiHT section 3.1, Table A.3) or CLIP-score filtering of the training pairs of `data` into `out`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: str = Field(min_length=1, description="dataset root (as data.root)")
    out: str = Field(min_length=1, description="output folder or s3://bucket/prefix (must not hold a dataset)")
    stages: list[Stage] = Field(default_factory=lambda: list(CAT_STAGES), min_length=1,
                                description="run in this order: complexity, action, text_spotting, clip_score")
    format: Literal["webdataset", "coco", "jsonl"] = Field("webdataset", description="as data.format")
    train: str = Field("train", description="as data.train: shards or file relative to data")
    min_complexity: int = Field(1, ge=0, description="keep caption complexity >= C<n>")
    min_actions: int = Field(1, ge=0, description="keep pairs with >= n actions")
    min_chars: int = Field(5, ge=1, description="text spotting: matching characters")
    min_confidence: float = Field(0.8, ge=0, le=1, description="text spotting: OCR confidence")
    clip_checkpoint: str | None = Field(None, description="alignlab checkpoint (final.pt, step-*.pt) for clip_score")
    clip_threshold: float = Field(0.35, description="clip_score: keep score >= this")
    clip_keep_fraction: float | None = Field(
        None, gt=0, le=1, description="clip_score: instead of clip_threshold, the threshold that keeps this fraction "
        "of the training pairs (scored once beforehand). DiHT chose its 0.35 so that the CLIP-filtered set is about "
        "as large as CAT's; a small scorer's cosines live on another scale, so match the size instead")
    device: str | None = Field(None, description="clip_score device (default: cuda if available, else cpu)")
    workers: int = Field(1, ge=1, description="processes for the parser and OCR stages")
    shard_size: int = Field(1000, ge=1, description="pairs per output shard")
    max_examples: int = Field(5, ge=0, description="removed pairs kept as examples per stage")

    @model_validator(mode="after")
    def _check(self) -> "FilterSettings":
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages: each stage at most once, got {self.stages}")
        if self.clip_keep_fraction is not None and "clip_score" not in self.stages:
            raise ValueError("clip_keep_fraction sets the clip_score threshold: add clip_score to stages or unset it")
        if "clip_score" in self.stages and not self.clip_checkpoint:
            raise ValueError("clip_checkpoint: stage clip_score needs an alignlab checkpoint (e.g. the final.pt "
                             "of a `train` prepare step)")
        return self
