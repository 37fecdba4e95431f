"""Positive vs negative cosine-similarity distributions of a test set.

Positives are the (caption, its image) pairs, negatives every other (caption, image) pair. The full
similarity matrix is visited in caption chunks (chunk_size x num_images at a time) and reduced into fixed
histograms and running sums, so a 25K x 5K test set needs no more memory than retrieval does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alignlab.evaluate.retrieval import as_feature_matrix, as_text_to_image


def _moments(total: float, total_sq: float, count: int) -> tuple[float, float]:
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def _plot(edges: np.ndarray, positive: np.ndarray, negative: np.ndarray, stats: dict, out_png: Path) -> None:
    # A bare Figure with an explicit Agg canvas: no pyplot global state, no GUI backend, safe in workers.
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.stairs(negative, edges, fill=True, alpha=0.5, label=f"negative (n={stats['num_negative']})")
    axes.stairs(positive, edges, fill=True, alpha=0.5, label=f"positive (n={stats['num_positive']})")
    axes.set_xlabel("cosine similarity")
    axes.set_ylabel("density")
    axes.set_title(f"separation d'={stats['separation']:.2f}, overlap={stats['overlap']:.2f}")
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(out_png, format="png")


def _chunk_summary(texts, images, text_to_image, bins: int) -> tuple[Tensor, Tensor, np.ndarray]:
    """Histograms of all and of positive similarities of one caption chunk, and their sums / sums of squares.
    Negatives are later taken as all minus positives, so no masked copy of the block is needed."""
    sims = (texts @ images.T).double().clamp_(-1.0, 1.0)
    positives = sims.gather(1, text_to_image[:, None])
    all_hist = torch.histc(sims, bins=bins, min=-1.0, max=1.0).cpu()
    positive_hist = torch.histc(positives, bins=bins, min=-1.0, max=1.0).cpu()
    flat = sims.flatten()  # a view: the dot product gives the sum of squares without a squared copy
    sums = np.array([float(flat.sum()), float(flat @ flat), float(positives.sum()),
                     float((positives * positives).sum())])
    return all_hist, positive_hist, sums


def similarity_histograms(image_features, text_features, text_to_image, out_png, bins: int = 100,
                          chunk_size: int = 1024) -> dict[str, float]:
    """Histogram positive and negative similarities over [-1, 1] (values outside are clamped into the end
    bins), save the plot as PNG at out_png and return summary statistics:

    `positive_mean`, `positive_std`, `negative_mean`, `negative_std` (exact, not binned),
    `separation` = (mu_pos - mu_neg) / sqrt((var_pos + var_neg) / 2)  (d', 0 = indistinguishable),
    `overlap` = sum_b min(p_pos(b), p_neg(b))  (histogram intersection of the two normalised
    histograms: 1 = identical distributions, 0 = disjoint), `num_positive`, `num_negative`.
    """
    image_features = as_feature_matrix(image_features, "image_features")
    text_features = as_feature_matrix(text_features, "text_features").to(image_features)
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    text_to_image = as_text_to_image(text_to_image, num_images, num_texts, image_features.device)
    if num_texts == 0 or num_images < 2:
        raise ValueError(f"need at least one caption and two images for negatives, got {num_texts} captions "
                         f"and {num_images} images")

    all_counts = torch.zeros(bins, dtype=torch.float64)
    positive_counts = torch.zeros(bins, dtype=torch.float64)
    sums = np.zeros(4)
    for start in range(0, num_texts, chunk_size):
        chunk = _chunk_summary(text_features[start:start + chunk_size], image_features,
                               text_to_image[start:start + chunk_size], bins)
        all_counts += chunk[0]
        positive_counts += chunk[1]
        sums += chunk[2]
    sums = dict(zip(("all", "all_sq", "pos", "pos_sq"), sums.tolist()))

    num_negative = num_texts * (num_images - 1)
    positive_mean, positive_std = _moments(sums["pos"], sums["pos_sq"], num_texts)
    negative_mean, negative_std = _moments(sums["all"] - sums["pos"], sums["all_sq"] - sums["pos_sq"], num_negative)
    positive_hist = positive_counts.numpy() / num_texts
    negative_hist = (all_counts - positive_counts).numpy() / num_negative
    pooled_std = np.sqrt((positive_std**2 + negative_std**2) / 2.0)
    stats = {
        "positive_mean": positive_mean,
        "positive_std": positive_std,
        "negative_mean": negative_mean,
        "negative_std": negative_std,
        "separation": float((positive_mean - negative_mean) / pooled_std) if pooled_std > 0 else 0.0,
        "overlap": float(np.minimum(positive_hist, negative_hist).sum()),
        "num_positive": num_texts,
        "num_negative": num_negative,
    }
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    width = edges[1] - edges[0]
    _plot(edges, positive_hist / width, negative_hist / width, stats, out_png)
    return stats
