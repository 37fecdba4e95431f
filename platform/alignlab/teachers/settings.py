"""The settings of `alignlab teacher train` and `alignlab teacher cache`: the one definition used by their CLI
flags, a spec's `teacher_train` / `teacher_cache` prepare steps and the KFP prepare component. Free of torch,
so the CLI builds its parser without it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConceptSettings(_Settings):
    """Concept-head training (DiHT section 3.2: SGD, lr = base_lr * batch / 256, inverse-square-root
    resampling of rare concepts); DiHT's values, fewer epochs."""

    min_count: int = Field(5, ge=1, description="concept vocabulary: captions a concept must occur in")
    epochs: int = Field(30, ge=1, description="concept-head epochs")
    batch_size: int = Field(256, ge=1, description="concept-head batch size")
    base_lr: float = Field(0.001, gt=0, description="SGD lr = this * batch / 256 (DiHT)")
    resample: Literal["inv_sqrt", "none"] = Field("inv_sqrt", description="inverse-square-root resampling of "
                                                                          "rare concepts (DiHT) or none")

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256


class TeacherSettings(_Settings):
    """The supervised teacher: a timm backbone on SynthCaps' true labels, then concept heads. Without `arch`
    it is the student's image tower (`with_default_arch`)."""

    arch: str | None = Field(None, description="timm:<name> (default: the experiment config's model.image)")
    kwargs: dict[str, Any] | None = Field(None, description="JSON kwargs of the timm model")
    image_size: int | None = Field(None, ge=8, description="input size (default: the tower's img_size, else "
                                                           "data.image_size)")
    epochs: int = Field(3, ge=1, description="supervised epochs")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0, description="AdamW peak lr of the supervised backbone")
    loss: Literal["group_ce", "bce"] = Field(
        "group_ce", description="group_ce: a softmax cross entropy per label group (shape, colour, size) against "
        "the group's true labels spread evenly; bce: binary cross entropy on the multi-hot labels, which left shape "
        "unlearned on SynthCaps (hold-out shape top-1 0.27 against 0.56 after 423 steps: benchmarks/teacher_recipe.py)")
    holdout: float = Field(0.1, gt=0, lt=1, description="fraction of pairs held out for accuracy")
    seed: int = 0
    concepts: ConceptSettings = Field(default_factory=ConceptSettings)

    @model_validator(mode="after")
    def _check(self) -> "TeacherSettings":
        tower_size = (self.kwargs or {}).get("img_size")
        if tower_size is not None and self.image_size is not None and tower_size != self.image_size:
            raise ValueError(f"image_size: {self.image_size} but kwargs img_size={tower_size}; set both to the "
                             f"same size")
        return self

    def with_default_arch(self, arch: str, kwargs: dict[str, Any], image_size: int) -> "TeacherSettings":
        """These settings with the architecture filled in: without `arch`, the tower `arch` (a config's
        model.image) with these settings' kwargs over its `kwargs`; the image size from these settings, else
        the tower's img_size, else `image_size`."""
        if self.arch:
            arch, kwargs = self.arch, dict(self.kwargs or {})
        else:
            kwargs = {**kwargs, **(self.kwargs or {})}
        size = self.image_size or kwargs.get("img_size") or image_size
        return self.model_validate(self.model_dump() | {"arch": arch, "kwargs": kwargs, "image_size": size})


class TeacherTrainSettings(_Settings):
    """`alignlab teacher train`: a supervised teacher + concept heads on the SynthCaps at `data`, into `out`."""

    data: str = Field(min_length=1, description="SynthCaps root (train shards with metadata)")
    out: str = Field(min_length=1, description="teacher folder to write")
    train: str = Field("train", description="training shards under data (dir, glob or brace pattern)")
    config: TeacherSettings = Field(default_factory=TeacherSettings)


TEACHER_TARGETS = Literal["objects", "attributes", "logits", "embedding"]


class TeacherCacheSettings(_Settings):
    """`alignlab teacher cache`: the teacher's top-k targets for every training image of `data`, under
    `out/<key>` (content-addressed; `{data_root}/teacher-caches` is where `distill.cache: auto` looks)."""

    teacher: str = Field(min_length=1, description="timm:<name>, hf:<dir>, a teacher folder or a checkpoint")
    arch: str | None = Field(None, description="timm:<name> of a timm checkpoint file given as teacher")
    arch_kwargs: dict[str, Any] | None = Field(None, description="JSON kwargs of the timm model")
    data: str = Field(min_length=1, description="dataset root with manifest.json and train shards")
    out: str = Field(min_length=1, description="cache root (local path or s3://bucket/prefix); writes <out>/<key>/")
    targets: list[TEACHER_TARGETS] = Field(default_factory=lambda: ["objects", "attributes"], min_length=1)
    k: int = Field(10, ge=1, description="top-k kept of each concept head")
    views: int = Field(1, ge=1, description="view 0 = eval transform; more = seeded train augmentations")
    view_seed: int = 0
    image_size: int | None = Field(None, ge=8, description="student image size (default: the dataset manifest's)")
    batch_size: int = Field(128, ge=1)
    shard_size: int = Field(65536, ge=1, description="samples per cache shard")
    num_workers: int = Field(0, ge=0)
    train: str = Field("train", description="training shards under data")
    device: str | None = Field(None, description="cpu or cuda (default: cuda when available)")
    force: bool = Field(False, description="rebuild even if a complete cache exists")
