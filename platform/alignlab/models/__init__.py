"""Models (docs/methods.md "CLIP"): a dual encoder of a timm image tower and a CLIP or Hugging Face text tower.

Build one from a named preset, `build_dual_encoder(**get_preset("tiny"))`, or from plain dicts.
"""

from alignlab.models.dual_encoder import DualEncoder
from alignlab.models.presets import (
    build_dual_encoder,
    build_image_tower,
    build_text_tower,
    get_preset,
    list_presets,
    register_preset,
)
from alignlab.models.text_transformer import TextTransformer
from alignlab.models.towers import HFTextTower, ImageTower

__all__ = [
    "DualEncoder",
    "HFTextTower",
    "ImageTower",
    "TextTransformer",
    "build_dual_encoder",
    "build_image_tower",
    "build_text_tower",
    "get_preset",
    "list_presets",
    "register_preset",
]
