"""Image transforms whose randomness comes only from a passed `random.Random` (docs/methods.md "CLIP").

Train: random resized crop (thesis crop scale [0.9, 1.0] by default; [0.08, 1] is the torchvision and
CLIP default), optional horizontal flip, CLIP normalisation. Eval: resize the shorter side, centre crop.
Because every random draw uses the stream that PairDataset seeds from the sample's aug seed, a batch
is the same whatever the number of DataLoader workers.

The draws use Python's `random.Random` (a few hundred nanoseconds each) rather than a torch.Generator and
one-element tensors (a few microseconds each plus a tensor per draw: 17 % of a 64 px sample). The stream
changed with that: a seed crops differently from alignlab versions that drew from a torch.Generator.
"""

import math
import random
from functools import lru_cache, partial

import numpy as np
import torch
from PIL import Image
import torchvision.transforms.functional as F
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random | None,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's RandomResizedCrop.get_params algorithm,
    drawn from `rng` (None: Python's global stream).

    The crop covers a fraction of the image area drawn uniformly from `scale`, with an aspect ratio
    drawn log-uniformly from `ratio`; after 10 rejected draws it falls back to a centre crop.
    """
    rng = _stream(rng)
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _stream(rng: random.Random | None) -> random.Random:
    if rng is None:
        return random._inst  # the module-level stream behind random.random()
    if not isinstance(rng, random.Random):
        raise TypeError(f"image transforms draw from a random.Random (seeded per sample), got {type(rng).__name__}: "
                        "pass random.Random(seed)")
    return rng


@lru_cache(maxsize=8)
def _scale_shift(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)


def to_normalized_tensor(image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """`F.normalize(F.to_tensor(image), mean, std)` for an RGB PIL image, the same operations on the same
    values (bit for bit) without torchvision's per-call checks and tensor conversions of mean and std."""
    mean_t, std_t = _scale_shift(tuple(mean), tuple(std))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return pixels.float().div_(255).sub_(mean_t).div_(std_t)


def _random_resized_crop(image, rng=None, *, image_size, crop_scale, crop_ratio, hflip, mean, std) -> torch.Tensor:
    image = image.convert("RGB") if image.mode != "RGB" else image
    rng = _stream(rng)
    top, left, h, w = sample_crop_box(image.width, image.height, crop_scale, crop_ratio, rng)
    # PIL's crop + bicubic resize (what F.resized_crop runs for a PIL image, without its wrappers)
    image = image.crop((left, top, left + w, top + h)).resize((image_size, image_size), Image.BICUBIC)
    # Draw the flip only when flipping is on, so hflip=0 leaves the stream as the crop left it.
    if hflip > 0 and rng.random() < hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_normalized_tensor(image, mean, std)


def _eval_transform(image, rng=None, *, image_size, mean, std) -> torch.Tensor:
    image = image.convert("RGB") if image.mode != "RGB" else image
    image = F.resize(image, image_size, InterpolationMode.BICUBIC, antialias=True)
    image = F.center_crop(image, [image_size, image_size])
    return to_normalized_tensor(image, mean, std)


def build_image_transform(
    image_size: int,
    train: bool,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    hflip: float = 0.0,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
):
    """A picklable callable `(pil_image, rng: random.Random | None) -> float tensor [3, image_size, image_size]`.

    train=True: random resized crop (`crop_scale`, `crop_ratio`) then a flip with probability `hflip`,
    all drawn from `rng` (None = Python's global stream). train=False ignores `rng`.
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
        _random_resized_crop,
        image_size=image_size,
        crop_scale=tuple(crop_scale),
        crop_ratio=tuple(crop_ratio),
        hflip=hflip,
        mean=mean,
        std=std,
    )
