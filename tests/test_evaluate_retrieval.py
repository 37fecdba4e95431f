"""Retrieval metrics, average median rank and similarity histograms against brute-force references."""

import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from alignlab.evaluate import average_median_rank, retrieval_metrics, similarity_histograms
from alignlab.evaluate.retrieval import amr_folds

KEYS = {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} | {
    f"{d}_{s}_rank" for d in ("image_to_text", "text_to_image") for s in ("mean", "median")}


def brute_force_metrics(images, texts, text_to_image, ks=(1, 5, 10)):
    """Full similarity matrix, then plain Python: sort candidates by (-similarity, negatives after positives)
    and take the 1-based position of the first positive (the optimistic tie convention)."""
    sims = (torch.as_tensor(images) @ torch.as_tensor(texts).T).tolist()
    owner = [int(i) for i in text_to_image]
    num_images, num_texts = len(sims), len(owner)
    i2t = []
    for i in range(num_images):
        order = sorted(range(num_texts), key=lambda t: (-sims[i][t], owner[t] != i))
        i2t.append(1 + next(pos for pos, t in enumerate(order) if owner[t] == i))
    t2i = []
    for t in range(num_texts):
        order = sorted(range(num_images), key=lambda i: (-sims[i][t], i != owner[t]))
        t2i.append(1 + order.index(owner[t]))
    out = {}
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{name}_mean_rank"] = sum(ranks) / len(ranks)
        out[f"{name}_median_rank"] = statistics.median(ranks)
    return out


def variable_captions(num_images, generator, max_captions=5):
    counts = torch.randint(1, max_captions + 1, (num_images,), generator=generator)
    owner = torch.repeat_interleave(torch.arange(num_images), counts)
    return owner[torch.randperm(len(owner), generator=generator)]  # captions in shuffled order


def assert_close_dict(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_matches_brute_force_random_features(chunk_size):
    g = torch.Generator().manual_seed(chunk_size)
    owner = variable_captions(40, g)
    images = torch.nn.functional.normalize(torch.randn(40, 16, generator=g, dtype=torch.float64), dim=1)
    # Captions near their image so that ranks spread over 1..N rather than being uniformly random.
    texts = torch.nn.functional.normalize(images[owner] + 1.2 * torch.randn(len(owner), 16, generator=g,
                                                                              dtype=torch.float64), dim=1)
    got = retrieval_metrics(images, texts, owner, chunk_size=chunk_size)
    assert set(got) == KEYS
    assert_close_dict(got, brute_force_metrics(images, texts, owner))
    assert 0 < got["image_to_text_R@1"] < 100  # the case is not degenerate


@pytest.mark.parametrize("chunk_size", [3, 5, 11])
def test_matches_brute_force_with_exact_ties(chunk_size):
    # Dyadic values make every dot product exact in float32 whatever the summation order, so the many
    # ties below are real ties for both implementations; duplicated rows add exact ties on purpose.
    g = torch.Generator().manual_seed(100 + chunk_size)
    images = torch.randint(-2, 3, (30, 4), generator=g).float() / 2
    images[10:15] = images[0:5]
    owner = variable_captions(30, g, max_captions=4)
    texts = torch.randint(-2, 3, (len(owner), 4), generator=g).float() / 2
    texts[::3] = images[owner[::3]]
    texts[1] = texts[0]
    got = retrieval_metrics(images, texts, owner, chunk_size=chunk_size)
    assert_close_dict(got, brute_force_metrics(images, texts, owner))


def test_hand_computed_three_images_six_captions():
    e1, e2, e3 = torch.eye(3)
    images = torch.stack([e1, e2, e3])
    texts = torch.stack([e1, e2, e2, e3, e1, (e1 + e2) / 2])
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    got = retrieval_metrics(images, texts, owner, chunk_size=2)
    # T->I ranks [1, 2, 1, 2, 2, 3]; I->T ranks [1, 1, 2] (image 0 ties caption 4 at 1.0 -> optimistic 1).
    assert got["text_to_image_R@1"] == pytest.approx(100 * 2 / 6)
    assert got["text_to_image_R@5"] == 100.0
    assert got["text_to_image_mean_rank"] == pytest.approx(11 / 6)
    assert got["text_to_image_median_rank"] == 2.0
    assert got["image_to_text_R@1"] == pytest.approx(100 * 2 / 3)
    assert got["image_to_text_mean_rank"] == pytest.approx(4 / 3)
    assert got["image_to_text_median_rank"] == 1.0


def test_ties_are_optimistic_and_order_independent():
    # Two identical images: each caption ties its own image with the other one. Rank 1 (optimistic)
    # for both, whichever of the two stores first; a pessimistic or argsort-based rule would give 2.
    image = torch.tensor([[1.0, 0.0]])
    images = torch.cat([image, image, torch.tensor([[0.0, 1.0]])])
    got = retrieval_metrics(images, images[[0, 1, 2]], torch.tensor([0, 1, 2]))
    assert got["text_to_image_R@1"] == 100.0 and got["image_to_text_R@1"] == 100.0
    assert got["text_to_image_mean_rank"] == 1.0


def test_image_to_text_uses_first_correct_caption():
    # Image 0's second caption is ranked last, but its first-ranked caption is correct: rank 1.
    images = torch.eye(2)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    got = retrieval_metrics(images, texts, torch.tensor([0, 1, 0]))
    assert got["image_to_text_mean_rank"] == 1.0
    assert got["text_to_image_mean_rank"] == pytest.approx((1 + 1 + 2) / 3)


@pytest.mark.parametrize("owner, match", [([0, 1, 5], "text_to_image values"), ([0, 0, 0], "no caption"),
                                          ([0, 1], "entries")])
def test_bad_text_to_image_raises(owner, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(torch.eye(2), torch.eye(3, 2), owner)


def test_bad_features_raise():
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(torch.eye(2), torch.ones(2, 3), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), torch.eye(2), [0, 1])
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 1], chunk_size=0)


