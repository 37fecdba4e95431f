"""alignlab.data readers, tokenisers, transforms and the resumable sampler, on tiny hand-made files."""

import io
import json
import logging
import math
import random
import statistics
import tarfile

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
import webdataset as wds
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from alignlab.data.coco import CocoCaptions
from alignlab.data.dataset import (
    PairDataset,
    ResumableBatchSampler,
    build_train_loader,
    open_train_source,
    sample_aug_seed,
)
from alignlab.data.jsonl import JsonlPairs
from alignlab.data.shards import WebDatasetIndex, expand_shards, iter_webdataset
from alignlab.data.tokenizers import ClipBPETokenizer, WordPieceTokenizer, build_tokenizer
from alignlab.data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform, sample_crop_box

CAPTIONS = [
    "a red square left of a blue circle",
    "a small green triangle on a striped background",
    "two dogs riding a large horse",
    "a photo of a cat",
    "a yellow star above a purple square",
]


def _image(seed: int, size=(24, 20)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    _image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """3 shards x 4 samples; shard 1 has one sample without caption and one without image."""
    root = tmp_path_factory.mktemp("shards")
    for shard in range(3):
        with wds.TarWriter(str(root / f"shard-{shard:06d}.tar")) as sink:
            for n in range(4):
                number = shard * 4 + n
                sample = {"__key__": f"s{number:04d}", "png": _png(number), "txt": CAPTIONS[number % 5],
                          "json": {"sample_id": f"s{number:04d}", "index": number}}
                if shard == 1 and n == 1:
                    del sample["txt"]
                if shard == 1 and n == 2:
                    del sample["png"]
                sink.write(sample)
    return root


# ---- webdataset shards ---------------------------------------------------------------------------

def test_random_access_equals_streaming_and_counts_incomplete(shard_dir, caplog):
    with caplog.at_level(logging.WARNING):
        index = WebDatasetIndex(shard_dir)
    assert len(index) == 10 and index.truncated_shards == []
    assert [(r["key"], r["reason"]) for r in index.skipped] == [("s0005", "missing_caption"), ("s0006", "missing_image")]
    assert "2 corrupt sample(s) left out of 3 shard(s): missing_caption 1, missing_image 1" in caplog.text

    skipped = []
    streamed = list(iter_webdataset(expand_shards(shard_dir), skipped=skipped))
    assert skipped == index.skipped
    assert streamed == [index[i] for i in range(len(index))]
    # Read out of order too: seeking must not depend on the previous read.
    for i in [7, 0, 9, 3, 3]:
        assert index[i] == streamed[i]

    numbers = [n for n in range(12) if n not in (5, 6)]
    for i, number in enumerate(numbers):
        image, caption, meta = index.get(i)
        assert np.array_equal(np.asarray(image), np.asarray(_image(number)))
        assert caption == CAPTIONS[number % 5]
        assert meta["index"] == number and meta["__key__"] == f"s{number:04d}"
    with pytest.raises(IndexError):
        index[10]


def test_expand_shards_brace_glob_dir_list(shard_dir):
    every = [str(shard_dir / f"shard-{n:06d}.tar") for n in range(3)]
    assert expand_shards(str(shard_dir / "shard-{000000..000002}.tar")) == every
    assert expand_shards(str(shard_dir / "shard-{000001..000002}.tar")) == every[1:]
    assert expand_shards(str(shard_dir / "*.tar")) == every
    assert expand_shards(shard_dir) == every
    assert expand_shards([every[2], str(shard_dir / "shard-00000[01].tar")]) == [every[2]] + every[:2]
    with pytest.raises(FileNotFoundError, match="first: .*shard-000003.tar"):
        expand_shards(str(shard_dir / "shard-{000002..000003}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        expand_shards(str(shard_dir / "nothing-*.tar"))


def test_compressed_shard_is_refused(tmp_path, shard_dir):
    with tarfile.open(tmp_path / "shard.tar.gz", "w:gz") as tar:
        tar.add(shard_dir / "shard-000000.tar", arcname="a.txt")
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        WebDatasetIndex([str(tmp_path / "shard.tar.gz")])


# ---- COCO and JSONL ------------------------------------------------------------------------------

def test_coco_round_trip_and_caption_choice(tmp_path):
    (tmp_path / "images").mkdir()
    images, annotations = [], []
    colours = ["red", "green", "blue", "pink", "grey"]
    for image_id in range(3):
        _image(image_id).save(tmp_path / "images" / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png"})
        if image_id != 1:  # image 1 has no caption
            annotations += [{"id": len(annotations) + c, "image_id": image_id,
                             "caption": f"{colour} picture {image_id}"} for c, colour in enumerate(colours)]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))

    source = open_train_source("coco", tmp_path)
    assert len(source) == 2 and source.num_uncaptioned == 1
    image, captions, meta = source.get(1)
    assert captions == [f"{colour} picture 2" for colour in colours] and meta["image_id"] == 2
    assert np.array_equal(np.asarray(image), np.asarray(_image(2)))

    tokenizer = ClipBPETokenizer(context_length=12)
    dataset = PairDataset(source, tokenizer, build_image_transform(16, train=True))
    chosen = {tokenizer.decode(dataset[(1, seed)][1]) for seed in range(40)}
    assert chosen == set(captions)
    assert torch.equal(dataset[(1, 5)][1], dataset[(1, 5)][1])


def test_jsonl_round_trip_and_errors(tmp_path):
    (tmp_path / "img").mkdir()
    for n in range(3):
        _image(n).save(tmp_path / "img" / f"{n}.png")
    lines = [{"id": "a", "image": "img/0.png", "text": "a red square"},
             {"sample_id": 7, "image_path": "img/1.png", "caption": ["one", "two"]},
             {"id": "c", "image": str(tmp_path / "img" / "2.png"), "tokens": [49406, 320, 49407]}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    source = JsonlPairs(path)
    assert len(source) == 3 and source.sample_ids == ["a", 7, "c"]
    image, caption, meta = source.get(0)
    assert caption == "a red square" and meta == {"sample_id": "a", "image_path": str(tmp_path / "img" / "0.png")}
    assert np.array_equal(np.asarray(image), np.asarray(_image(0)))
    assert source.get(1)[1] == ["one", "two"]
    _, caption, meta = source.get(2)
    assert caption is None and meta["tokens"] == [49406, 320, 49407]

    dataset = PairDataset(source, ClipBPETokenizer(context_length=6), build_image_transform(16, train=False))
    assert dataset[(2, 0)][1].tolist() == [49406, 320, 49407, 0, 0, 0]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"id": "b", "text": "no image"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: missing field 'image'"):
        JsonlPairs(bad)
    bad.write_text(json.dumps(lines[0]) + "\n\n" + '{"id": "b", "image": "x.png", "text": \n')
    with pytest.raises(ValueError, match=r"line 3: not valid JSON"):
        JsonlPairs(bad)
    bad.write_text(json.dumps({"id": "b", "image": "x.png"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: missing field 'text'"):
        JsonlPairs(bad)


# ---- tokenisers ----------------------------------------------------------------------------------

def test_clip_bpe_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = ClipBPETokenizer()
    assert tokenizer.vocab_size == 49408 and tokenizer.context_length == 77 and tokenizer.pad_id == 0
    tokens = tokenizer(["a photo of a cat"])
    # CLIP ids: <start_of_text> a photo of a cat <end_of_text>, then zero padding.
    assert tokens[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokens.shape == (1, 77) and not tokens[0, 7:].any()

    texts = CAPTIONS + ["A Photo of a CAT!!", "it's 2024 &amp; the dog's toy costs $3.50", "naïve café 東京 🐱",
                        "  spaces\tand\nnewlines ", "don't won't I'm they've", "&lt;b&gt;x", "word " * 100, ""]
    assert torch.equal(tokenizer(texts), SimpleTokenizer()(texts))


def test_clip_bpe_truncation_and_random_subsequence():
    long_caption = " ".join(f"word{n}" for n in range(40))
    full = ClipBPETokenizer(context_length=200)([long_caption])[0]
    length = int((full == 49407).nonzero()[0]) + 1
    cut = ClipBPETokenizer(context_length=10)([long_caption])[0]
    assert cut.tolist() == full[:9].tolist() + [49407]

    random_tokenizer = ClipBPETokenizer(context_length=10, random_subsequence=True)
    body = full[1 : length - 1].tolist()
    windows = set()
    for seed in range(20):
        row = random_tokenizer([long_caption], generator=torch.Generator().manual_seed(seed))[0].tolist()
        assert row[0] == 49406 and row[-1] == 49407
        start = next(s for s in range(len(body) - 7) if body[s : s + 8] == row[1:9])
        windows.add(start)
        again = random_tokenizer([long_caption], generator=torch.Generator().manual_seed(seed))[0].tolist()
        assert again == row
    assert len(windows) > 3
    short = random_tokenizer(["a photo of a cat"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(short, ClipBPETokenizer(context_length=10)(["a photo of a cat"]))


def test_wordpiece_train_save_load(tmp_path):
    tokenizer = build_tokenizer("wordpiece", context_length=8, train_texts=CAPTIONS * 5, vocab_size=300)
    assert tokenizer.kind == "wordpiece" and tokenizer.vocab_size <= 300 and tokenizer.pad_id == 0
    tokens = tokenizer(["A Small Green Triangle", CAPTIONS[1]])
    assert tokens.shape == (2, 8) and (tokens[:, 0] == tokenizer.cls_id).all()
    assert tokens[0].tolist()[5:] == [tokenizer.sep_id, 0, 0]  # [CLS] a small green triangle [SEP] pad pad
    assert tokens[1, -1] == tokenizer.sep_id  # truncated, [SEP] kept
    assert tokenizer.decode(tokens[0]) == "a small green triangle"

    saved = tokenizer.save(tmp_path / "vocab.txt")
    assert saved.read_text().splitlines()[:4] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    reloaded = build_tokenizer("wordpiece", context_length=8, vocab_file=saved)
    assert torch.equal(reloaded(CAPTIONS), tokenizer(CAPTIONS))
    with pytest.raises(ValueError, match="vocab_file"):
        build_tokenizer("wordpiece")
    (tmp_path / "plain.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="lacks the special tokens"):
        WordPieceTokenizer.from_vocab(tmp_path / "plain.txt")


# ---- transforms ----------------------------------------------------------------------------------

def test_crop_box_is_seeded_and_draws_like_torchvision():
    """The box comes from a random.Random (not torch's stream, so not torchvision's box for a seed), with
    torchvision's algorithm: the same distribution of area fractions and aspect ratios, within bounds."""
    image = _image(0, size=(40, 30))
    ours, theirs = [], []
    for seed in range(400):
        got = sample_crop_box(40, 30, (0.3, 0.6), (3 / 4, 4 / 3), random.Random(seed))
        assert got == sample_crop_box(40, 30, (0.3, 0.6), (3 / 4, 4 / 3), random.Random(seed))
        top, left, h, w = got
        assert 0.3 * 1200 - 40 <= h * w <= 0.6 * 1200 + 40  # rounding of h and w only
        assert top + h <= 30 and left + w <= 40 and top >= 0 and left >= 0
        ours.append(got)
        torch.manual_seed(seed)
        theirs.append(tuple(RandomResizedCrop.get_params(image, [0.3, 0.6], [3 / 4, 4 / 3])))
    assert len(set(ours)) > 100
    for statistic in (lambda b: b[2] * b[3] / 1200, lambda b: math.log(b[3] / b[2]), lambda b: b[0], lambda b: b[1]):
        mine, reference = [statistic(b) for b in ours], [statistic(b) for b in theirs]
        spread = statistics.pstdev(reference)
        assert abs(statistics.mean(mine) - statistics.mean(reference)) < 0.2 * spread
        assert 0.8 < statistics.pstdev(mine) / spread < 1.25
    # No box fits a 1:10 strip at ratio [1, 1] with scale 1: torchvision's centre fallback.
    assert sample_crop_box(100, 10, (1.0, 1.0), (1.0, 1.0), random.Random(0)) == (0, 45, 10, 10)
    with pytest.raises(TypeError, match="random.Random"):
        sample_crop_box(40, 30, (0.3, 0.6), (3 / 4, 4 / 3), torch.Generator())


def test_train_transform_is_seeded_and_full_crop_is_a_resize():
    image = _image(1, size=(32, 32))
    transform = build_image_transform(16, train=True, crop_scale=(0.5, 1.0), hflip=0.5)
    a = transform(image, random.Random(3))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, transform(image, random.Random(3)))
    assert not torch.equal(a, transform(image, random.Random(4)))

    full = build_image_transform(16, train=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    reference = F.normalize(F.to_tensor(image.resize((16, 16), Image.BICUBIC)), CLIP_MEAN, CLIP_STD)
    out = full(image, random.Random(0))
    assert torch.allclose(out, reference, atol=0.05)  # PIL bicubic vs torchvision's antialiased path
    assert torch.equal(out, F.normalize(F.to_tensor(F.resize(image, [16, 16], InterpolationMode.BICUBIC)),
                                        CLIP_MEAN, CLIP_STD))

    evaluate = build_image_transform(16, train=False)
    wide = _image(2, size=(48, 32))
    centre = wide.resize((24, 16), Image.BICUBIC).crop((4, 0, 20, 16))
    assert torch.allclose(evaluate(wide, None), F.normalize(F.to_tensor(centre), CLIP_MEAN, CLIP_STD), atol=0.05)


# ---- sampler and loader --------------------------------------------------------------------------

def _epoch(sampler, epoch, start=0):
    sampler.set_epoch(epoch)
    sampler.set_start_batch(start)
    return list(sampler)


def test_sampler_order_resume_and_rank_slices():
    sampler = ResumableBatchSampler(103, 8, seed=11)
    first = _epoch(sampler, 0)
    assert len(sampler) == len(first) == 12 and all(len(batch) == 8 for batch in first)
    indices = [index for batch in first for index, _ in batch]
    assert len(set(indices)) == 96 and max(indices) < 103
    assert all(seed == sample_aug_seed(11, 0, index) for batch in first for index, seed in batch)
    assert _epoch(ResumableBatchSampler(103, 8, seed=11), 0) == first
    second = _epoch(sampler, 1)
    assert [i for b in second for i, _ in b] != indices
    assert {s for b in second for _, s in b}.isdisjoint({s for b in first for _, s in b})
    assert _epoch(ResumableBatchSampler(103, 8, seed=12), 0) != first
    assert _epoch(sampler, 0, start=5) == first[5:]

    ranks = [_epoch(ResumableBatchSampler(103, 8, seed=11, rank=r, world_size=2), 0) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == first
    assert len(_epoch(ResumableBatchSampler(103, 8, seed=11, drop_last=False), 0)[-1]) == 7
    with pytest.raises(ValueError, match="multiple of world_size"):
        ResumableBatchSampler(103, 9, seed=0, world_size=2)


def test_loader_same_batches_for_any_worker_count_and_rank_split(shard_dir):
    source = WebDatasetIndex(shard_dir)
    tokenizer = ClipBPETokenizer(context_length=6, random_subsequence=True)
    transform = build_image_transform(16, train=True, crop_scale=(0.3, 1.0), hflip=0.5)
    dataset = PairDataset(source, tokenizer, transform)

    def batches(**kwargs):
        return list(build_train_loader(dataset, batch_size=4, seed=5, epoch=1, **kwargs))

    serial = batches(num_workers=0)
    assert len(serial) == 2 and serial[0][0].shape == (4, 3, 16, 16) and serial[0][1].shape == (4, 6)
    for ours, theirs in zip(serial, batches(num_workers=2)):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    resumed = batches(num_workers=0, start_batch=1)
    assert all(torch.equal(a, b) for a, b in zip(resumed[0], serial[1]))
    halves = [batches(rank=rank, world_size=2) for rank in range(2)]
    for k, full in enumerate(serial):
        for part in range(3):
            assert torch.equal(torch.cat([halves[0][k][part], halves[1][k][part]]), full[part])
    # The augmentation really is random per visit: another epoch crops the same image differently.
    other = list(build_train_loader(dataset, batch_size=10, seed=5, epoch=2))[0]
    this = list(build_train_loader(dataset, batch_size=10, seed=5, epoch=1))[0]
    order_other, order_this = other[2].argsort(), this[2].argsort()
    assert not torch.equal(other[0][order_other], this[0][order_this])
