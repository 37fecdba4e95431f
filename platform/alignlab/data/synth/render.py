"""Drawing SynthCaps scenes with PIL, plus the distribution-shift renderings (effective
robustness): `sketch`, `texture`, `clutter`. (`resample` needs no renderer: it is a fresh draw of the
training distribution.)

Everything is drawn at SUPERSAMPLE times the target size and box-downsampled, so that 64 x 64 shapes keep
clean, distinguishable edges. Actions are drawn so that a model can see them: motion streaks behind the
chaser and an arrow towards the target (chasing), a dotted arc from ground to ground over the object
(jumping over), impact ticks at the touching point and an arrow ahead of the pushed object (pushing).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from alignlab.data.synth.scene import COLORS, object_radius

SUPERSAMPLE = 2
OUTLINE = (25, 25, 25)
MARK = (20, 20, 20)
TEXTURES = ("checker", "hatch", "polka", "rings")  # fills never used in training (solid fills only)


def _regular(points: int, start_deg: float, radius: float = 1.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360 * k / points)),
             radius * math.sin(math.radians(start_deg + 360 * k / points))) for k in range(points)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, -90), _regular(5, -54, 0.42)
    return [p for pair in zip(outer, inner) for p in pair]


def _cross(arm: float = 0.34) -> list[tuple[float, float]]:
    a, b = arm, 0.95
    return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]


def _heart(steps: int = 36) -> list[tuple[float, float]]:
    """The classic parametric heart x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t, centred."""
    ts = np.linspace(0, 2 * np.pi, steps, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    y = y - (y.max() + y.min()) / 2
    scale = 1.0 / max(np.abs(x).max(), np.abs(y).max())
    return list(zip((x * scale).tolist(), (y * scale).tolist()))


# Unit outlines (radius 1, y down). The circle is drawn as an ellipse instead.
UNIT_POLYGONS = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": _regular(3, -90),
    "star": _star(),
    "hexagon": _regular(6, 0),
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
    "cross": _cross(),
    "heart": _heart(),
}


def _line_width(n: int) -> int:
    """About one output pixel per 64 pixels of image side, in supersampled pixels."""
    return max(1, round(n / SUPERSAMPLE / 64)) * SUPERSAMPLE


def _geometry(obj: dict, n: int) -> tuple[float, float, float]:
    return obj["x"] * n, obj["y"] * n, object_radius(obj) * n


def _fill_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx + r * ux, cy + r * uy) for ux, uy in UNIT_POLYGONS[shape]], fill=fill)


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, n: int, fill, outline) -> None:
    """Filled shape with an outline; `fill=None` draws the outline only.

    The filled case paints the outline colour at full radius and the fill over it at a radius one line
    width smaller: a third of the cost of PIL's wide-outline polygon, the main drawing cost per image.
    """
    cx, cy, r = _geometry(obj, n)
    width = _line_width(n)
    if fill is not None:
        _fill_shape(draw, obj["shape"], cx, cy, r, outline)
        _fill_shape(draw, obj["shape"], cx, cy, r - 1.3 * width, fill)
    elif obj["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=outline, width=width)
    else:
        draw.polygon([(cx + r * ux, cy + r * uy) for ux, uy in UNIT_POLYGONS[obj["shape"]]],
                     outline=outline, width=width)


@functools.lru_cache(maxsize=256)
def _pattern(kind: str, n: int, vertical: bool, period: int) -> np.ndarray:
    """Weight of the second gray per pixel, in [0, 1]: a ramp (gradient), bands (stripes) or a dot grid.
    Cached: there are few distinct (kind, size, direction, period) combinations."""
    coords = np.arange(n)
    if kind == "dots":
        offset = np.abs(coords % period - period / 2)
        return (offset[:, None] ** 2 + offset[None, :] ** 2 < (period / 5) ** 2).astype(np.float32)
    profile = np.linspace(0, 1, n) if kind == "gradient" else ((coords // (period // 2)) % 2).astype(float)
    return np.broadcast_to(profile[:, None] if vertical else profile[None, :], (n, n)).astype(np.float32)


def _background(kind: str, params: dict, n: int) -> Image.Image:
    """plain: one gray; gradient: linear ramp between two grays; stripes / dots: second gray pattern."""
    gray, second = params["gray"], params["second_gray"]
    if kind == "plain":
        return Image.new("RGB", (n, n), (gray,) * 3)
    weight = _pattern(kind, n, params["vertical"], max(4, round(params["period"] * n)))
    plane = (gray + (second - gray) * weight).astype(np.uint8)
    return Image.fromarray(plane, mode="L").convert("RGB")


def _arrow(draw: ImageDraw.ImageDraw, start, end, width: int, head: float) -> None:
    (x0, y0), (x1, y1) = start, end
    angle = math.atan2(y1 - y0, x1 - x0)
    draw.line((x0, y0, x1, y1), fill=MARK, width=width)
    left = (x1 - head * math.cos(angle - 0.5), y1 - head * math.sin(angle - 0.5))
    right = (x1 - head * math.cos(angle + 0.5), y1 - head * math.sin(angle + 0.5))
    draw.polygon([(x1, y1), left, right], fill=MARK)


def _draw_action(draw: ImageDraw.ImageDraw, scene: dict, n: int) -> None:
    """Drawn before the objects, so the objects sit on top of their own action marks."""
    action = scene["action"]
    sx, sy, rs = _geometry(scene["objects"][action["subject"]], n)
    ox, oy, ro = _geometry(scene["objects"][action["object"]], n)
    width, unit = _line_width(n), n / 64
    if action["verb"] == "jumping over":
        ground, half_width = oy + ro, ro + 0.12 * n
        for k in range(13):  # dotted upper half-ellipse through the jumper's centre
            t = math.pi * k / 12
            x, y = ox - half_width * math.cos(t), ground - (ground - sy) * math.sin(t)
            draw.ellipse((x - width, y - width, x + width, y + width), fill=MARK)
        return
    d = 1 if ox > sx else -1
    if action["verb"] == "chasing":
        for k, length in zip((-0.5, 0.0, 0.5), (0.05, 0.08, 0.05)):  # motion streaks behind the chaser
            x0 = sx - d * (rs + 0.01 * n)
            draw.line((x0, sy + k * rs, x0 - d * length * n, sy + k * rs), fill=MARK, width=width)
        start = (sx + d * (rs + 0.02 * n), sy + (oy - sy) * 0.2)
        end = (ox - d * (ro + 0.02 * n), oy - (oy - sy) * 0.2)
        _arrow(draw, start, end, int(1.5 * width), 3.5 * unit)
        return
    contact_x, reach = sx + d * rs, min(rs, ro)  # pushing: impact ticks above and below the contact
    for side in (-1, 1):
        for dx in (-0.03, 0.03):
            base_y = sy + side * (reach + 0.02 * n)
            draw.line((contact_x + dx * n, base_y, contact_x + 1.8 * dx * n, base_y + side * 0.06 * n),
                      fill=MARK, width=width)
    _arrow(draw, (ox + d * (ro + 0.015 * n), oy), (ox + d * (ro + 0.09 * n), oy), int(1.5 * width), 3.0 * unit)


def render_scene(scene: dict, image_size: int) -> Image.Image:
    """The training rendering: solid fills with a dark outline, action marks, background pattern."""
    n = image_size * SUPERSAMPLE
    image = _background(scene["background"], scene["background_params"], n)
    draw = ImageDraw.Draw(image)
    if scene["action"] is not None:
        _draw_action(draw, scene, n)
    for obj in scene["objects"]:
        _draw_object(draw, obj, n, COLORS[obj["color"]], OUTLINE)
    return image.reduce(SUPERSAMPLE)


def render_sketch(scene: dict, image_size: int) -> Image.Image:
    """Shift `sketch`: outlines only, no fill colour, on white."""
    n = image_size * SUPERSAMPLE
    image = Image.new("RGB", (n, n), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if scene["action"] is not None:
        _draw_action(draw, scene, n)
    for obj in scene["objects"]:
        _draw_object(draw, obj, n, None, OUTLINE)
    return image.reduce(SUPERSAMPLE)


def _texture(kind: str, color: tuple, n: int, period: int) -> Image.Image:
    ys, xs = np.mgrid[0:n, 0:n]
    if kind == "checker":
        mask = ((xs // period) + (ys // period)) % 2 == 0
    elif kind == "hatch":
        mask = ((xs + ys) // max(1, period // 2)) % 2 == 0
    elif kind == "polka":
        mask = (xs % period - period / 2) ** 2 + (ys % period - period / 2) ** 2 < (period / 3) ** 2
    else:  # rings
        mask = (np.hypot(xs - n / 2, ys - n / 2) // max(1, period // 2)) % 2 == 0
    pixels = np.where(mask[..., None], np.array(color, np.uint8), np.array((245, 245, 245), np.uint8))
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def render_textured(scene: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Shift `texture`: each object filled with a two-tone pattern (checker, hatch, polka, rings)."""
    n = image_size * SUPERSAMPLE
    image = _background(scene["background"], scene["background_params"], n)
    for obj in scene["objects"]:
        mask = Image.new("L", (n, n), 0)
        _draw_object(ImageDraw.Draw(mask), obj, n, 255, 255)
        kind = TEXTURES[rng.integers(len(TEXTURES))]
        image.paste(_texture(kind, COLORS[obj["color"]], n, int(rng.integers(3, 6)) * SUPERSAMPLE), mask=mask)
        _draw_object(ImageDraw.Draw(image), obj, n, None, OUTLINE)
    return image.reduce(SUPERSAMPLE)


