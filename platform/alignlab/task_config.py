"""Settings of the thesis' single-modality tasks (docs/methods.md "Unimodal layer-averaged distillation", "Image
VQ"): sections of the experiment config (`alignlab.config.ExperimentConfig.unimodal`, `.vq`,
`.eval.image_classifier`) that replace the image-text objective by another one on the same data.

Kept apart from config.py so that file stays one screen per section; config.py imports these models, this
module imports nothing of alignlab.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from alignlab.config_types import AdamBetas, CropScale


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class UnimodalKDConfig(_Strict):
    """Layer-averaged distillation of one tower from a frozen teacher of the same modality (thesis section
    3.1.1.1, Eq 36-41): the student's layer-averaged tokens regress the teacher's. The student is
    `model.image` (image) or `model.text` with kind hf (text); the captions (image) or images (text) of the
    training pairs are not used."""

    modality: Literal["image", "text"] = Field(..., description="image: the image tower from an image teacher; "
                                               "text: the hf text tower from a transformers text teacher.")
    teacher: str = Field(..., min_length=1, description="image: a load_teacher source (teacher folder, timm:<name>, "
                         "checkpoint file with teacher_arch) with a ViT-like backbone; text: a local transformers "
                         "directory (save_pretrained), e.g. the one model.text.hf_name_or_path cuts its layers from.")
    teacher_arch: str | None = Field(None, description="timm:<name> of an image teacher given as a checkpoint file.")
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm kwargs of that teacher.")
    final_ln: bool | None = Field(None, description="Parameter-free LN on the layer average; null: on for image "
                                  "(Eq 41), off for text (the thesis' text code).")
    include_embeddings: bool | None = Field(None, description="Count the embedding output as a layer; null: off "
                                            "for image (block outputs only), on for text (BERT hidden_states).")


class ImageVQConfig(_Strict):
    """Image VQ (thesis section 3.2.7, Eq 86-90): the frozen teacher's CLS through a cosine codebook (EMA
    codes, straight-through) and a one-block decoder that sees the code and the few unmasked patches."""

    teacher: str = Field(..., min_length=1, description="load_teacher source of the frozen teacher (its CLS vector "
                         "is the target; the thesis: BEiT v2).")
    teacher_arch: str | None = Field(None, description="timm:<name> of a teacher given as a checkpoint file.")
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm kwargs of that teacher.")
    codebook_size: int = Field(1024, ge=2, description="Codes J (the thesis: 1024 and 8192).")
    code_dim: int = Field(16, ge=1, description="Code width S (the thesis: 16).")
    decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of the codes (the thesis: 0.99).")
    mask_ratio: float = Field(0.9, ge=0, lt=1, description="Fraction of patches replaced by the mask token, "
                              "exactly round(ratio x patches) per image (the thesis: 0.9).")
    patch_size: int = Field(8, ge=1, description="Patch size of the decoder's patch embedding.")
    decoder_heads: int = Field(4, ge=1, description="Attention heads of the decoder block (its width is the "
                               "teacher's).")


class ImageClassifierConfig(_Strict):
    """The image tower's own evaluation (thesis section 3.1.1.3, Eq 42, Code 1): patch tokens (CLS dropped) ->
    mean -> LN -> Linear, trained on a classification task's train split, chosen on val, scored on test.
    probe: the tower frozen; finetune: everything trains, lr x layer_decay^(depth + 1 - layer). The recipe
    (one for both, as the thesis gives it) is timm's: Mixup/CutMix, RandAugment, random erasing, label
    smoothing."""

    protocol: Literal["probe", "finetune"] = "finetune"
    task: str = Field("shape_color", min_length=1, description="classification/<task> of the data root.")
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    layer_decay: float = Field(0.81, gt=0, le=1, description="finetune: lr scale per layer below the head.")
    weight_decay: float = Field(0.01, ge=0)
    betas: AdamBetas = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup: float = Field(0.1, ge=0, lt=1, description="Warm-up fraction of all steps, then cosine.")
    crop_scale: CropScale = (0.08, 1.0)
    mixup: float = Field(0.8, ge=0, description="Mixup alpha; 0 with cutmix 0: no mixing.")
    cutmix: float = Field(1.0, ge=0, description="CutMix alpha.")
    mix_prob: float = Field(0.9, ge=0, le=1)
    switch_prob: float = Field(0.5, ge=0, le=1)
    smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing.")
    rand_augment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm RandAugment string (n=2 is its "
                                     "default); null: none.")
    erase: float = Field(0.25, ge=0, le=1, description="Random-erasing probability.")

    @field_validator("rand_augment")
    @classmethod
    def _check_rand_augment(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("rand-"):
            raise ValueError(f"rand_augment {value!r} is not a timm RandAugment string (e.g. rand-m9-mstd0.5-inc1)")
        return value
