"""The thesis' pair format (docs/data-formats.md): one JSONL file per split, one pair per line.

Each line is {"id" or "sample_id", "image" or "image_path", and "text" or "caption" (a string or a
list of strings) or "tokens" (already tokenised ids)}. Image paths are relative to the JSONL file's
folder unless absolute. The sample id decides positives in retrieval, so it is kept in the metadata.
"""

import json
from pathlib import Path

from PIL import Image

_ID_FIELDS = ("id", "sample_id")
_IMAGE_FIELDS = ("image", "image_path")
_TEXT_FIELDS = ("text", "caption")


def _first_field(record: dict, names: tuple[str, ...]):
    return next((record[name] for name in names if name in record), None)


def _is_caption(value) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and len(value) > 0 and all(isinstance(item, str) for item in value)


class JsonlPairs:
    """Image-caption pairs of one JSONL split file.

    `get(i)` -> (RGB image, caption, {"sample_id", "image_path"[, "tokens"]}). The caption is a string
    or a list of strings (PairDataset picks one per visit); it is None for a line that only has
    "tokens", whose ids PairDataset then uses as they are.
    """

    def __init__(self, jsonl_file):
        self.path = Path(jsonl_file)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL split file {self.path} not found")
        self.sample_ids, self.image_paths, self.captions, self.tokens = [], [], [], []
        with self.path.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    self._add(self._parse(line, line_number), line_number)

    def _where(self, line_number: int) -> str:
        return f"{self.path}, line {line_number}"

    def _parse(self, line: str, line_number: int) -> dict:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self._where(line_number)}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self._where(line_number)}: expected a JSON object, got {type(record).__name__}")
        return record

    def _add(self, record: dict, line_number: int) -> None:
        sample_id = _first_field(record, _ID_FIELDS)
        image = _first_field(record, _IMAGE_FIELDS)
        caption = _first_field(record, _TEXT_FIELDS)
        tokens = record.get("tokens")
        for value, names in ((sample_id, _ID_FIELDS), (image, _IMAGE_FIELDS)):
            if value is None:
                raise ValueError(f"{self._where(line_number)}: missing field {names[0]!r} (or {names[1]!r})")
        if caption is None and tokens is None:
            raise ValueError(f"{self._where(line_number)}: missing field 'text' (or 'caption', or tokenised 'tokens')")
        if caption is not None and not _is_caption(caption):
            raise ValueError(
                f"{self._where(line_number)}: 'text'/'caption' must be a string or a non-empty list of strings"
            )
        if tokens is not None and not (isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens)):
            raise ValueError(f"{self._where(line_number)}: 'tokens' must be a non-empty list of integer token ids")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{self._where(line_number)}: 'image' must be a non-empty path string")
        self.sample_ids.append(sample_id)
        self.image_paths.append(self.path.parent / image)  # an absolute `image` replaces the folder
        self.captions.append(caption)
        self.tokens.append(tokens)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def get(self, index: int) -> tuple[Image.Image, str | list[str] | None, dict]:
        image_path = self.image_paths[index]
        if not image_path.is_file():
            raise FileNotFoundError(f"image {image_path} of sample {self.sample_ids[index]!r} in {self.path} not found")
        meta = {"sample_id": self.sample_ids[index], "image_path": str(image_path)}
        if self.tokens[index] is not None:
            meta["tokens"] = list(self.tokens[index])
        return Image.open(image_path).convert("RGB"), self.captions[index], meta
