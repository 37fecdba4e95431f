"""Captions for SynthCaps scenes: paraphrase templates that span caption complexity, the five caption
noise kinds, and the zero-shot prompt templates.

Caption complexity (docs/methods.md "CAT filtering") is the maximum number of relations attached to one object. Here an
object's relations are its colour and size words, its spatial relations to other objects and its roles
in an action (subject or object); the background is context and not counted, so "a circle on a gray
background" is C0, "a red circle" C1 and "a small red circle chasing a blue star" C3. Each template
carries its level; which scene it fits (two objects, an action, a repeated kind) follows from its fields.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np

from alignlab.data.synth.scene import COLORS, SIZES, relation_between, sample_scene

NOISE_KINDS = ("mismatch", "wrong_attribute", "uninformative", "product", "text_in_image")
ACTION_CAPTION_PROB = 0.6  # P(the caption mentions the action | the scene has one)

NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
VERB_FORMS = {  # -ing form, third person, passive with "by"
    "chasing": ("chasing", "chases", "chased by"),
    "jumping over": ("jumping over", "jumps over", "jumped over by"),
    "pushing": ("pushing", "pushes", "pushed by"),
}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
BACKGROUND_WORDS = {"plain": "gray", "gradient": "gradient", "stripes": "striped", "dots": "dotted"}
ATTRIBUTE_WORD = re.compile(r"\b(" + "|".join(list(COLORS) + list(SIZES)) + r")\b")


@dataclass(frozen=True)
class Template:
    level: int  # caption complexity C<level>
    text: str

    @functools.cached_property
    def fields(self) -> frozenset[str]:
        return frozenset(name for _, name, _, _ in string.Formatter().parse(self.text) if name)

    @functools.cached_property
    def has_action(self) -> bool:
        return bool(self.fields & {"verb", "verbs", "verbp"})


TEMPLATES = tuple(Template(level, text) for level, text in (
    (0, "some shapes"), (0, "a picture of some shapes"), (0, "geometric shapes on a background"),
    (0, "a simple drawing of shapes"), (0, "a {sa}"), (0, "a picture of a {sa}"), (0, "a drawing of a {sa}"),
    (0, "there is a {sa} in the picture"), (0, "a {sa} on a {bg} background"), (0, "an image with {n} shapes"),
    (0, "{shape_counts}"), (0, "a {sa} and a {sb}"),
    (1, "a {ca} {sa}"), (1, "a {za} {sa}"), (1, "a photo of a {ca} {sa}"), (1, "a {sa} that is {ca}"),
    (1, "a {ca} shape"), (1, "a {ca} {sa} on a {bg} background"), (1, "{group}"),
    (1, "a {ca} {sa} and a {cb} {sb}"), (1, "a {sa} {rel} a {sb}"),
    (2, "a {za} {ca} {sa}"), (2, "a picture of a {za} {ca} {sa}"), (2, "a {za} {sa} colored {ca}"),
    (2, "a {za} {ca} {sa} on a {bg} background"), (2, "a {ca} {sa} {rel} a {cb} {sb}"),
    (2, "a {za} {sa} {rel} a {zb} {sb}"), (3, "a {za} {ca} {sa} {rel} a {cb} {sb}"),
    (1, "a {sa} {verb} a {sb}"), (1, "a {sa} {verbs} a {sb}"), (1, "a {sb} being {verbp} a {sa}"),
    (2, "a {ca} {sa} {verb} a {cb} {sb}"), (2, "a {ca} {sa} {verbs} a {sb}"),
    (2, "a {cb} {sb} being {verbp} a {ca} {sa}"), (2, "the {ca} {sa} {verbs} the {sb}"),
    (2, "a picture of a {ca} {sa} {verb} a {sb}"), (2, "look, a {ca} {sa} is {verb} a {cb} {sb}"),
    (2, "a {za} {sa} {verbs} a {zb} {sb} on a {bg} background"), (3, "a {sa} {verb} a {zb} {cb} {sb}"),
    (3, "a {za} {ca} {sa} {verb} a {cb} {sb}"),
))

PRODUCT_TEMPLATES = (
    "{ca} {sa}, {za}, free shipping", "{za} {ca} {sa} - buy now", "{sa} ({ca}) for sale",
    "new {ca} {sa} sticker, {za} size", "{ca} {sa} decal | {za} | best price", "{za} {sa} in {ca}, ships today",
    "wholesale {ca} {sa} stickers, pack of {num}", "{ca} {sa} wall art, {za}",
)
UNINFORMATIVE_TEMPLATES = (
    "photo {num}", "IMG_{num:04d}.jpg", "DSC{num:05d}.JPG", "image", "untitled", "{color}",
    "screenshot {num}", "file_{num}.png", "my picture", "stock image {num}",
)

CLASS_TEMPLATES = {
    "shape": ("a photo of a {}.", "a drawing of a {}.", "a picture of a {}.", "a {} shape.",
              "a rendering of a {}.", "an image of a {}.", "a small {}.", "a large {}.",
              "a {} on a background.", "a simple {}."),
    "color": ("a photo of a {} shape.", "a {} object.", "a picture of a {} shape.", "a drawing of something {}.",
              "a {} thing.", "an image of a {} shape.", "the color {}.", "a small {} shape.",
              "a large {} shape.", "something {} on a gray background."),
}
CLASS_TEMPLATES["shape_color"] = CLASS_TEMPLATES["shape"]

_ARTICLE = re.compile(r"\b([Aa])n? (?=([A-Za-z]))")


def fix_articles(text: str) -> str:
    """'a orange circle' -> 'an orange circle', 'an red star' -> 'a red star' (vowel-letter rule)."""
    return _ARTICLE.sub(lambda m: m.group(1) + ("n " if m.group(2).lower() in "aeiou" else " "), text)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _counted(count: int, noun: str) -> str:
    return f"{NUMBER_WORDS[count]} {noun if count == 1 else _plural(noun)}"


def _shape_counts(objects: list[dict]) -> str:
    """'two circles and a star': counts per shape in order of first appearance."""
    parts = [_counted(count, shape) for shape, count in Counter(o["shape"] for o in objects).items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _group(objects: list[dict]) -> str | None:
    """'two red circles' for the largest set of objects of one shape and colour, if it has >= 2."""
    (color, shape), count = Counter((o["color"], o["shape"]) for o in objects).most_common(1)[0]
    return f"{NUMBER_WORDS[count]} {color} {_plural(shape)}" if count >= 2 else None


def _roles(scene: dict, rng: np.random.Generator) -> tuple[int, int | None]:
    """Which objects the caption is about: the action's subject and object, else a random pair."""
    if scene["action"] is not None:
        return scene["action"]["subject"], scene["action"]["object"]
    if len(scene["objects"]) == 1:
        return 0, None
    a, b = rng.choice(len(scene["objects"]), size=2, replace=False)
    return int(a), int(b)


