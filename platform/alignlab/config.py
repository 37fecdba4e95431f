"""Typed experiment configuration: one schema for the CLI, the pipelines and the dashboard.

A config is YAML (read as YAML 1.2: `off` is a string, `1e-4` a float, a duplicate key an error; see
`alignlab.yaml12`) validated by pydantic; `key=value` overrides use dotted paths (`train.lr=1e-4`,
`data.synth.mismatch=0.4`). Every error names the field path and the reason, and is raised before any work
starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignlab.config_types import AdamBetas, CropScale
from alignlab.data.skips import DEFAULT_MAX_CAPTION_BYTES
from alignlab.data.synth import SynthCapsConfig
from alignlab.task_config import ImageClassifierConfig, ImageVQConfig, UnimodalKDConfig
from alignlab.yaml12 import describe_yaml_error, load_yaml_text

MAX_SEED = 2**32 - 1  # numpy's seeds are uint32
MIN_CONTEXT_LENGTH = 8  # start + end tokens and a few words


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message says which and how to fix it."""


class RunFailedError(RuntimeError):
    """A run that started and stopped itself (its MLflow run ends FAILED); the CLI exits with status 1."""


def check_path_name(name: str, what: str) -> str:
    """`name` as one or more folder names below an output root: refuses '', '.', '..' and '\\' (a run
    folder must stay inside its root); '/' separates levels (an ablation's `spec/arm`)."""
    parts = name.split("/")
    if "\\" in name or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{what} {name!r} would not name a folder inside the output root: use letters, digits "
                         f"and '_', '-', '.' (not '.', '..', empty parts or '\\')")
    return name


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` are valid YAML floats, but no setting is meaningful at infinity
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    root: str = Field("data/synthcaps", description="Dataset folder (SynthCaps output or an imported dataset).")
    format: Literal["webdataset", "coco", "jsonl"] = "webdataset"
    train: str = Field("train", description="Training shards (dir, glob or brace pattern) or file, relative to root.")
    synth: SynthCapsConfig | None = Field(None, description="If set, SynthCaps is generated into root first.")
    image_size: int = Field(64, ge=8)
    crop_scale: CropScale = (0.9, 1.0)
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    num_workers: int = Field(2, ge=0)
    max_skip_fraction: float = Field(0.01, ge=0.0, le=1.0, description="Stop the run when more than this fraction "
                                     "of the training samples is corrupt (skipped; skips.json names them).")
    max_caption_bytes: int = Field(DEFAULT_MAX_CAPTION_BYTES, ge=1, description="Captions longer than this (UTF-8 bytes) are skipped "
                                   "as caption_too_long: a document or blob stored as a caption.")


class TokenizerConfig(_Strict):
    kind: Literal["clip_bpe", "wordpiece", "hf"] = Field(
        "clip_bpe", description="hf: the vocabulary saved with a pretrained transformers text tower "
        "(model.text.hf_name_or_path).")
    context_length: int = Field(77, ge=MIN_CONTEXT_LENGTH, description="Tokens per caption, start and end included.")
    vocab_file: str | None = None
    vocab_size: int = Field(30522, ge=16, description="Only for a WordPiece vocabulary trained on the captions.")
    random_subsequence: bool = Field(False, description="Long captions: a random window instead of the head (PSD).")


class ImageTowerConfig(_Strict):
    """The timm image tower: its init (`pretrained`: random or weights) and how it trains (`mode`, docs/methods.md
    "DiHT concept distillation").

    mode: train (like every other parameter), locked (LiT: frozen, no gradient, eval mode for norms and
    dropout), ft (trained with lr x `lr_scale`), ft_delay (locked for the first `delay` fraction of the
    steps, then ft). The projection after the tower always trains: it maps into the shared space.
    """

    name: str = "vit_base_patch32_224"
    pretrained: bool | str = Field(False, description="False, True (timm hub weights) or a local checkpoint path.")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    blocks: int | None = Field(None, ge=1, description="Keep only this many transformer blocks of the checkpoint "
                               "in `pretrained` (the thesis' student: 6 of 12).")
    block_selection: Literal["first", "every_other"] = Field("first", description="Which blocks `blocks` keeps.")
    mode: Literal["train", "locked", "ft", "ft_delay"] = "train"
    lr_scale: float = Field(0.01, gt=0, description="ft / ft_delay: tower lr = train.lr x this (DiHT FT: 0.01).")
    delay: float = Field(0.5, gt=0, lt=1, description="ft_delay: fraction of all steps the tower stays locked.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ImageTowerConfig":
        width, heads = self.kwargs.get("embed_dim"), self.kwargs.get("num_heads")
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
            raise ValueError(f"kwargs.num_heads={heads} does not divide kwargs.embed_dim={width}: pick a head "
                             f"count that divides the width (e.g. {_divisor_near(width, heads)})")
        return self

    @model_validator(mode="after")
    def _mode_needs_weights(self) -> "ImageTowerConfig":
        if self.mode != "train" and self.pretrained is False:
            raise ValueError(f"mode={self.mode} keeps or slows down a pretrained tower, but pretrained=false: set "
                             "model.image.pretrained to a checkpoint (e.g. <teacher dir>/backbone.pth) or mode=train")
        return self


class TextTowerConfig(_Strict):
    kind: Literal["clip", "hf"] = "clip"
    width: int = Field(512, ge=8)
    layers: int = Field(12, ge=1)
    heads: int = Field(8, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    pool: Literal["eot", "first", "mean"] = Field("eot", description="eot: CLIP (needs causal); first: CLS/BERT.")
    causal: bool = True
    hf_name_or_path: str | None = Field(None, description="transformers model name or local directory (kind=hf).")
    hf_config: dict[str, Any] | None = Field(None, description="transformers config kwargs for a fresh model (kind=hf).")
    hf_layers: int | None = Field(None, ge=1, description="kind=hf: keep only this many encoder layers (the "
                                  "thesis' student: the first 6 of BERT's 12).")
    hf_layer_selection: Literal["first", "every_other"] = Field("first", description="Which layers hf_layers keeps.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "TextTowerConfig":
        if self.kind == "clip" and self.width % self.heads:
            raise ValueError(f"heads={self.heads} does not divide width={self.width}: pick a head count that "
                             f"divides the width (e.g. {_divisor_near(self.width, self.heads)})")
        return self


def _divisor_near(width: int, heads: int) -> int:
    """The divisor of `width` closest to `heads` (the fix an error message suggests)."""
    return min((d for d in range(1, width + 1) if width % d == 0), key=lambda d: (abs(d - heads), d))


class StudentConfig(_Strict):
    """The thesis' student in place of the dual encoder's projections (docs/methods.md, "Thesis methods"): one
    module shared by both modalities on towers of one width. Needs `distill.knowledge` for its KD loss."""

    shared: Literal["mlp", "block"] = Field("mlp", description="SHRe MLP on the pooled vectors (Eq 43-44) or "
                                            "one Transformer block on the token sequences (Eq 49-52).")
    out_dim: int = Field(..., ge=1, description="Width of h3: the teacher's classes (SHRe) or the width of its "
                         "CLS vector (S-SMKE, CTL).")
    heads: int = Field(12, ge=1, description="Attention heads of the shared block.")
    tte: Literal["none", "before", "after", "after_ls"] = Field("none", description="Token-type embeddings.")
    retrieval_layer: Literal["h1", "h2", "h3"] | None = Field(
        None, description="Vector for retrieval and zero-shot; null: h3 for the MLP, h2 for the block.")
    ffn_inner_ln: bool = Field(False, description="Block: LayerNorm inside the FFN (the thesis' Eq 51; the "
                               "released code has none).")
    layerscale_init: float | None = Field(0.2, gt=0, description="Block: LayerScale on both branches (code: "
                                          "0.2); null: none.")
    h2_source: Literal["residual", "fc2"] = Field("residual", description="Block: h2 after the residual (code) "
                                                  "or the raw FFN output (thesis).")


class ModelConfig(_Strict):
    """A preset fills every field it names; fields given explicitly win over the preset."""

    preset: str | None = "tiny"
    embed_dim: int = Field(512, ge=8)
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    init_logit_scale: float = Field(1 / 0.07, gt=0)
    max_logit_scale: float = Field(100.0, gt=0, le=1e38, description="Cap of the logit scale (<= float32's range).")
    grad_checkpointing: bool = False
    student: StudentConfig | None = Field(None, description="The thesis' shared-encoder student instead of the "
                                          "dual encoder's projections (embed_dim is then unused).")
    projection: Literal["linear", "identity"] = Field(
        "linear", description="Dual encoder: linear projections to embed_dim, or identity (the towers' own vectors, "
        "of one width: the thesis' unaligned control, Table 10).")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        name = values.get("preset", cls.model_fields["preset"].default) if isinstance(values, dict) else None
        if not name:
            return values
        from alignlab.models.presets import get_preset

        preset = get_preset(name)  # ValueError naming the known presets if unknown
        text = dict(preset["text"])
        text.pop("vocab_size", None)  # the tokenizer decides the vocabulary
        tokenizer = {"context_length": text.pop("context_length")} if "context_length" in text else {}
        image = dict(preset["image"])
        given_image = values.get("image") or {}
        if isinstance(given_image, dict) and given_image.get("name", image["name"]) != image["name"]:
            image.pop("kwargs", None)  # another architecture: the preset's kwargs were written for its own
        fields = {"embed_dim": preset["embed_dim"], "image": image, "text": text, "tokenizer": tokenizer}
        return _deep_merge(fields, values)

    @model_validator(mode="after")
    def _projection_is_the_dual_encoders(self) -> "ModelConfig":
        if self.projection != "linear" and self.student is not None:
            raise ValueError(f"projection={self.projection} applies to the dual encoder, but model.student replaces "
                             "its projections by the shared encoder: unset model.student or model.projection")
        return self

    @model_validator(mode="after")
    def _tokenizer_matches_text_tower(self) -> "ModelConfig":
        """A pretrained transformers text tower reads ids of its own vocabulary: CLIP BPE ids run past BERT's
        30,522 rows, and a WordPiece vocabulary learned afresh numbers its tokens differently ([CLS] = 2 where
        BERT's is 101), which would train silently on scrambled embeddings."""
        pretrained_hf = self.text.kind == "hf" and self.text.hf_name_or_path is not None
        if self.tokenizer.kind == "hf" and not pretrained_hf:
            raise ValueError("model.tokenizer.kind=hf reads the vocabulary of model.text.hf_name_or_path: set "
                             "model.text.kind=hf and model.text.hf_name_or_path, or choose wordpiece / clip_bpe")
        if pretrained_hf and self.tokenizer.kind != "hf" and self.tokenizer.vocab_file is None:
            raise ValueError(f"model.text.hf_name_or_path={self.text.hf_name_or_path} has its own vocabulary, but "
                             f"model.tokenizer.kind={self.tokenizer.kind} would give other ids: set "
                             "model.tokenizer.kind=hf (or model.tokenizer.vocab_file=<its vocab.txt>)")
        return self


class PSDConfig(_Strict):
    """Progressive self-distillation (docs/methods.md "PSD"); defaults are the method, the rest are its ablations."""

    prediction: Literal["swapped", "forward"] = "swapped"
    partition: Literal["dynamic", "static"] = "dynamic"
    alpha_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    alpha_start: float = Field(0.8, ge=0, le=1, description="alpha at the first step (the constant value if constant).")
    alpha_end: float = Field(0.2, ge=0, le=1)
    teacher_temperature: float = Field(0.1, gt=0)
    alpha_hold: float = Field(0.0, ge=0, lt=1, description="Deviation (0 = the paper): train plain InfoNCE "
                              "(alpha = 1) for this fraction of the steps, then run the alpha schedule over the rest, "
                              "so that distillation starts from features that have left the uniform state.")
    detach_targets: bool = Field(True, description="Stop-gradient through the self-distilled soft targets.")


class HNNCEConfig(_Strict):
    """HN-NCE hard-negative loss (docs/methods.md "HN-NCE"); defaults are DiHT's LAION setting."""

    alpha: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.25, ge=0)
    detach_weights: bool = False


class LossConfig(_Strict):
    name: Literal["infonce", "psd", "hn_nce"] = "infonce"
    distributed: Literal["global", "local"] = Field(
        "global", description="global: all-gather to the whole batch (PSD); local: local rows x global columns (DiHT)."
    )
    psd: PSDConfig = Field(default_factory=PSDConfig)
    hn_nce: HNNCEConfig = Field(default_factory=HNNCEConfig)


class ConceptDistillConfig(_Strict):
    """Concept distillation (docs/methods.md "DiHT concept distillation"): linear heads on the image embedding learn
    the teacher's top-k
    object / attribute distributions with soft-target cross entropy, next to the contrastive loss."""

    targets: Literal["off", "objects", "objects+attributes"] = "off"
    k: int = Field(10, ge=1, description="Top-k teacher classes kept (and renormalised) per image; DiHT: 10.")
    weight_objects: float = Field(1.0, gt=0, description="Weight of L_CE-obj in the total loss.")
    weight_attributes: float = Field(1.0, gt=0, description="Weight of L_CE-attr in the total loss.")
    head_lr_scale: float = Field(10.0, gt=0, description="Head lr = train.lr x this (DiHT LAION: 10; PMD: 1).")
    head_wd_scale: float = Field(0.01, ge=0, description="Head weight decay = train.weight_decay x this.")

    @property
    def names(self) -> tuple[str, ...]:
        return {"off": (), "objects": ("objects",), "objects+attributes": ("objects", "attributes")}[self.targets]


class EmbeddingDistillConfig(_Strict):
    """ED baseline (docs/methods.md "DiHT concept distillation"): negative cosine between a learned projection of the
    student image embedding
    and the teacher's image embedding."""

    enabled: bool = False
    weight: float = Field(1.0, gt=0)


class DistributionDistillConfig(_Strict):
    """DD baseline (docs/methods.md "DiHT concept distillation"): teacher-image x student-text similarities, softmax
    at `temperature`, mixed
    into InfoNCE's hard labels with weight `lam` (ALBEF's momentum distillation: lam 0.4)."""

    enabled: bool = False
    lam: float = Field(0.4, ge=0, le=1, description="Soft-label weight; 0 is InfoNCE exactly.")
    temperature: float = Field(0.1, gt=0)
    teacher_projection: Literal["image_proj", "identity"] = Field(
        "image_proj", description="How the teacher embedding enters the student space: through the student's "
        "image projection (teacher width = image tower width), or as is (teacher width = model.embed_dim).")


class MomentumConfig(_Strict):
    """The thesis' momentum encoder + queue (section 3.2.4.3.2, Eq 70, Table 22): InfoNCE on h'' only, against an
    EMA copy of the student's h'' of the batch and queues of its past vectors (replaces the multi-layer InfoNCE)."""

    enabled: bool = False
    m: float = Field(0.995, ge=0, lt=1, description="EMA momentum: theta_k = m theta_k + (1 - m) theta_q.")
    queue_size: int = Field(65536, ge=0, description="Past momentum vectors per modality (the thesis: 65,536; "
                            "0: the batch only).")


class ITMConfig(_Strict):
    """The thesis' image-text matching with feature fusion (section 3.2.4.2, Eq 64-68): a 2-way head on h' and on
    h'' each, B pairs and 2B sampled non-pairs per batch, added to the loss with `weight`."""

    negatives: Literal["off", "random", "hard"] = Field("off", description="off: no ITM; random: uniform over "
                                                        "the batch; hard: drawn by softmax of the layer's ITC logits.")
    weight: float = Field(1.0, gt=0, description="Weight of L_ITM (the thesis: 1).")
    dim: int = Field(128, ge=1, description="Width of the fused projection (not given by the thesis).")


class KnowledgeConfig(_Strict):
    """Knowledge extraction from the frozen teacher (the thesis; docs/methods.md): L = weight x L_KD + L_CL,
    with L_CL InfoNCE on the student's layers. Needs `model.student`."""

    kind: Literal["off", "shre", "ssmke", "ctl", "tcmli"] = Field(
        "off", description="shre: KL on the teacher's logits (Eq 45-46); ssmke: MSE on its CLS (Eq 57); ctl: "
        "contrastive target loss on its L2-normalised CLS (Eq 79-83); tcmli: target cross-modal late "
        "interaction on its tokens (Eq 71-77, shared block only, online teacher).")
    weight: float = Field(1.0, gt=0, description="Weight of L_KD.")
    ctl_temperature: Literal["fixed", "none"] = Field(
        "fixed", description="CTL logit scale: fixed 1/0.07 (the released code) or none, 1 (the literal Eq 83).")
    bank_size: int = Field(0, ge=0, description="CTL: FIFO bank of past teacher vectors as extra negatives "
                           "(Eq 84-85); 0: none.")
    bank_init: Literal["empty", "random"] = Field("empty", description="Bank slots before they are written: "
                                                  "left out (empty) or random unit vectors (the thesis code).")
    tcmli_form: Literal["normalized", "literal"] = Field(
        "normalized", description="T-CMLI text term: stop-gradient on the teacher side and L2-normalised in "
        "g-space (default: g cannot shrink to zero), or the equations as printed.")
    tcmli_dim: int = Field(32, ge=1, description="T-CMLI: width of the learned space g (the thesis: 32).")
    momentum: MomentumConfig = Field(default_factory=MomentumConfig)
    student_bank_size: int = Field(0, ge=0, description="FIFO banks of past student vectors per modality and "
                                   "layer as extra InfoNCE negatives (Tables 20-21; the thesis' example: 3 x the "
                                   "batch); 0: none.")
    itm: ITMConfig = Field(default_factory=ITMConfig)

    @model_validator(mode="after")
    def _variants_of_the_student(self) -> "KnowledgeConfig":
        variants = [name for name, on in (("momentum.enabled", self.momentum.enabled),
                                          ("student_bank_size", self.student_bank_size > 0),
                                          ("itm.negatives", self.itm.negatives != "off")) if on]
        if variants and self.kind == "off":
            raise ValueError(f"{', '.join(variants)} change the thesis' student objective, but kind=off: set "
                             "distill.knowledge.kind (e.g. ssmke) and model.student, or turn them off")
        if self.momentum.enabled and self.student_bank_size:
            raise ValueError("momentum.enabled and student_bank_size both change the contrastive loss' negatives: "
                             "choose one (set student_bank_size=0 or momentum.enabled=false)")
        return self

    @property
    def target(self) -> str | None:
        """The teacher target the KD loss reads."""
        return {"off": None, "shre": "logits", "ssmke": "embedding", "ctl": "embedding", "tcmli": "tokens"}[self.kind]


class DistillConfig(_Strict):
    """Where teacher targets come from, and which distillation losses use them (docs/methods.md "DiHT concept
    distillation").

    With `cache` the targets are read from a teacher cache (precomputed once, joined on the sample index);
    "auto" builds or finds the cache for this dataset and teacher before training. Without a cache the
    teacher runs online, under no_grad, on the same augmented batch.
    """

    teacher: str | None = Field(None, description="A load_teacher source: timm:<name>, a checkpoint file, "
                                "hf:<dir> or a teacher folder from `alignlab teacher train`.")
    teacher_arch: str | None = Field(None, description="timm:<name> of a teacher given as a bare checkpoint file.")
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm create_model kwargs of a "
                                           "timm:<name> or checkpoint-file teacher.")
    cache: str | None = Field(None, description="Teacher cache URI, 'auto', or null to run the teacher online.")
    concepts: ConceptDistillConfig = Field(default_factory=ConceptDistillConfig)
    embedding: EmbeddingDistillConfig = Field(default_factory=EmbeddingDistillConfig)
    distribution: DistributionDistillConfig = Field(default_factory=DistributionDistillConfig)
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)

    @model_validator(mode="after")
    def _sources(self) -> "DistillConfig":
        if self.teacher_arch is not None and self.teacher is None:
            raise ValueError("teacher_arch names the architecture of distill.teacher, which is not set")
        if self.cache == "auto" and self.teacher is None:
            raise ValueError("cache=auto builds the teacher cache from distill.teacher: set distill.teacher")
        if self.enabled and self.teacher is None and self.cache is None:
            raise ValueError("distillation is on but there is no teacher: set distill.cache (a teacher cache "
                             "URI or auto) or distill.teacher (to run it online)")
        return self

    @property
    def enabled(self) -> bool:
        return (bool(self.concepts.names) or self.embedding.enabled or self.distribution.enabled
                or self.knowledge.kind != "off")

    def needed_targets(self) -> tuple[str, ...]:
        """The teacher targets the enabled losses read: concept names, and "embedding" for ED / DD."""
        embedding = ("embedding",) if self.embedding.enabled or self.distribution.enabled else ()
        knowledge = (self.knowledge.target,) if self.knowledge.target not in (None, *embedding) else ()
        return self.concepts.names + embedding + knowledge


class TrainConfig(_Strict):
    epochs: int = Field(1, ge=0, description="0: no training; the model as built (pretrained towers) is saved and "
                        "evaluated (the thesis' unaligned control).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(128, ge=2, description="Global batch size, split across ranks.")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: AdamBetas = Field((0.9, 0.98), description="AdamW betas, each in [0, 1).")
    eps: float = Field(1e-6, gt=0)
    warmup: float = Field(0.05, ge=0, description="Warm-up: a fraction of all steps if < 1, else a step count.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    optimizer_impl: Literal["fused", "foreach", "for_loop"] = Field(
        "fused", description="AdamW kernel: fused (one kernel, fastest), foreach, or the per-tensor for_loop.")
    precision: Literal["auto", "fp32", "amp_fp16", "amp_bf16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 autocast on GPUs that have it (else fp16); amp_bf16 also "
        "runs on CPU (autocast to bfloat16, fp32 master weights).")
    compile: bool = Field(False, description="torch.compile the model: fused kernels after a compilation of the "
                          "first steps (tens of seconds; again for each new text length).")
    channels_last: bool = Field(False, description="Images and the image tower in channels-last memory format "
                                "(helps convolutional towers; a ViT only in its patch embedding).")
    accumulation_steps: int = Field(1, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(50, ge=1, description="Write a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1)
    threads: int | None = Field(None, ge=1, description="Compute threads per rank; null: this process's CPUs "
                                "divided among the local ranks, less one per data-loader worker (at least 1).")
    skip_nonfinite_steps: int = Field(0, ge=0, description="Skip up to this many optimizer steps whose loss or "
                                      "gradient norm is NaN/inf (logged, counted), then stop; 0: stop at the first.")
    progress: bool = True
    usd_per_device_hour: float | None = Field(None, ge=0, description="Price of one device hour: the run reports "
                                              "cost/usd (the thesis: RTX 4090 0.69 on demand).")
    ranks: int | None = Field(None, ge=1, description="Processes (DDP ranks) this run trains with, so an arm can "
                              "set it (thesis Tables 12-13: 1 vs 2); the pipeline launches that many through "
                              "TorchX. null: as launched (pipeline nproc_per_node x nnodes, or torchrun).")
    select_by: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="Zero-shot task (e.g. "
                                  "shape_color) whose top-1 on its val split, after each epoch, selects the epoch "
                                  "kept in selected/ (the thesis); results then hold the test metrics of the last "
                                  "epoch and, prefixed selected/, of the selected one.")

    @model_validator(mode="after")
    def _ranks_split_the_batch(self) -> "TrainConfig":
        if self.ranks is not None and self.batch_size % self.ranks:
            fit = self.batch_size // self.ranks * self.ranks or self.ranks
            raise ValueError(f"batch_size={self.batch_size} is the global batch, split evenly over "
                             f"ranks={self.ranks}: make batch_size a multiple of ranks (e.g. {fit})")
        return self

    @model_validator(mode="after")
    def _no_steps_means_no_max_steps(self) -> "TrainConfig":
        if self.epochs == 0 and self.max_steps is not None:
            raise ValueError(f"epochs=0 evaluates the model untrained, but max_steps={self.max_steps} asks for "
                             "training: unset max_steps or set epochs >= 1")
        return self


class EvalConfig(_Strict):
    enabled: bool = True
    batch_size: int = Field(256, ge=1)
    zeroshot_tasks: list[str] = Field(default_factory=lambda: ["shape", "color", "shape_color"])
    linear_probe_task: str | None = "shape_color"
    linear_probe_cs: list[float] | None = Field(
        None, description="Inverse-regularisation grid searched on the val split (default 1e-6..1e6, 13 values).")
    shifts: list[str] = Field(default_factory=lambda: ["sketch", "texture", "clutter", "resample"])
    histogram: bool = True
    amr_folds: Literal["random", "contiguous"] = Field(
        "random", description="Average median rank folds: a seeded permutation, or contiguous chunks of the "
        "stored order (the thesis' code).")
    few_shot: bool = Field(False, description="PGD few-shot probe curve (DiHT's few-shot probe); minutes on a CPU.")
    few_shot_task: str = "shape_color"
    few_shot_ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    few_shot_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    image_classifier: ImageClassifierConfig | None = Field(None, description="Unimodal image runs: the LN + linear "
                                                           "probe or the fine-tune of the image tower (Eq 42).")


class PrometheusConfig(_Strict):
    """Where training exports its progress gauges (alignlab.training.prometheus_exporter); all unset: nowhere."""

    textfile: str | None = Field(None, pattern=r"\.prom$", description="node-exporter textfile (*.prom) to rewrite.")
    pushgateway: str | None = Field(None, pattern=r"^https?://", description="Pushgateway URL (default: "
                                    "$ALIGNLAB_PUSHGATEWAY, which the Helm chart sets).")
    port: int | None = Field(None, ge=0, le=65535, description="Serve /metrics on this port while training.")
    host: str = Field("0.0.0.0", description="Address the port binds.")
    job: str = Field("alignlab-train", min_length=1, description="Pushgateway job label.")
    every_s: float = Field(10.0, gt=0, description="At most one push / textfile write per this many seconds.")


class TrackingConfig(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else a store in the working folder.")
    experiment: str | None = Field(None, description="Defaults to the ablation name (or 'alignlab').")
    flush_timeout_s: float = Field(30.0, gt=0, description="At most this long the end of a run (and its start) "
                                   "waits for an MLflow store that does not answer; what is left waits in the run "
                                   "folder's tracking-spool.jsonl (alignlab tracking replay RUN_DIR).")
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)


class ExperimentConfig(_Strict):
    name: str = Field("experiment", description="Run name; `alignlab train` writes to output_dir/<name>/seed-<n>.")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    output_dir: str = Field("runs", min_length=1, description="Root of the run folders; absolute or outside the "
                            "working folder is allowed, with a notice.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    unimodal: UnimodalKDConfig | None = Field(None, description="Train one tower by layer-averaged distillation "
                                              "instead of the image-text objective.")
    vq: ImageVQConfig | None = Field(None, description="Train the image VQ of a teacher's CLS instead of the "
                                     "image-text objective.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_path_name(value, "name")

    @model_validator(mode="after")
    def _image_size_matches_tower(self) -> "ExperimentConfig":
        tower_size = self.model.image.kwargs.get("img_size")
        if tower_size is not None and tower_size != self.data.image_size:
            raise ValueError(f"data.image_size={self.data.image_size} but model.image.kwargs.img_size={tower_size}: "
                             "set both to the same size")
        return self

    @model_validator(mode="after")
    def _distribution_distill_needs_infonce(self) -> "ExperimentConfig":
        if self.distill.distribution.enabled and self.loss.name != "infonce":
            raise ValueError(f"distill.distribution mixes soft labels into InfoNCE, but loss.name={self.loss.name}: "
                             "set loss.name=infonce or distill.distribution.enabled=false")
        return self

    @model_validator(mode="after")
    def _student_and_knowledge_go_together(self) -> "ExperimentConfig":
        kd, student = self.distill.knowledge.kind, self.model.student
        if kd != "off" and student is None:
            raise ValueError(f"distill.knowledge.kind={kd} trains the thesis' student: set model.student "
                             "(e.g. {shared: mlp, out_dim: <teacher classes or CLS width>})")
        if student is not None:
            others = [name for name, on in (("distill.concepts", bool(self.distill.concepts.names)),
                                            ("distill.embedding", self.distill.embedding.enabled),
                                            ("distill.distribution", self.distill.distribution.enabled),
                                            (f"loss.name={self.loss.name}", self.loss.name != "infonce")) if on]
            if others:
                raise ValueError(f"model.student trains with multi-layer InfoNCE and distill.knowledge only; "
                                 f"turn off {', '.join(others)}")
            k = self.distill.knowledge
            per_step = [name for name, on in (("distill.knowledge.momentum", k.momentum.enabled),
                                              ("distill.knowledge.student_bank_size", k.student_bank_size > 0),
                                              ("distill.knowledge.itm", k.itm.negatives != "off"),
                                              ("distill.knowledge.kind=tcmli", kd == "tcmli")) if on]
            if per_step and self.train.accumulation_steps > 1:  # EMA, queues and negatives would move per micro-batch
                raise ValueError(f"train.accumulation_steps > 1 is exact for SHRe, S-SMKE and CTL only; "
                                 f"{per_step[0]} needs it at 1")
            if kd == "tcmli" and student.shared != "block":
                raise ValueError("distill.knowledge.kind=tcmli regresses token sequences: set model.student.shared=block")
            if kd == "tcmli" and self.distill.cache is not None:
                raise ValueError("distill.knowledge.kind=tcmli needs the teacher's tokens, which no cache holds: set "
                                 "distill.cache=null and distill.teacher")
        return self

    @model_validator(mode="after")
    def _single_modality_tasks(self) -> "ExperimentConfig":
        """unimodal / vq replace the image-text objective: nothing of it may be asked for beside them."""
        tasks = [name for name in ("unimodal", "vq") if getattr(self, name) is not None]
        if len(tasks) > 1:
            raise ValueError("unimodal and vq are two different training tasks: set one of them to null")
        if self.eval.image_classifier is not None and (self.unimodal is None or self.unimodal.modality != "image"):
            raise ValueError("eval.image_classifier evaluates the image tower of a unimodal image run: set "
                             "unimodal.modality=image or eval.image_classifier=null")
        if not tasks:
            return self
        if self.model.student is not None or self.distill.enabled:
            raise ValueError(f"{tasks[0]} trains its own objective: set model.student=null and turn distill off "
                             "(its teacher is given in the section itself)")
        if self.train.accumulation_steps > 1:
            raise ValueError(f"{tasks[0]} does not support train.accumulation_steps > 1: set it to 1")
        if self.unimodal is not None and self.unimodal.modality == "text" and self.model.text.kind != "hf":
            raise ValueError("unimodal.modality=text distils a transformers text tower: set model.text.kind=hf "
                             "(model.text.hf_name_or_path: the teacher's directory, hf_layers: the student's depth)")
        return self


# --------------------------------------------------------------------------------------------- loading

def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed value); the value is read as YAML so numbers, lists and null work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value (e.g. train.lr=1e-4)")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({describe_yaml_error(err)})") from None
    return key.strip(), value


def set_dotted(tree: dict, path: str, value: Any) -> dict:
    """Set `tree[a][b][c] = value` for path "a.b.c", creating intermediate dicts (returns a new dict)."""
    out = copy.deepcopy(tree)
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {path!r}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = value
    return out


def apply_overrides(tree: dict, overrides: dict[str, Any] | list[str]) -> dict:
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else list(overrides.items())
    for path, value in items:
        tree = set_dotted(tree, path, value)
    return tree


def load_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML file (YAML 1.2, duplicate keys refused); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                          f"{path} is not a file (expected a YAML config)")
    try:
        data = load_yaml_text(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected a YAML config)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML at {describe_yaml_error(err)}") from None
    if data is None:
        raise ConfigError(f"{path} is empty: write at least one setting (e.g. `name: my-run`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate_config(tree: dict, source: str = "config") -> ExperimentConfig:
    """Validate a raw config tree, turning pydantic's errors into one message naming each field path."""
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
            got = e.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) and got is not None else ""
            lines.append(f"  {loc + ': ' if loc else ''}{e['msg']}{got_text}")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> ExperimentConfig:
    tree = load_yaml(path) if path else {}
    tree = apply_overrides(tree, overrides or [])
    return validate_config(tree, source=str(path or "config"))


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return cfg.model_dump(mode="json")


def check_inside(path: str | Path, root: str | Path, what: str) -> Path:
    """`path` if it lies inside `root` (lexically: `..` resolved, symlinks kept), else ConfigError."""
    resolved, base = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    if not resolved.is_relative_to(base):
        raise ConfigError(f"{what} {path} lies outside its output root {root}: check the run and arm names")
    return Path(path)


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """Where `alignlab train` writes a config without --run-dir: output_dir/<name, '/' -> '_'>/seed-<n>."""
    run_dir = Path(cfg.output_dir) / cfg.name.replace("/", "_") / f"seed-{cfg.seed}"
    return check_inside(run_dir, cfg.output_dir, "run folder")


def output_dir_notice(output_dir: str | Path) -> str | None:
    """A one-line notice when `output_dir` is absolute or leaves the working folder (allowed: runs on a shared
    volume are common, but a typo like `../..` should be seen), else None."""
    path = Path(output_dir)
    inside = Path(os.path.abspath(path)).is_relative_to(Path.cwd())
    if path.is_absolute() or not inside:
        where = "outside the working folder" if not inside else "an absolute path"
        return f"output_dir {output_dir} is {where}; run folders are written under {os.path.abspath(path)}"
    return None