def brute_force_amr(images, texts, owner, num_folds, fold_size, repeats, seed, folds=None):
    """The documented protocol written out with Python loops over full per-fold similarity matrices
    (`folds`: the image indices of each fold, else the seeded permutation's)."""
    captions = [[t for t in range(len(owner)) if owner[t] == i] for i in range(len(images))]
    permutation = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    if folds is None and len(images) < fold_size:
        folds = [permutation]
    elif folds is None:
        count = min(num_folds, len(images) // fold_size)
        folds = [permutation[f * fold_size:(f + 1) * fold_size] for f in range(count)]
    medians = {"image_to_text": [], "text_to_image": []}
    for r in range(repeats):
        for fold in folds:
            chosen = [captions[i][r % len(captions[i])] for i in fold]
            sims = (images[fold] @ texts[chosen].T).tolist()
            m = len(fold)
            i2t = [1 + sum(sims[j][c] > sims[j][j] for c in range(m)) for j in range(m)]
            t2i = [1 + sum(sims[c][j] > sims[j][j] for c in range(m)) for j in range(m)]
            medians["image_to_text"].append(statistics.median(i2t))
            medians["text_to_image"].append(statistics.median(t2i))
    return {f"{k}_amr": sum(v) / len(v) for k, v in medians.items()}


@pytest.mark.parametrize("num_images, fold_size, expected_folds", [(95, 30, 3), (250, 40, 5), (20, 30, 1)])
def test_amr_matches_reference_and_fold_rule(num_images, fold_size, expected_folds):
    g = torch.Generator().manual_seed(num_images)
    owner = variable_captions(num_images, g, max_captions=3)
    images = torch.randint(-2, 3, (num_images, 6), generator=g).float() / 2
    texts = images[owner] + torch.randint(-2, 3, (len(owner), 6), generator=g).float() / 2
    folds = amr_folds(num_images, 5, fold_size, seed=3)
    assert len(folds) == expected_folds
    assert all(len(f) == min(fold_size, num_images) for f in folds)
    assert len(torch.cat(folds).unique()) == sum(len(f) for f in folds)  # folds are disjoint
    got = average_median_rank(images, texts, owner, num_folds=5, fold_size=fold_size, repeats=4, seed=3)
    want = brute_force_amr(images, texts, owner.tolist(), 5, fold_size, 4, 3)
    assert got == pytest.approx(want)


def test_amr_perfect_model_is_one_and_random_is_half_fold():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(500, 32, generator=g), dim=1)
    owner = torch.arange(500).repeat_interleave(5)
    perfect = average_median_rank(images, images[owner], owner, num_folds=5, fold_size=100)
    assert perfect == {"image_to_text_amr": 1.0, "text_to_image_amr": 1.0}

    images = torch.nn.functional.normalize(torch.randn(2000, 32, generator=g), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(10_000, 32, generator=g), dim=1)
    random = average_median_rank(images, texts, torch.arange(2000).repeat_interleave(5), fold_size=400)
    for value in random.values():
        assert abs(value - 200.5) < 20  # uniform ranks 1..400 have median 200.5