def _fields(scene: dict, a: int, b: int | None) -> dict[str, str]:
    objects = scene["objects"]
    fields = {"sa": objects[a]["shape"], "ca": objects[a]["color"], "za": objects[a]["size"],
              "bg": BACKGROUND_WORDS[scene["background"]], "n": NUMBER_WORDS[len(objects)],
              "shape_counts": _shape_counts(objects), "group": _group(objects)}
    if b is not None:
        fields.update(sb=objects[b]["shape"], cb=objects[b]["color"], zb=objects[b]["size"],
                      rel=RELATION_PHRASES[relation_between(objects[a], objects[b])])
    if scene["action"] is not None:
        fields.update(zip(("verb", "verbs", "verbp"), VERB_FORMS[scene["action"]["verb"]]))
    return fields


@functools.lru_cache(maxsize=None)
def _templates_using(available: frozenset[str]) -> tuple[Template, ...]:
    return tuple(t for t in TEMPLATES if t.fields <= available)


def _fitting(fields: dict[str, str | None]) -> tuple[Template, ...]:
    """Templates whose every field has a value ("n" needs >= 2 objects: no "an image with a shapes")."""
    available = frozenset(name for name, value in fields.items()
                          if value is not None and not (name == "n" and value == NUMBER_WORDS[1]))
    return _templates_using(available)


def _fill(template: Template, fields: dict) -> str:
    return fix_articles(template.text.format(**fields))


def sample_caption(scene: dict, rng: np.random.Generator) -> str:
    """The clean training caption: any fitting template; one that names the action with
    P = ACTION_CAPTION_PROB when the scene has one."""
    a, b = _roles(scene, rng)
    fields = _fields(scene, a, b)
    mention_action = scene["action"] is not None and rng.random() < ACTION_CAPTION_PROB
    pool = [t for t in _fitting(fields) if t.has_action == mention_action]
    return _fill(pool[rng.integers(len(pool))], fields)


def descriptive_templates(scene: dict, a: int, b: int | None) -> list[Template]:
    """Templates of level >= C1 that fit the scene: they name at least one attribute or relation."""
    return [t for t in _fitting(_fields(scene, a, b)) if t.level >= 1]


def sample_caption_set(scene: dict, rng: np.random.Generator, k: int) -> list[str]:
    """k captions from k different descriptive templates (retrieval sets: generic C0 captions such as
    "some shapes" would match every image and make retrieval ill-posed)."""
    a, b = _roles(scene, rng)
    pool = descriptive_templates(scene, a, b)
    if len(pool) < k:
        raise ValueError(f"captions_per_image={k} but only {len(pool)} descriptive templates fit this scene")
    fields = _fields(scene, a, b)
    return [_fill(pool[i], fields) for i in rng.choice(len(pool), size=k, replace=False)]


