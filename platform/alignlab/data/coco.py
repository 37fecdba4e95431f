"""COCO captions JSON + image folder -> image-caption samples (PSD's COCO pretraining, docs/methods.md "PSD").

One sample per image carrying all its captions; PairDataset picks one of them at random on every
visit, from the sample's aug seed ("COCO pretraining picks one of the five captions at random each
time"). SynthCaps retrieval splits use the same format (docs/data-formats.md).
"""

import json
import logging
from collections import defaultdict
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)


class CocoCaptions:
    """Samples of a COCO captions file: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}.

    `captions_file` may be the JSON file or a folder holding `captions.json`. `image_root` is the folder
    `file_name` is relative to; by default `images/` next to the JSON (the SynthCaps layout). Images with
    no caption are left out and counted in `num_uncaptioned`.
    """

    def __init__(self, captions_file, image_root=None):
        path = Path(captions_file)
        if path.is_dir():
            path = path / "captions.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"COCO captions file {path} not found (e.g. <synthcaps>/retrieval/test/captions.json)"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        for field in ("images", "annotations"):
            if field not in data:
                raise ValueError(
                    f"{path}: no top-level {field!r} list; a COCO captions file has 'images' and 'annotations'"
                )
        self.image_root = Path(image_root) if image_root is not None else path.parent / "images"
        if not self.image_root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_root} for {path} not found; pass image_root=<folder of the images>"
            )

        captions = defaultdict(list)
        for n, annotation in enumerate(data["annotations"]):
            for field in ("image_id", "caption"):
                if field not in annotation:
                    raise ValueError(f"{path}: annotations[{n}] has no {field!r} field")
            captions[annotation["image_id"]].append(annotation["caption"])

        self.image_ids, self.file_names, self.captions = [], [], []
        self.num_uncaptioned = 0
        for n, image in enumerate(data["images"]):
            for field in ("id", "file_name"):
                if field not in image:
                    raise ValueError(f"{path}: images[{n}] has no {field!r} field")
            if not captions.get(image["id"]):
                self.num_uncaptioned += 1
                continue
            self.image_ids.append(image["id"])
            self.file_names.append(image["file_name"])
            self.captions.append(captions[image["id"]])
        if self.num_uncaptioned:
            log.warning("%s: %d image(s) without captions left out", path, self.num_uncaptioned)
        orphans = len(set(captions) - {image["id"] for image in data["images"]})
        if orphans:
            log.warning("%s: captions for %d image id(s) missing from 'images' ignored", path, orphans)
        self.path = path

    def __len__(self) -> int:
        return len(self.image_ids)

    def get(self, index: int) -> tuple[Image.Image, list[str], dict]:
        """(RGB image, all captions of the image, {"image_id", "file_name"})."""
        image_path = self.image_root / self.file_names[index]
        if not image_path.is_file():
            raise FileNotFoundError(f"image {image_path} (image_id {self.image_ids[index]} of {self.path}) not found")
        image = Image.open(image_path).convert("RGB")
        meta = {"image_id": self.image_ids[index], "file_name": self.file_names[index]}
        return image, list(self.captions[index]), meta
