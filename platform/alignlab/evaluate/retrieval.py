"""Image-text retrieval metrics: R@K, mean/median rank, the caption-match view of templated captions and the
thesis' average median rank (docs/methods.md, "Evaluation protocols").

Rank convention, shared by every function in this file. A query's rank is 1-based and counts the
candidates that beat its best positive:

    rank = 1 + #{candidates whose similarity is STRICTLY greater than the best positive's similarity}

Ties are therefore resolved in the query's favour (optimistic): a negative that exactly ties the
positive does not push it down, whatever order the candidates are stored in. This makes the metric a pure
function of the similarity values (no dependence on argsort stability or candidate order). For
image->text the "best positive" is the highest-scoring of the image's captions, so the rank is that of the
FIRST correct caption in the ranked list; other captions of the same image never count against it.

Features are assumed L2-normalised, so similarity = dot product = cosine. Similarities are computed in
row chunks and reduced in place: one `chunk_size x num_candidates` block exists at a time (float32: 4
bytes per entry), e.g. 1024 x 25,000 x 4 bytes ~ 100 MB for COCO 5K image->text, never the full matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def as_feature_matrix(features, name: str) -> Tensor:
    """2-D float tensor (half precision is upcast to float32 so that ties are not created by rounding)."""
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [n, d] array, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must hold floating-point features, got dtype {features.dtype}")
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or inf values; check the encoder output")
    return features


def as_text_to_image(text_to_image, num_images: int, num_texts: int, device) -> Tensor:
    index = torch.as_tensor(text_to_image, dtype=torch.long, device=device).reshape(-1)
    if index.numel() != num_texts:
        raise ValueError(f"text_to_image has {index.numel()} entries but there are {num_texts} text features")
    if num_texts and (index.min() < 0 or index.max() >= num_images):
        raise ValueError(f"text_to_image values must lie in [0, {num_images}) (one image index per caption), "
                         f"got range [{int(index.min())}, {int(index.max())}]")
    return index


def caption_table(text_to_image: Tensor, num_images: int) -> Tensor:
    """[num_images, max_captions] caption indices per image, in caption order, padded with -1."""
    counts = torch.bincount(text_to_image, minlength=num_images)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"images {missing} have no caption in text_to_image; image->text retrieval needs at "
                         "least one caption per image (drop caption-less images first)")
    sorted_images, order = torch.sort(text_to_image, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(text_to_image.numel(), device=text_to_image.device) - starts[sorted_images]
    table = torch.full((num_images, int(counts.max())), -1, dtype=torch.long, device=text_to_image.device)
    table[sorted_images, slot] = order
    return table


def query_ranks(queries: Tensor, candidates: Tensor, positives: Tensor, chunk_size: int) -> Tensor:
    """1-based rank of each query's best positive among all candidates (optimistic ties, see module doc).

    positives: [num_queries, P] candidate indices, padded with -1; every row has at least one entry.
    Memory: one `chunk_size x num_candidates` similarity block at a time, reduced in place.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if candidates.dtype == torch.float32 and candidates.shape[0] >= 2**24:
        raise ValueError(f"{candidates.shape[0]} candidates is too many to count exactly in float32; "
                         "pass float64 features")
    chunks = range(0, queries.shape[0], chunk_size)
    return torch.cat([_chunk_ranks(queries[s:s + chunk_size], candidates, positives[s:s + chunk_size]) for s in chunks])


def _chunk_ranks(queries: Tensor, candidates: Tensor, positives: Tensor) -> Tensor:
    # A function of its own so the similarity block is freed on return, before the next chunk's is made.
    sims = queries @ candidates.T
    # Positive scores are read from the same similarity block they are compared against, so the
    # positive never loses to itself through a different floating-point summation order.
    best = sims.gather(1, positives.clamp(min=0)).masked_fill(positives < 0, -torch.inf).amax(1, keepdim=True)
    # Count in place: the block becomes 1.0 where a candidate beats the positive, summed in its own dtype.
    # A bool mask summed as int64 (or a float64 sum of float32) would allocate 2-3x the block again.
    # Sums of ones are exact integers while below 2**24 (float32), which query_ranks checks.
    return 1 + sims.gt_(best).sum(1).long()


