"""Named model presets (timm style) and the builder that turns plain dicts into a `DualEncoder`.

A preset is a small registered function returning the keyword arguments of `build_dual_encoder`:
`build_dual_encoder(**get_preset("vit-b-32"))`. Architectures follow DiHT Table A.1.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from alignlab.models.dual_encoder import DualEncoder
from alignlab.models.text_transformer import CLIP_VOCAB_SIZE, TextTransformer
from alignlab.models.towers import HFTextTower, ImageTower

_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {}


def register_preset(name: str) -> Callable:
    """Decorator: register a zero-argument function returning `build_dual_encoder` kwargs under `name`."""

    def decorator(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        if name in _PRESETS:
            raise ValueError(f"model preset {name!r} is already registered")
        _PRESETS[name] = fn
        return fn

    return decorator


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    """A fresh dict of `build_dual_encoder` kwargs for the preset `name`."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {list_presets()}")
    return _PRESETS[name]()


def build_dual_encoder(
    *,
    embed_dim: int,
    image: dict[str, Any],
    text: dict[str, Any],
    init_logit_scale: float = 1 / 0.07,
    max_logit_scale: float = 100.0,
    projection: str = "linear",
) -> DualEncoder:
    """image = {"name": timm name, "pretrained": False | True | path, "kwargs": {...}};
    text = {"kind": "clip", <TextTransformer fields>} or {"kind": "hf", "source": ..., "pool": ...}."""
    return DualEncoder(
        build_image_tower(image),
        build_text_tower(text),
        embed_dim,
        init_logit_scale=init_logit_scale,
        max_logit_scale=max_logit_scale,
        projection=projection,
    )


def build_image_tower(image: dict[str, Any]) -> ImageTower:
    _check_fields("image", image, {"name", "pretrained", "kwargs", "blocks", "block_selection"})
    if "name" not in image:
        raise ValueError("image needs a 'name' field: a timm model name such as 'vit_base_patch32_224'")
    return ImageTower(image["name"], pretrained=image.get("pretrained", False), blocks=image.get("blocks"),
                      block_selection=image.get("block_selection", "first"), **image.get("kwargs", {}))


def build_text_tower(text: dict[str, Any]) -> nn.Module:
    fields = {key: value for key, value in text.items() if key != "kind"}
    kinds = {"clip": TextTransformer, "hf": HFTextTower}
    kind = text.get("kind")
    if kind not in kinds:
        raise ValueError(f"text kind={kind!r} is not one of {sorted(kinds)}")
    allowed = set(inspect.signature(kinds[kind]).parameters)
    _check_fields(f"text (kind {kind!r})", fields, allowed)
    return kinds[kind](**fields)


def _check_fields(where: str, given: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(given) - allowed
    if unknown:
        raise ValueError(f"unknown {where} field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _clip_text(width: int, layers: int, heads: int, context_length: int = 77) -> dict[str, Any]:
    return {"kind": "clip", "vocab_size": CLIP_VOCAB_SIZE, "context_length": context_length,
            "width": width, "layers": layers, "heads": heads}


@register_preset("tiny")
def tiny() -> dict[str, Any]:
    """For CPU runs on 64x64 SynthCaps: a ViT of width 128 on 8x8 patches (64 tokens) and a matching text
    transformer. One AdamW step on a batch of 128 takes roughly 0.7 s on 2 CPU cores (about 1.1 s with
    vit_tiny's own width 192), so an epoch of 10k pairs trains in about a minute."""
    image_kwargs = {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 128, "num_heads": 4}
    return {"embed_dim": 128, "image": {"name": "vit_tiny_patch16_224", "kwargs": image_kwargs},
            "text": _clip_text(width=128, layers=4, heads=4, context_length=32)}


@register_preset("tiny-resnet")
def tiny_resnet() -> dict[str, Any]:
    """The SynthCaps benchmark recipe's model (docs/results): a quarter-width ResNet-18 (channels 32-256),
    whose average-pooled convolutional features see colour from the first step and small shapes soon
    after, and a 2-layer bidirectional text transformer with mean pooling, sized for a language of ~100
    words (pair it with `model.tokenizer.kind: wordpiece`, a vocabulary trained on the captions). The tiny
    ViT on 8x8 patches learned colour and nothing else on 2 CPU cores."""
    image_kwargs = {"channels": [32, 64, 128, 256], "stem_width": 32}
    text = _clip_text(width=128, layers=2, heads=4, context_length=32) | {"pool": "mean", "causal": False}
    return {"embed_dim": 128, "image": {"name": "resnet18", "kwargs": image_kwargs}, "text": text}


@register_preset("tiny-resnet10-s8")
def tiny_resnet10_s8() -> dict[str, Any]:
    """The SynthCaps benchmark recipe v3's model (docs/benchmark-recipe.md): a quarter-width ResNet-10 (one
    block per stage, channels 32-256) whose last two stages are dilated (timm `output_stride=8`), so a 64 px
    image ends in an 8x8 map instead of 2x2, and the tiny-resnet text tower. The 2x2 map of tiny-resnet held
    zero-shot and linear-probe shape near 30 % after 234 steps; keeping resolution lifts both to 60-70 % in the
    same steps, and dropping the second block of each stage pays for most of the dilation."""
    recipe = tiny_resnet()
    recipe["image"]["kwargs"] |= {"layers": [1, 1, 1, 1], "output_stride": 8}
    return recipe


@register_preset("vit-b-32")
def vit_b_32() -> dict[str, Any]:
    """CLIP ViT-B/32 (about 151.3 M parameters, PSD's model)."""
    return {"embed_dim": 512, "image": {"name": "vit_base_patch32_224"},
            "text": _clip_text(width=512, layers=12, heads=8)}


@register_preset("vit-b-16")
def vit_b_16() -> dict[str, Any]:
    return {"embed_dim": 512, "image": {"name": "vit_base_patch16_224"},
            "text": _clip_text(width=512, layers=12, heads=8)}


@register_preset("vit-l-14")
def vit_l_14() -> dict[str, Any]:
    return {"embed_dim": 768, "image": {"name": "vit_large_patch14_224"},
            "text": _clip_text(width=768, layers=12, heads=12)}