def test_similarity_histograms_stats_and_png(tmp_path):
    g = torch.Generator().manual_seed(1)
    owner = variable_captions(25, g, max_captions=3)
    images = torch.nn.functional.normalize(torch.randn(25, 8, generator=g, dtype=torch.float64), dim=1)
    texts = torch.nn.functional.normalize(images[owner] + 0.5 * torch.randn(len(owner), 8, generator=g,
                                                                             dtype=torch.float64), dim=1)
    out_png = tmp_path / "plots" / "hist.png"
    stats = similarity_histograms(images, texts, owner, out_png, chunk_size=7)

    sims = (texts @ images.T).numpy()
    positive = np.zeros_like(sims, dtype=bool)
    positive[np.arange(len(owner)), owner.numpy()] = True
    assert stats["num_positive"] == len(owner) and stats["num_negative"] == len(owner) * 24
    assert stats["positive_mean"] == pytest.approx(sims[positive].mean())
    assert stats["negative_mean"] == pytest.approx(sims[~positive].mean())
    assert stats["positive_std"] == pytest.approx(sims[positive].std())
    assert stats["negative_std"] == pytest.approx(sims[~positive].std())
    assert stats["separation"] > 1.0 and 0.0 < stats["overlap"] < 1.0
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_similarity_histograms_disjoint_distributions_have_zero_overlap(tmp_path):
    images = torch.eye(4)
    stats = similarity_histograms(images, images, torch.arange(4), tmp_path / "h.png")
    assert stats["overlap"] == 0.0 and stats["positive_mean"] == 1.0 and stats["negative_mean"] == 0.0


def brute_force_caption_match(images, texts, text_to_image, captions, ks=(1, 5, 10)):
    """The caption-match view from its definition: a candidate is correct when its caption string equals the
    query's (text->image: any caption of the image; image->text: any caption of the query image)."""
    sims = (torch.as_tensor(images) @ torch.as_tensor(texts).T).tolist()
    owner = [int(i) for i in text_to_image]
    strings = [{captions[t] for t in range(len(owner)) if owner[t] == i} for i in range(len(sims))]
    i2t = []
    for i in range(len(sims)):
        best = max(sims[i][t] for t in range(len(owner)) if captions[t] in strings[i])
        i2t.append(1 + sum(s > best for s in sims[i]))
    t2i = []
    for t in range(len(owner)):
        best = max(sims[i][t] for i in range(len(sims)) if captions[t] in strings[i])
        t2i.append(1 + sum(sims[i][t] > best for i in range(len(sims))))
    out = {}
    for name, ranks in (("image_to_text_any", i2t), ("text_to_image_any", t2i)):
        out.update({f"{name}_R@{k}": 100.0 * sum(r <= k for r in ranks) / len(ranks) for k in ks})
        out[f"{name}_mean_rank"] = sum(ranks) / len(ranks)
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_caption_match_matches_brute_force_with_repeated_captions(chunk_size):
    from alignlab.evaluate.retrieval import caption_match_metrics
    g = torch.Generator().manual_seed(3)
    owner = variable_captions(40, g, max_captions=3)
    vocabulary = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("cube", "ball", "cone")]
    captions = [vocabulary[int(torch.randint(len(vocabulary), (1,), generator=g))] for _ in owner]
    images = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(len(owner), 8, generator=g), dim=-1)
    got = caption_match_metrics(images, texts, owner, captions, chunk_size=chunk_size)
    assert_close_dict(got, brute_force_caption_match(images, texts, owner, captions))


