"""Readers for evaluation data on disk (SynthCaps layout, docs/data-formats.md).

Both formats are the ones real benchmarks use too: COCO-captions JSON for retrieval (so the Karpathy COCO
5K / Flickr 1K test files load unchanged) and one folder per class for classification.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from error


def load_coco_captions(images_dir, captions_json) -> tuple[list[Path], list[str], Tensor]:
    """Read a COCO-captions file: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}.

    Returns image paths (images_dir / file_name, in the order of "images"), captions (in the order of
    "annotations", whitespace-stripped) and text_to_image, a LongTensor with each caption's index into the
    image list. Every image must exist on disk and have at least one caption.
    """
    images_dir, captions_json = Path(images_dir), Path(captions_json)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"retrieval image folder not found: {images_dir}")
    data = _read_json(captions_json, "captions file")
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{captions_json} must hold COCO-captions lists 'images' and 'annotations'")

    try:
        position = {image["id"]: i for i, image in enumerate(data["images"])}
        paths = [images_dir / image["file_name"] for image in data["images"]]
        captions = [str(annotation["caption"]).strip() for annotation in data["annotations"]]
        owners = [annotation["image_id"] for annotation in data["annotations"]]
    except KeyError as error:
        raise ValueError(f"{captions_json}: an image or annotation entry lacks the field {error}") from error
    if len(position) != len(paths):
        raise ValueError(f"{captions_json}: image ids in 'images' are not unique")
    unknown = sorted({owner for owner in owners if owner not in position}, key=str)
    if unknown:
        raise ValueError(f"{captions_json}: annotations refer to image ids {unknown[:5]} missing from 'images'")
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {captions_json} are missing, e.g. {missing[0]}")
    text_to_image = torch.tensor([position[owner] for owner in owners], dtype=torch.long)
    captionless = set(range(len(paths))) - set(text_to_image.tolist())
    if captionless:
        example = data["images"][min(captionless)]["id"]
        raise ValueError(f"{captions_json}: {len(captionless)} images have no caption (e.g. image id {example}); "
                         "retrieval needs at least one caption per image")
    return paths, captions, text_to_image


def load_class_folders(root, split: str) -> tuple[list[Path], Tensor, list[str], list[str]]:
    """Read `<root>/classes.json` and `<root>/<split>/<class_index:03d>_<classname>/*.png` (docs/data-formats.md).

    The class index is the number before the first underscore of the folder name and must agree with
    classes.json (folder name = classname with spaces -> underscores). Returns image paths (sorted by
    class, then file name), labels (LongTensor), classnames and templates from classes.json.
    """
    root = Path(root)
    spec = _read_json(root / "classes.json", "class list")
    classnames, templates = spec.get("classnames"), spec.get("templates")
    if not classnames or not templates:
        raise ValueError(f"{root / 'classes.json'} must give non-empty 'classnames' and 'templates' lists")
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir} (expected one of train/val/test)")

    paths: list[Path] = []
    labels: list[int] = []
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        prefix, _, name = folder.name.partition("_")
        if not prefix.isdigit() or int(prefix) >= len(classnames):
            raise ValueError(f"class folder {folder} must be named <class_index>_<classname> with an index "
                             f"below {len(classnames)} (the classes in {root / 'classes.json'})")
        label = int(prefix)
        if name != classnames[label].replace(" ", "_"):
            raise ValueError(f"class folder {folder} does not match class {label} "
                             f"{classnames[label]!r} of {root / 'classes.json'}")
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths.extend(images)
        labels.extend([label] * len(images))
    if not paths:
        raise ValueError(f"no images found under {split_dir}")
    return paths, torch.tensor(labels, dtype=torch.long), list(classnames), list(templates)
