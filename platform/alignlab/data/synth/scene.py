"""Scene sampling for SynthCaps: 1-3 coloured shapes on a background, their spatial relations and at most
one action between two of them (docs/methods.md "CAT filtering": objects, attributes and actions are what caption
complexity and the action filter count).

A scene is a plain dict, JSON-ready:
`{"objects": [{"shape", "color", "size", "x", "y"}], "relations": [{"subject", "relation", "object"}],
"action": {"verb", "subject", "object"} | None, "background": str, "background_params": {...}}`.
`x`, `y` are the object centre as a fraction of the image side (y grows downwards), rounded to 3 decimals
so that the JSON and the rendering agree exactly. Object radii are `RADIUS[size]` times the image side,
times the object's `scale` (present only when the dataset's `object_scale` is not 1; see `object_radius`).
"""

from __future__ import annotations

import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (245, 215, 40),
    "purple": (145, 60, 200), "orange": (250, 140, 30), "pink": (250, 140, 200), "cyan": (50, 215, 230),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
RADIUS = {"small": 0.1, "large": 0.15}
BACKGROUNDS = ("plain", "gradient", "stripes", "dots")
RELATIONS = ("left of", "right of", "above", "below")
ACTIONS = ("chasing", "jumping over", "pushing")

NUM_OBJECTS_PROBS = (0.3, 0.4, 0.3)  # 1, 2, 3 objects
ACTION_PROB = 0.6                    # P(an action | at least two objects)
SAME_KIND_PROB = 0.25                # P(second object repeats the first one's shape and colour): "two red circles"
MARGIN = 0.02                        # free border, fraction of the image side
GAP = 0.04                           # minimum free space between two unrelated objects


def relation_between(subject: dict, obj: dict) -> str:
    """Where `subject` is relative to `obj` along the dominant axis of their centre offset."""
    dx, dy = obj["x"] - subject["x"], obj["y"] - subject["y"]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def object_radius(obj: dict) -> float:
    """An object's radius as a fraction of the image side."""
    return RADIUS[obj["size"]] * obj.get("scale", 1.0)


def _object(shape: str, color: str, size: str, x: float, y: float, scale: float = 1.0) -> dict:
    obj = {"shape": shape, "color": color, "size": size, "x": round(float(x), 3), "y": round(float(y), 3)}
    return obj | ({"scale": scale} if scale != 1.0 else {})


def _random_kind(rng: np.random.Generator) -> tuple[str, str, str]:
    shape, color, size = rng.random(3).tolist()  # one vector draw: much cheaper than three integers()
    return SHAPES[int(shape * len(SHAPES))], COLOR_NAMES[int(color * len(COLOR_NAMES))], SIZES[int(size * len(SIZES))]


def _background(rng: np.random.Generator) -> tuple[str, dict]:
    """Gray backgrounds only, so that every object colour keeps its name and contrast."""
    kind_draw, gray_draw, offset_draw, sign_draw, vertical_draw, period_draw = rng.random(6).tolist()
    gray, offset = 95 + int(75 * gray_draw), 25 + int(25 * offset_draw)
    second = min(max(gray + (offset if sign_draw < 0.5 else -offset), 40), 215)
    params = {"gray": gray, "second_gray": second, "vertical": vertical_draw < 0.5,
              "period": round(0.08 + 0.08 * period_draw, 3)}
    return BACKGROUNDS[int(kind_draw * len(BACKGROUNDS))], params


def _action_layout(verb: str, r_s: float, r_o: float, rng: np.random.Generator):
    """Centres of subject and object for a visible action, plus the box (x0, y0, x1, y1) its drawing uses.

    chasing: same height, a gap for the arrow and room behind the chaser for motion streaks.
    jumping over: the subject in mid-air right above the object, under a dotted arc from ground to ground.
    pushing: the two touch side by side, with room ahead of the pushed object for its arrow.
    """
    direction = 1 if rng.random() < 0.5 else -1
    if verb == "jumping over":
        half_width = r_o + 0.12
        ox = rng.uniform(max(0.3, half_width + MARGIN), min(0.7, 1 - half_width - MARGIN))
        oy = rng.uniform(0.62, 1 - MARGIN - r_o)
        sy = oy - r_o - r_s - rng.uniform(0.06, 0.1)
        if sy - r_s < MARGIN:  # large objects (object_scale > 1): lift the pair so the jumper stays inside
            oy, sy = oy + (MARGIN + r_s - sy), MARGIN + r_s
        return (ox, sy), (ox, oy), (ox - half_width, sy - r_s, ox + half_width, oy + r_o)
    behind, gap, ahead = (0.08, rng.uniform(0.12, 0.2), 0.0) if verb == "chasing" else (0.0, 0.01, 0.1)
    room = 1 - 2 * MARGIN - 2 * r_s - 2 * r_o
    if behind + gap + ahead > room:  # large objects (object_scale > 1): tighten the spacing to fit
        factor = 0.999 * room / (behind + gap + ahead)
        behind, gap, ahead = behind * factor, gap * factor, ahead * factor
    span = behind + 2 * r_s + gap + 2 * r_o + ahead
    start = rng.uniform(MARGIN, 1 - MARGIN - span)
    y = rng.uniform(MARGIN + max(r_s, r_o), 1 - MARGIN - max(r_s, r_o))
    sx_left = start + behind + r_s  # layout drawn left to right, mirrored when the motion goes left
    ox_left = sx_left + r_s + gap + r_o
    sx, ox = (sx_left, ox_left) if direction > 0 else (1 - sx_left, 1 - ox_left)
    box_x = (start, start + span) if direction > 0 else (1 - start - span, 1 - start)
    oy = float(np.clip(y + (rng.uniform(-0.04, 0.04) if verb == "chasing" else 0.0),
                       MARGIN + r_o, 1 - MARGIN - r_o))
    return (sx, y), (ox, oy), (box_x[0], min(y - r_s, oy - r_o), box_x[1], max(y + r_s, oy + r_o))