def test_caption_match_counts_an_identical_caption_the_strict_view_rejects():
    from alignlab.evaluate.retrieval import caption_match_metrics
    # Caption 0 ("a red cube", image 0) is closest to image 1, which has the same caption string.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    texts = torch.nn.functional.normalize(torch.tensor([[0.2, 1.0], [0.0, 1.0], [-1.0, 0.1]]), dim=-1)
    owner, captions = [0, 1, 2], ["a red cube", "a red cube", "a blue ball"]
    strict = retrieval_metrics(images, texts, owner, ks=(1,))
    assert strict["text_to_image_R@1"] == pytest.approx(200 / 3)
    matched = caption_match_metrics(images, texts, owner, captions, ks=(1,))
    assert matched["text_to_image_any_R@1"] == 100.0
    assert matched["image_to_text_any_R@1"] == 100.0  # image 0's best text is caption 1, the same string


def test_caption_match_with_unique_captions_equals_strict_view():
    from alignlab.evaluate.retrieval import caption_match_metrics
    g = torch.Generator().manual_seed(5)
    owner = variable_captions(30, g)
    captions = [f"caption {t}" for t in range(len(owner))]
    images = torch.nn.functional.normalize(torch.randn(30, 6, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(len(owner), 6, generator=g), dim=-1)
    strict = retrieval_metrics(images, texts, owner)
    matched = caption_match_metrics(images, texts, owner, captions)
    for key, value in matched.items():
        assert value == pytest.approx(strict[key.replace("_any", "")])


def test_average_recall_is_the_mean_of_the_six_recalls():
    from alignlab.evaluate.retrieval import average_recall
    g = torch.Generator().manual_seed(9)
    owner = variable_captions(25, g)
    images = torch.nn.functional.normalize(torch.randn(25, 6, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(len(owner), 6, generator=g), dim=-1)
    reference = brute_force_metrics(images, texts, owner)
    six = [reference[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert average_recall(retrieval_metrics(images, texts, owner)) == pytest.approx(sum(six) / 6)


def test_amr_contiguous_folds_are_chunks_of_the_stored_order():
    folds = amr_folds(2500, num_folds=5, fold_size=1000, seed=0, order="contiguous")
    assert [f.tolist() for f in folds] == [list(range(0, 1000)), list(range(1000, 2000))]
    g = torch.Generator().manual_seed(4)
    images = torch.nn.functional.normalize(torch.randn(40, 6, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(40, 6, generator=g), dim=-1)
    owner = torch.arange(40)
    # One fold of all 40 images: contiguous and random folds hold the same images, so the same medians.
    assert average_median_rank(images, texts, owner, fold_size=40, order="contiguous") == \
        average_median_rank(images, texts, owner, fold_size=40, order="random")
    # Two folds of 20: contiguous is the reference computed on the two halves by hand.
    want = brute_force_amr(images, texts, owner.tolist(), num_folds=2, fold_size=20, repeats=1, seed=0,
                           folds=[list(range(20)), list(range(20, 40))])
    got = average_median_rank(images, texts, owner, num_folds=2, fold_size=20, repeats=1, order="contiguous")
    assert got == pytest.approx(want)
    with pytest.raises(ValueError, match="AMR fold order 'sorted'"):
        amr_folds(10, 1, 10, 0, order="sorted")
