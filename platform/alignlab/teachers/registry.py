"""Frozen vision teachers behind one interface (docs/methods.md "DiHT concept distillation" and "S-SMKE": teachers and
their targets).

`load_teacher(source)` turns any of these into a `Teacher`:

- `"timm:<name>"`: a timm model built by name (random weights unless `pretrained=True`, which downloads
  timm's default weights; tests never ask for that). `kwargs=` go to `timm.create_model`.
- a local timm checkpoint file, with the architecture given as `arch="timm:<name>"` (and `kwargs=`); a
  classifier in the checkpoint is kept and gives the "logits" target.
- `"hf:<local dir>"`: a transformers vision model written by `save_pretrained` (no hub downloads). The
  embedding is the final layer's CLS token before the model's last norm (hidden_states[-1][:, 0], as the
  thesis' released BEiT v2 code takes it); an `*ForImageClassification` model also gives "logits".
- a folder written by `alignlab teacher train` (teacher.json + teacher.pth): timm backbone, concept heads
  ("objects", "attributes") and the true-label head ("logits").
- an alignlab dual-encoder checkpoint (`final.pt` / `step-*.pt`): its image tower; the embedding is the
  tower's pooled feature (before the projection).

Every teacher is frozen and in eval mode. `forward(images, input_mean=..., input_std=...)` takes images
normalised with the STUDENT's mean/std, maps them to the teacher's own normalisation (one per-channel affine
map, skipped when both agree) and resizes them to the teacher's `image_size` when it differs, so the student
data pipeline never has to know about the teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

TARGET_NAMES = ("objects", "attributes", "logits", "embedding")
CONCEPT_HEADS = ("objects", "attributes")
TEACHER_JSON = "teacher.json"
TEACHER_WEIGHTS = "teacher.pth"
BACKBONE_WEIGHTS = "backbone.pth"
HF_DEFAULT_MEAN = (0.5, 0.5, 0.5)  # transformers' ViTImageProcessor default (IMAGENET_STANDARD_MEAN/STD)
HF_DEFAULT_STD = (0.5, 0.5, 0.5)

Stats = tuple[float, float, float]


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order: equal weights give
    equal hashes whatever the save format or device."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{name}|{tensor.dtype}|{tuple(state_dict[name].shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class Teacher(nn.Module):
    """A frozen image model that returns distillation targets for student-normalised images.

    `backbone(images) -> (embedding [B, D], logits [B, C] | None)` takes teacher-normalised images of
    `image_size`; `heads` are linear concept heads on the embedding ("objects", "attributes").
    Attributes: `mean`, `std`, `image_size`, `weights_hash`, `target_names`, `concepts` (head name ->
    class names), `label_names` (names of the "logits" classes when known, else []), `source`.
    """

    def __init__(self, backbone: nn.Module, *, mean: Sequence[float], std: Sequence[float], image_size: int,
                 has_logits: bool, heads: dict[str, nn.Linear] | None = None,
                 concepts: dict[str, list[str]] | None = None, label_names: list[str] | None = None,
                 source: str = ""):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"teacher {source}: mean/std must be 3 channel values with std > 0, got {mean}/{std}")
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads or {})
        unknown = set(self.heads) - set(CONCEPT_HEADS)
        if unknown:
            raise ValueError(f"teacher {source}: unknown concept head(s) {sorted(unknown)}; use {CONCEPT_HEADS}")
        self.mean: Stats = tuple(float(v) for v in mean)
        self.std: Stats = tuple(float(v) for v in std)
        self.image_size = int(image_size)
        self.has_logits = has_logits
        self.concepts = {name: list(names) for name, names in (concepts or {}).items()}
        for name, head in self.heads.items():
            if name in self.concepts and len(self.concepts[name]) != head.out_features:
                raise ValueError(f"teacher {source}: head {name!r} has {head.out_features} outputs but "
                                 f"{len(self.concepts[name])} concept names")
        self.label_names = list(label_names or [])
        self.source = source
        self.target_names = tuple(name for name in TARGET_NAMES
                                  if name in self.heads or name == "embedding" or (name == "logits" and has_logits))
        self.requires_grad_(False)
        self.eval()
        self.weights_hash = state_dict_hash(self.state_dict())

    def train(self, mode: bool = True) -> "Teacher":
        """A teacher stays in eval mode (frozen BN statistics, no dropout) whatever its parent module does."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (f"source={self.source!r}, image_size={self.image_size}, targets={self.target_names}, "
                f"weights_hash={self.weights_hash[:12]}")

    def prepare(self, images: torch.Tensor, input_mean: Sequence[float], input_std: Sequence[float]) -> torch.Tensor:
        """Student-normalised images -> the teacher's normalisation and size.

        x_raw = x * s_std + s_mean, x_teacher = (x_raw - t_mean) / t_std, folded into one affine map per
        channel. Resizing (bicubic, antialiased) follows; both are linear, so their order only matters at
        the image border (none here)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        s_mean, s_std = tuple(float(v) for v in input_mean), tuple(float(v) for v in input_std)
        if len(s_mean) != 3 or len(s_std) != 3:
            raise ValueError(f"input_mean/input_std need 3 channel values, got {s_mean}/{s_std}")
        if (s_mean, s_std) != (self.mean, self.std):
            scale = torch.tensor([s / t for s, t in zip(s_std, self.std)], dtype=images.dtype, device=images.device)
            shift = torch.tensor([(sm - tm) / t for sm, tm, t in zip(s_mean, self.mean, self.std)],
                                 dtype=images.dtype, device=images.device)
            images = images * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=True)
        return images

    @torch.no_grad()
    def forward(self, images: torch.Tensor, *, input_mean: Sequence[float],
                input_std: Sequence[float]) -> dict[str, torch.Tensor]:
        """{"embedding": [B, D], "logits": [B, C] (if the backbone has a classifier), "objects"/"attributes":
        concept-head logits} for images normalised with `input_mean`/`input_std` (the student's)."""
        embedding, logits = self.backbone(self.prepare(images, input_mean, input_std))
        out = {"embedding": embedding}
        if logits is not None:
            out["logits"] = logits
        for name, head in self.heads.items():
            out[name] = head(embedding)
        return out


    @torch.no_grad()
    def tokens(self, images: torch.Tensor, *, input_mean: Sequence[float],
               input_std: Sequence[float]) -> torch.Tensor:
        """The backbone's final token sequence [B, 1 + N, D] (timm `forward_features`: CLS first, after the final
        norm), the targets of the thesis' T-CMLI; a timm ViT-like backbone only."""
        if not isinstance(self.backbone, TimmBackbone):  # online only: a cache would hold [N, 1 + P, D] per target
            raise ValueError(f"teacher {self.source} is not a timm model: it gives no token sequence")
        tokens = self.backbone.model.forward_features(self.prepare(images, input_mean, input_std))
        if tokens.ndim != 3:
            raise ValueError(f"teacher {self.source} gives features of shape {tuple(tokens.shape)}, not tokens "
                             "[B, 1 + N, D]: use a ViT-like teacher")
        return tokens


class TimmBackbone(nn.Module):
    """A timm model -> (pre-logits pooled features, classifier logits or None when num_classes == 0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def num_features(self) -> int:
        return self.model.num_features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.model.forward_features(images)
        embedding = self.model.forward_head(features, pre_logits=True)
        logits = self.model.forward_head(features) if getattr(self.model, "num_classes", 0) else None
        return embedding, logits


class HFBackbone(nn.Module):
    """A transformers vision model -> (final-layer CLS before the last norm, logits or None)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.has_logits = hasattr(model, "classifier") or type(model).__name__.endswith("ForImageClassification")

    @property
    def num_features(self) -> int:
        return self.model.config.hidden_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(pixel_values=images, output_hidden_states=True)
        embedding = out.hidden_states[-1][:, 0]
        return embedding, (out.logits if self.has_logits else None)


def _timm_image_size(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """The input side the model was built for: img_size kwarg, the patch embedding's size, else its cfg."""
    size = kwargs.get("img_size")
    if size is None and getattr(model, "patch_embed", None) is not None:
        size = getattr(model.patch_embed, "img_size", None)
    if size is None:
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _timm_name(arch: str | None, source: str) -> str:
    import timm

    if not arch:
        raise ValueError(f"teacher {source}: a checkpoint file needs its architecture: pass arch='timm:<name>' "
                         "(CLI: --arch timm:<name>) with the kwargs it was built with")
    name = arch.removeprefix("timm:")
    if not timm.is_model(name):
        raise ValueError(f"teacher arch {arch!r} is not a timm model; list candidates with timm.list_models('*vit*')")
    return name


def _timm_teacher(name: str, kwargs: dict[str, Any], pretrained: bool, checkpoint: Path | None, *, source: str,
                  mean: Sequence[float] | None, std: Sequence[float] | None, image_size: int | None) -> Teacher:
    import timm

    build = dict(kwargs)
    state_dict = None
    if checkpoint is not None:
        state_dict = timm.models.load_state_dict(str(checkpoint))
        probe = timm.create_model(name, pretrained=False, **{k: v for k, v in build.items() if k != "num_classes"})
        classifier = probe.pretrained_cfg.get("classifier")
        classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
        head = state_dict.get(f"{classifier}.weight") if classifier else None
        build.setdefault("num_classes", int(head.shape[0]) if head is not None else 0)
    model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **build)
    if state_dict is not None:
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise ValueError(f"teacher checkpoint {checkpoint} does not fit timm model {name!r} with kwargs "
                             f"{kwargs} (was it saved from the same architecture?): {error}") from error
    cfg = model.pretrained_cfg
    return Teacher(TimmBackbone(model), mean=mean or cfg.get("mean", HF_DEFAULT_MEAN),
                   std=std or cfg.get("std", HF_DEFAULT_STD), image_size=image_size or _timm_image_size(model, build),
                   has_logits=bool(model.num_classes), source=source)


def _hf_teacher(directory: Path, *, source: str, mean, std, image_size) -> Teacher:
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    if not directory.is_dir():
        raise FileNotFoundError(f"teacher {source}: {directory} is not a directory; write the model there with "
                                "save_pretrained (hub names are not downloaded: save the model locally first)")
    config = AutoConfig.from_pretrained(directory)
    is_classifier = any(a.endswith("ForImageClassification") for a in (config.architectures or []))
    model, loading = (AutoModelForImageClassification if is_classifier else AutoModel).from_pretrained(
        directory, output_loading_info=True)
    # transformers initialises what the files lack at random and drops what it does not know, with a log
    # line; a teacher must be exactly what was saved (as the timm path's strict load).
    unfit = {kind: sorted(map(str, loading.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys",
                                                                          "mismatched_keys")}
    if any(unfit.values()):
        found = "; ".join(f"{kind} {keys[:4]}{' ...' if len(keys) > 4 else ''}" for kind, keys in unfit.items() if keys)
        raise ValueError(f"teacher {source}: the weights in {directory} do not fit its config.json ({found}): save "
                         f"the model and its config together with save_pretrained")
    processor_file = directory / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    if (mean is None or std is None) and not processor:
        log.warning("teacher %s has no preprocessor_config.json: assuming mean/std %s/%s (pass mean=, std= "
                    "or save the image processor next to the model)", source, HF_DEFAULT_MEAN, HF_DEFAULT_STD)
    size = image_size or getattr(config, "image_size", None) or (processor.get("size") or {}).get("height", 224)
    backbone = HFBackbone(model)
    return Teacher(backbone, mean=mean or processor.get("image_mean", HF_DEFAULT_MEAN),
                   std=std or processor.get("image_std", HF_DEFAULT_STD), image_size=int(size),
                   has_logits=backbone.has_logits, source=source)


def _folder_teacher(directory: Path, *, source: str) -> Teacher:
    """A folder written by `alignlab teacher train`: rebuild from teacher.json, load teacher.pth."""
    import timm

    meta_path, weights = directory / TEACHER_JSON, directory / TEACHER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"teacher folder {directory} has {TEACHER_JSON} but no {TEACHER_WEIGHTS}: "
                                "the training did not finish; run `alignlab teacher train` again")
    meta = json.loads(meta_path.read_text())
    try:
        arch, kwargs, concepts = meta["arch"], meta.get("kwargs", {}), meta.get("concepts", {})
        label_names = meta.get("label_names", [])
        mean, std, image_size = meta["normalization"]["mean"], meta["normalization"]["std"], meta["image_size"]
    except KeyError as missing:
        raise ValueError(f"{meta_path} lacks field {missing}; it was not written by `alignlab teacher train`") from None
    name = _timm_name(arch, str(meta_path))
    model = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": len(label_names)})
    heads = {head: nn.Linear(model.num_features, len(names)) for head, names in concepts.items()}
    teacher = Teacher(TimmBackbone(model), mean=mean, std=std, image_size=image_size, has_logits=bool(label_names),
                      heads=heads, concepts=concepts, label_names=label_names, source=source)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights} does not match {meta_path} (written by different runs?): {error}") from error
    teacher.weights_hash = state_dict_hash(teacher.state_dict())
    return teacher