def render_cluttered(scene: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Shift `clutter`: the training rendering plus distractor fragments (strokes, zigzags, open arcs;
    never a closed shape, so the label stays unambiguous) and salt-and-pepper pixel noise."""
    n = image_size * SUPERSAMPLE
    image = _background(scene["background"], scene["background_params"], n)
    draw = ImageDraw.Draw(image)
    palette = list(COLORS.values()) + [(255, 255, 255), (0, 0, 0)]
    for _ in range(int(rng.integers(6, 11))):
        color = palette[rng.integers(len(palette))]
        x, y = rng.uniform(0, n, size=2)
        kind = rng.integers(3)
        if kind == 0:
            dx, dy = rng.uniform(-0.2 * n, 0.2 * n, size=2)
            draw.line((x, y, x + dx, y + dy), fill=color, width=2 * _line_width(n))
        elif kind == 1:
            points = [(x + k * 0.04 * n, y + (k % 2) * 0.05 * n) for k in range(5)]
            draw.line(points, fill=color, width=_line_width(n))
        else:
            r = rng.uniform(0.04, 0.08) * n
            start = float(rng.uniform(0, 360))
            draw.arc((x - r, y - r, x + r, y + r), start, start + 120, fill=color, width=2 * _line_width(n))
    for obj in scene["objects"]:
        _draw_object(draw, obj, n, COLORS[obj["color"]], OUTLINE)
    pixels = np.array(image.reduce(SUPERSAMPLE))
    salt = rng.random(pixels.shape[:2]) < 0.04
    pixels[salt] = rng.integers(0, 256, size=(int(salt.sum()), 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def banner_height(image_size: int) -> int:
    return max(12, round(0.22 * image_size))


def draw_text_banner(image: Image.Image, words: list[str]) -> str:
    """Noise `text_in_image`: a white banner along the bottom edge with black text in PIL's default font,
    sized to the banner so that it stays readable (OCR-able at larger image sizes). Draws as many of
    `words` as fit the width (a single too-long word is cut) and returns exactly the text drawn."""
    width, height = image.size
    band = banner_height(height)
    font = _font(max(8, round(band * 0.75)))
    room = width - 4
    text = ""
    for word in words:
        candidate = f"{text} {word}" if text else word
        if font.getlength(candidate) > room:
            break
        text = candidate
    if not text and words:
        text = words[0]
        while len(text) > 1 and font.getlength(text) > room:
            text = text[:-1]
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height - band, width, height), fill=(255, 255, 255))
    left, top, right, bottom = font.getbbox(text)
    draw.text(((width - (right - left)) / 2 - left, height - band + (band - (bottom - top)) / 2 - top),
              text, fill=(0, 0, 0), font=font)
    return text
