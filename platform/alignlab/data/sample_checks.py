"""The checks that decide whether one webdataset sample can be trained on (reasons: `alignlab.data.skips`).

`header_problem` needs only member names and sizes (what a tar header walk or a sidecar index gives), so
the shard index runs it on every sample before training; `decode_caption`, `decode_metadata` and
`decode_image` need the bytes and run when a sample is read. Each returns the value or raises
`CorruptSampleError` naming the shard, the key and what is wrong.
"""

from __future__ import annotations

import io
import json

from PIL import Image

from alignlab.data.skips import CorruptSampleError
from alignlab.data.tar_samples import TarSample

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
KNOWN_EXTENSIONS = (*IMAGE_EXTENSIONS, "txt", "json")


def header_problem(sample: TarSample, max_caption_bytes: int) -> tuple[str, str] | None:
    """(reason, detail) when the sample's members alone show it is unusable, else None.

    The last sample before a shard's early end is lost when the cut went through one of its members or
    left it without image or caption; cut exactly after a complete sample, it is kept."""
    members = sample.members
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if sample.cut is not None and (sample.cut.member is not None or image_ext is None or "txt" not in members):
        return "truncated_shard", sample.cut.detail
    duplicates = [problem for problem in sample.problems if problem.startswith("two ")]
    if duplicates:
        return "duplicate_member", "; ".join(duplicates)
    found = ", ".join(f".{ext}" for ext in members) or "no member"
    strays = [ext for ext in members if ext not in KNOWN_EXTENSIONS] + [p for p in sample.problems if "no extension" in p]
    for missing, reason, wanted in ((image_ext is None, "missing_image", "image (.png/.jpg/.jpeg/.webp)"),
                                    ("txt" not in members, "missing_caption", "caption (.txt)")):
        if missing:  # with a stray member around, the data is probably there under the wrong name
            return ("wrong_extension" if strays else reason), f"no {wanted} member; found {found}"
    if members[image_ext].size == 0:
        return "empty_image", f"{sample.key}.{image_ext} has 0 bytes"
    caption_bytes = members["txt"].size
    if caption_bytes == 0:
        return "empty_caption", f"{sample.key}.txt has 0 bytes"
    if caption_bytes > max_caption_bytes:
        return "caption_too_long", f"{caption_bytes} bytes > data.max_caption_bytes={max_caption_bytes}"
    return None


def decode_caption(data: bytes, shard: str, key: str, index: int | None = None) -> str:
    """The caption text; not UTF-8 or only whitespace is a CorruptSampleError."""
    try:
        caption = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptSampleError("non_utf8_caption", shard, key, f"byte {data[err.start]:#04x} at offset "
                                 f"{err.start} is not UTF-8", index) from None
    if not caption.strip():
        raise CorruptSampleError("empty_caption", shard, key, "the caption is only whitespace", index)
    return caption


def decode_metadata(data: bytes, shard: str, key: str, index: int | None = None) -> dict:
    """The sample's .json member as a dict; anything else is a CorruptSampleError."""
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptSampleError("malformed_metadata", shard, key, f".json is not valid JSON ({err})", index) from None
    if not isinstance(meta, dict):
        raise CorruptSampleError("malformed_metadata", shard, key, f".json holds a {type(meta).__name__}, not an "
                                 "object", index)
    return meta


def decode_image(data: bytes, shard: str, key: str, index: int | None = None) -> Image.Image:
    """The image as RGB, fully decoded (a truncated file fails here, not later in a transform)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            return opened.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise CorruptSampleError("undecodable_image", shard, key, f"{type(err).__name__}: {err}"[:300], index) from None