def _median(values: Tensor) -> float:
    """numpy median: the mean of the two middle values for an even count (torch.median takes the lower)."""
    return float(np.median(values.cpu().numpy()))


def retrieval_metrics(image_features, text_features, text_to_image, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024) -> dict[str, float]:
    """Full-gallery retrieval over all images x all captions.

    text_to_image[t] is the image index of caption t; an image may have any number (>= 1) of captions.
    Text->image R@K: percentage of captions whose image ranks <= K. Image->text R@K: percentage of images
    with ANY of their captions ranked <= K (the first correct caption). Mean and median rank are those of
    the first correct item, 1-based; ties are optimistic (module docstring). Returns
    `{image_to_text,text_to_image}_R@{k}` (0-100) and `..._mean_rank`, `..._median_rank`.
    """
    image_features = as_feature_matrix(image_features, "image_features")
    text_features = as_feature_matrix(text_features, "text_features").to(image_features)
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features dim {image_features.shape[1]} != text_features dim "
                         f"{text_features.shape[1]}; both towers must project to the same space")
    if any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    text_to_image = as_text_to_image(text_to_image, num_images, num_texts, image_features.device)
    captions = caption_table(text_to_image, num_images)

    ranks = {
        "image_to_text": query_ranks(image_features, text_features, captions, chunk_size),
        "text_to_image": query_ranks(text_features, image_features, text_to_image[:, None], chunk_size),
    }
    metrics: dict[str, float] = {}
    for direction, rank in ranks.items():
        for k in ks:
            metrics[f"{direction}_R@{k}"] = 100.0 * float((rank <= k).double().mean())
    for direction, rank in ranks.items():
        metrics[f"{direction}_mean_rank"] = float(rank.double().mean())
        metrics[f"{direction}_median_rank"] = _median(rank)
    return metrics