def _dual_encoder_teacher(path: Path, state: dict, *, source: str, mean, std, image_size) -> Teacher:
    """The image tower of an alignlab checkpoint ({"model": state dict, "config": experiment config})."""
    import timm

    from alignlab.config import validate_config
    from alignlab.data.transforms import CLIP_MEAN, CLIP_STD

    cfg = validate_config(state["config"], source=str(path))
    image = cfg.model.image
    model = timm.create_model(image.name, pretrained=False, num_classes=0, **image.kwargs)
    prefix = "image_tower.model."
    tower = {key[len(prefix):]: value for key, value in state["model"].items() if key.startswith(prefix)}
    if not tower:
        raise ValueError(f"checkpoint {path} has no '{prefix}*' weights: not an alignlab dual-encoder checkpoint")
    try:
        model.load_state_dict(tower, strict=True)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path}: image tower weights do not fit its own config: {error}") from error
    return Teacher(TimmBackbone(model), mean=mean or CLIP_MEAN, std=std or CLIP_STD,
                   image_size=image_size or cfg.data.image_size, has_logits=False, source=source)


def load_teacher(source: str, *, arch: str | None = None, kwargs: dict[str, Any] | None = None,
                 pretrained: bool = False, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 image_size: int | None = None) -> Teacher:
    """A frozen `Teacher` from `source` (see the module docstring for the accepted forms).

    arch / kwargs: the timm architecture ("timm:<name>") and `create_model` kwargs of a checkpoint file
    (kwargs also apply to "timm:<name>"). pretrained: download timm's default weights for "timm:<name>"
    (needs network; never the default). mean / std / image_size override what the teacher declares."""
    source = str(source)
    kwargs = dict(kwargs or {})
    overrides = {"mean": mean, "std": std, "image_size": image_size}
    if source.startswith("timm:"):
        name = _timm_name(source, source)
        return _timm_teacher(name, kwargs, pretrained, None, source=source, **overrides)
    if source.startswith("hf:"):
        return _hf_teacher(Path(source[3:]).expanduser(), source=source, **overrides)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / TEACHER_JSON).is_file():
            return _folder_teacher(path, source=source)
        raise ValueError(f"teacher folder {path} has no {TEACHER_JSON}; for a transformers model pass "
                         f"'hf:{path}', for a teacher write one with `alignlab teacher train`")
    if not path.is_file():
        raise FileNotFoundError(f"teacher source {source!r} is neither 'timm:<name>', 'hf:<dir>', a teacher folder "
                                "nor an existing checkpoint file")
    if arch:
        return _timm_teacher(_timm_name(arch, source), kwargs, False, path, source=source, **overrides)
    from alignlab.storage.torch_files import load_checkpoint

    state = load_checkpoint(path)  # weights-only: a teacher file from elsewhere cannot run code
    if isinstance(state, dict) and "model" in state and "config" in state:
        return _dual_encoder_teacher(path, state, source=source, **overrides)
    raise ValueError(f"teacher checkpoint {path} is not an alignlab checkpoint (no 'model' and 'config'); "
                     "for a timm state dict pass arch='timm:<name>' (CLI: --arch) and its kwargs")


