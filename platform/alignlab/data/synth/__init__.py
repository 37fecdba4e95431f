"""SynthCaps: a small synthetic image-caption benchmark with controllable caption noise (docs/data-formats.md;
caption complexity and actions as in DiHT's CAT, docs/methods.md "CAT filtering").

`SynthCapsConfig` (settings, pydantic only) loads without the generator; `generate_synthcaps` and
`format_prompt` load it (PIL, storage) on first use, so configs and the CLI parser stay light."""

from alignlab.data.synth.config import SynthCapsConfig

__all__ = ["SynthCapsConfig", "format_prompt", "generate_synthcaps"]


def __getattr__(name: str):
    if name == "generate_synthcaps":
        from alignlab.data.synth.generator import generate_synthcaps

        return generate_synthcaps
    if name == "format_prompt":
        from alignlab.data.prompts import format_prompt

        return format_prompt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