def average_recall(metrics: dict[str, float], ks: Sequence[int] = (1, 5, 10)) -> float:
    """The thesis' "Avg R": the mean of the six R@K of `retrieval_metrics` (both directions, K in ks)."""
    return float(np.mean([metrics[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image") for k in ks]))


def padded_rows(rows: Sequence[Sequence[int]], device) -> Tensor:
    """[len(rows), max row length] long tensor of the rows, padded with -1 (the positives format)."""
    table = torch.full((len(rows), max(len(r) for r in rows)), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        table[i, :len(row)] = torch.as_tensor(sorted(row), dtype=torch.long)
    return table.to(device)


def same_caption_positives(captions: Sequence[str], text_to_image: Sequence[int],
                           num_images: int) -> tuple[list[set[int]], list[set[int]]]:
    """Positives when a caption string, not a pair id, decides a match.

    Templated captions repeat: the same string may describe several images, and the strict protocol counts
    every other image with that exact caption as a negative, which caps text->image R@1. Here caption t's
    positives are every image that has a caption identical to t, and image i's positives are every caption
    identical to one of i's captions. Returns (image positives per caption, caption positives per image).
    """
    if len(captions) != len(text_to_image):
        raise ValueError(f"{len(captions)} captions but {len(text_to_image)} text_to_image entries")
    images_of: dict[str, set[int]] = {}
    texts_of: dict[str, set[int]] = {}
    for t, (caption, image) in enumerate(zip(captions, text_to_image)):
        images_of.setdefault(caption, set()).add(int(image))
        texts_of.setdefault(caption, set()).add(t)
    strings_of_image: list[set[str]] = [set() for _ in range(num_images)]
    for caption, image in zip(captions, text_to_image):
        strings_of_image[int(image)].add(caption)
    text_positives = [images_of[caption] for caption in captions]
    image_positives = [set().union(*(texts_of[c] for c in strings)) for strings in strings_of_image]
    return text_positives, image_positives


def caption_match_metrics(image_features, text_features, text_to_image, captions: Sequence[str],
                          ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """R@K and mean rank where any item with an identical caption string counts as correct
    (`same_caption_positives`): the retrieval view with headroom on templated captions. Keys are those of
    `retrieval_metrics` with `_any` after the direction, e.g. `text_to_image_any_R@1`; ranks are those of the
    best positive, ties optimistic, as in the module docstring.
    """
    image_features = as_feature_matrix(image_features, "image_features")
    text_features = as_feature_matrix(text_features, "text_features").to(image_features)
    num_images = image_features.shape[0]
    index = as_text_to_image(text_to_image, num_images, text_features.shape[0], image_features.device)
    caption_table(index, num_images)  # every image needs a caption, as in retrieval_metrics
    text_positives, image_positives = same_caption_positives(list(captions), index.tolist(), num_images)
    ranks = {
        "image_to_text_any": query_ranks(image_features, text_features,
                                         padded_rows(image_positives, image_features.device), chunk_size),
        "text_to_image_any": query_ranks(text_features, image_features,
                                         padded_rows(text_positives, image_features.device), chunk_size),
    }
    metrics = {f"{direction}_R@{k}": 100.0 * float((rank <= k).double().mean())
               for direction, rank in ranks.items() for k in ks}
    metrics.update({f"{direction}_mean_rank": float(rank.double().mean()) for direction, rank in ranks.items()})
    return metrics


AMR_ORDERS = ("random", "contiguous")


def amr_folds(num_images: int, num_folds: int, fold_size: int, seed: int, order: str = "random") -> list[Tensor]:
    """Image indices of each AMR fold: the images cut into folds of fold_size, after a seeded permutation
    ("random") or in their stored order ("contiguous": the thesis' code, chunks of the id-sorted images).

    With fewer than num_folds * fold_size images, floor(n / fold_size) folds are used (the remaining
    images are left out); with fewer than fold_size images, one fold holds every image.
    """
    if order not in AMR_ORDERS:
        raise ValueError(f"AMR fold order {order!r} is not one of {AMR_ORDERS}")
    permutation = (torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)) if order == "random"
                   else torch.arange(num_images))
    if num_images < fold_size:
        return [permutation]
    folds = min(num_folds, num_images // fold_size)
    return list(permutation[: folds * fold_size].reshape(folds, fold_size))


def average_median_rank(image_features, text_features, text_to_image, num_folds: int = 5,
                        fold_size: int = 1000, repeats: int = 5, seed: int = 0,
                        order: str = "random") -> dict[str, float]:
    """Average median rank, the thesis' protocol after SHRe (thesis section 1.7.1 / Table 11).

    Images are split into folds (`amr_folds`: seeded permutation, floor(n / fold_size) folds, or one fold
    of all images when n < fold_size). In repeat r every image is paired with its caption number r (in
    the order captions appear in text_to_image; images with fewer captions cycle, r mod count), giving one
    positive and fold_size - 1 negatives per query. The median rank (optimistic ties, 1-based) is taken per
    fold and direction, and averaged over folds and repeats. Best = 1, random ~ fold_size / 2.
    """
    image_features = as_feature_matrix(image_features, "image_features")
    text_features = as_feature_matrix(text_features, "text_features").to(image_features)
    for name, value in (("num_folds", num_folds), ("fold_size", fold_size), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    num_images = image_features.shape[0]
    text_to_image = as_text_to_image(text_to_image, num_images, text_features.shape[0], image_features.device)
    captions = caption_table(text_to_image, num_images).cpu()
    counts = (captions >= 0).sum(1)

    medians: dict[str, list[float]] = {"image_to_text": [], "text_to_image": []}
    for repeat in range(repeats):
        chosen = captions[torch.arange(num_images), repeat % counts]
        for fold in amr_folds(num_images, num_folds, fold_size, seed, order):
            images = image_features[fold.to(image_features.device)]
            texts = text_features[chosen[fold].to(image_features.device)]
            diagonal = torch.arange(len(fold), device=image_features.device)[:, None]
            medians["image_to_text"].append(_median(query_ranks(images, texts, diagonal, 1024)))
            medians["text_to_image"].append(_median(query_ranks(texts, images, diagonal, 1024)))
    return {f"{direction}_amr": float(np.mean(values)) for direction, values in medians.items()}