def _is_free(x: float, y: float, r: float, objects: list[dict], boxes: list[tuple]) -> bool:
    for other in objects:
        if math.hypot(x - other["x"], y - other["y"]) < r + object_radius(other) + GAP:
            return False
    for x0, y0, x1, y1 in boxes:
        nearest_x, nearest_y = min(max(x, x0), x1), min(max(y, y0), y1)
        if math.hypot(x - nearest_x, y - nearest_y) < r + GAP:
            return False
    return True


def _place_free(kind: tuple[str, str, str], objects: list[dict], boxes: list[tuple],
                rng: np.random.Generator, attempts: int = 40, scale: float = 1.0) -> dict | None:
    """Rejection-sample a free spot; None when the image is too full (the object is then left out)."""
    shape, color, size = kind
    r = RADIUS[size] * scale
    for _ in range(attempts):
        x, y = rng.uniform(MARGIN + r, 1 - MARGIN - r, size=2)
        if _is_free(x, y, r, objects, boxes):
            return _object(shape, color, size, x, y, scale)
    return None


def pairwise_relations(objects: list[dict]) -> list[dict]:
    """One relation per unordered pair (i < j): where object i is relative to object j."""
    return [{"subject": i, "relation": relation_between(objects[i], objects[j]), "object": j}
            for i in range(len(objects)) for j in range(i + 1, len(objects))]


def sample_scene(rng: np.random.Generator, object_scale: float = 1.0, max_objects: int = 3) -> dict:
    """A training scene: 1-3 objects (at most `max_objects`: a larger draw is cut down to it), relations
    between all pairs, an action with P = ACTION_PROB when there are at least two objects. Objects 0 and 1
    are the action's subject and object. `object_scale` multiplies every radius (SynthCaps difficulty)."""
    n_objects = 1 + int(np.searchsorted(np.cumsum(NUM_OBJECTS_PROBS), rng.random(), side="right"))
    n_objects = min(n_objects, max_objects)
    kinds = [_random_kind(rng) for _ in range(n_objects)]
    if n_objects >= 2 and rng.random() < SAME_KIND_PROB:
        kinds[1] = (kinds[0][0], kinds[0][1], kinds[1][2])
    objects: list[dict] = []
    boxes: list[tuple] = []
    action = None
    if n_objects >= 2 and rng.random() < ACTION_PROB:
        verb = ACTIONS[rng.integers(len(ACTIONS))]
        (sx, sy), (ox, oy), box = _action_layout(verb, RADIUS[kinds[0][2]] * object_scale,
                                                 RADIUS[kinds[1][2]] * object_scale, rng)
        objects = [_object(*kinds[0], sx, sy, object_scale), _object(*kinds[1], ox, oy, object_scale)]
        boxes.append(box)
        action = {"verb": verb, "subject": 0, "object": 1}
    for kind in kinds[len(objects):]:
        placed = _place_free(kind, objects, boxes, rng, scale=object_scale)
        if placed is not None:
            objects.append(placed)
    background, params = _background(rng)
    return {"objects": objects, "relations": pairwise_relations(objects), "action": action,
            "background": background, "background_params": params}


def sample_single_object_scene(rng: np.random.Generator, shape: str | None = None,
                               color: str | None = None, size: str | None = None, object_scale: float = 1.0) -> dict:
    """A one-object scene for classification sets; `shape` / `color` / `size` fix what is given, the rest
    is random."""
    kind = _random_kind(rng)
    kind = (shape or kind[0], color or kind[1], size or kind[2])
    placed = _place_free(kind, [], [], rng, scale=object_scale)  # always succeeds: an empty image has room
    background, params = _background(rng)
    return {"objects": [placed], "relations": [], "action": None,
            "background": background, "background_params": params}
