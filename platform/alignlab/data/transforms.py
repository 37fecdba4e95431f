"""Image transforms whose randomness comes only from a passed torch.Generator (docs/methods.md "CLIP").

Train: random resized crop (thesis crop scale [0.9, 1.0] by default; [0.08, 1] is the torchvision and
CLIP default), optional horizontal flip, CLIP normalisation. Eval: resize the shorter side, centre crop.
Because every random draw uses the generator that PairDataset seeds from the sample's aug seed, a batch
is the same whatever the number of DataLoader workers.
"""

import math
from functools import partial

import torch
import torchvision.transforms.functional as F
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's RandomResizedCrop.get_params, seeded.

    The crop covers a fraction of the image area drawn uniformly from `scale`, with an aspect ratio
    drawn log-uniformly from `ratio`; after 10 rejected draws it falls back to a centre crop. The
    draws are the same, in the same order, as torchvision's, so a generator seeded like the global
    RNG gives torchvision's box.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _train_transform(image, generator=None, *, image_size, crop_scale, crop_ratio, hflip, mean, std) -> torch.Tensor:
    image = image.convert("RGB") if image.mode != "RGB" else image
    top, left, h, w = sample_crop_box(image.width, image.height, crop_scale, crop_ratio, generator)
    image = F.resized_crop(image, top, left, h, w, [image_size, image_size], InterpolationMode.BICUBIC, antialias=True)
    # Draw the flip only when flipping is on, so hflip=0 leaves the generator stream as the crop left it.
    if hflip > 0 and torch.rand(1, generator=generator).item() < hflip:
        image = F.hflip(image)
    return F.normalize(F.to_tensor(image), mean, std)


def _eval_transform(image, generator=None, *, image_size, mean, std) -> torch.Tensor:
    image = image.convert("RGB") if image.mode != "RGB" else image
    image = F.resize(image, image_size, InterpolationMode.BICUBIC, antialias=True)
    image = F.center_crop(image, [image_size, image_size])
    return F.normalize(F.to_tensor(image), mean, std)


def build_image_transform(
    image_size: int,
    train: bool,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    hflip: float = 0.0,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
):
    """A picklable callable `(pil_image, generator | None) -> float tensor [3, image_size, image_size]`.

    train=True: random resized crop (`crop_scale`, `crop_ratio`) then a flip with probability `hflip`,
    all drawn from the generator (None = torch's global RNG). train=False ignores the generator.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0 < crop_scale[0] <= crop_scale[1]:
        raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high, got {crop_scale}")
    if not 0 < crop_ratio[0] <= crop_ratio[1]:
        raise ValueError(f"crop_ratio must be (low, high) with 0 < low <= high, got {crop_ratio}")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
    if not train:
        return partial(_eval_transform, image_size=image_size, mean=mean, std=std)
    return partial(
        _train_transform,
        image_size=image_size,
        crop_scale=tuple(crop_scale),
        crop_ratio=tuple(crop_ratio),
        hflip=hflip,
        mean=mean,
        std=std,
    )