def draw_noise_flags(fractions: dict[str, float], rng: np.random.Generator) -> dict[str, bool]:
    """One independent Bernoulli draw per noise kind, always all five and in a fixed order."""
    draws = rng.random(len(NOISE_KINDS))
    return {kind: bool(u < fractions[kind]) for kind, u in zip(NOISE_KINDS, draws)}


def _mismatched_subject(scene: dict, rng: np.random.Generator) -> tuple[dict, int, int | None]:
    """Another random scene and its caption roles, redrawn until its main object's colour + shape
    appears nowhere in `scene`, so the caption built on it cannot describe `scene`."""
    present = {(o["color"], o["shape"]) for o in scene["objects"]}
    while True:
        other = sample_scene(rng)
        a, b = _roles(other, rng)
        if (other["objects"][a]["color"], other["objects"][a]["shape"]) not in present:
            return other, a, b


def product_caption(obj: dict, rng: np.random.Generator) -> str:
    """Product-listing style: attributes without any action ("red circle, large, free shipping")."""
    template = PRODUCT_TEMPLATES[rng.integers(len(PRODUCT_TEMPLATES))]
    return template.format(sa=obj["shape"], ca=obj["color"], za=obj["size"], num=int(rng.integers(2, 50)))


def uninformative_caption(rng: np.random.Generator) -> str:
    """Alt-text that says nothing about the content: "photo 1234", "IMG_0042.jpg", "red"."""
    template = UNINFORMATIVE_TEMPLATES[rng.integers(len(UNINFORMATIVE_TEMPLATES))]
    return template.format(num=int(rng.integers(1, 10000)), color=list(COLORS)[rng.integers(len(COLORS))])


def swap_attribute(caption: str, scene: dict, rng: np.random.Generator) -> str | None:
    """Replace one colour or size word with a wrong value: a size flips, a colour becomes one that no
    object of `scene` has. None when the caption has no such word."""
    matches = list(ATTRIBUTE_WORD.finditer(caption))
    if not matches:
        return None
    match = matches[rng.integers(len(matches))]
    word = match.group(0)
    if word in SIZES:
        new = SIZES[1 - SIZES.index(word)]
    else:
        choices = sorted(set(COLORS) - {o["color"] for o in scene["objects"]} - {word})
        new = choices[rng.integers(len(choices))]
    return fix_articles(caption[:match.start()] + new + caption[match.end():])


def noisy_caption(scene: dict, clean: str, flags: dict[str, bool],
                  rng: np.random.Generator) -> tuple[str, list[str]]:
    """Apply the caption noises whose flag is set; returns (caption, applied kinds in NOISE_KINDS order).

    `uninformative` replaces the caption outright (then `mismatch`, `product` and `wrong_attribute` have
    nothing to act on and are not applied). `mismatch` makes the caption describe another random scene;
    `product` rewrites it as a product listing (of that other scene when mismatched); `wrong_attribute`
    swaps one colour or size word; when the caption has none (a C0 caption), an attribute-bearing
    caption of the described scene is drawn first. `text_in_image` acts on the image, not here.
    """
    if flags["uninformative"]:
        return uninformative_caption(rng), ["uninformative"]
    applied = []
    described, a, b = scene, None, None
    if flags["mismatch"]:
        described, a, b = _mismatched_subject(scene, rng)
        applied.append("mismatch")
    if flags["product"]:
        obj = described["objects"][a if a is not None else rng.integers(len(described["objects"]))]
        caption = product_caption(obj, rng)
    elif flags["mismatch"]:
        pool = [t for t in descriptive_templates(described, a, b) if "{ca} {sa}" in t.text]
        caption = _fill(pool[rng.integers(len(pool))], _fields(described, a, b))
    else:
        caption = clean
    if flags["wrong_attribute"]:
        swapped = swap_attribute(caption, scene, rng)
        if swapped is None:
            a, b = _roles(described, rng)
            pool = [t for t in descriptive_templates(described, a, b) if t.fields & {"ca", "za"}]
            swapped = swap_attribute(_fill(pool[rng.integers(len(pool))], _fields(described, a, b)), scene, rng)
        caption = swapped
        applied.append("wrong_attribute")
    if flags["product"]:
        applied.append("product")
    return caption, sorted(applied, key=NOISE_KINDS.index)


def banner_words(caption: str, rng: np.random.Generator) -> list[str]:
    """Words of the caption to render into the image, from a random start in its first half."""
    words = caption.split()
    return words[int(rng.integers(max(1, (len(words) + 1) // 2))):]
