"""Scenes of the synthetic world: the vocabulary, how scenes are sampled, and how to query them.

Why: every image of the synthetic world is drawn from a `Scene` (1-4 coloured shapes at
non-overlapping positions), and everything else - pixels, captions, VQA/SNLI-VE/RefCOCO/NLVR2
files - is derived from scenes. Keeping the vocabulary, the geometry of relations and the
"which objects fit this description" queries here makes this module the single source of
truth that all the others (and the tests) agree on.

Use:
    rng = np.random.default_rng([seed, 0])
    scenes = sample_scenes(rng, num_images=40, image_size=128, twin_fraction=0.3)
    scenes[0].matching(Description(shape="circle", colour="red"))   # -> [Object, ...]
    relation(a, b)                                                 # -> "left of" | ... | "below"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
# Saturated, far-apart colours so that a small CNN separates them easily on the grey background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
# Named OBJECT_SIZES (not SIZES) because `SIZES` is the public name of the world-size presets.
OBJECT_SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Side of an object's box as a fraction of the image side; far apart so that "small"/"large" is visible.
_SIZE_FRACTION = {"small": 0.17, "large": 0.30}
_SIZE_JITTER = 0.1
_MAX_OBJECTS = 4
# Repeating an earlier object's shape (and sometimes its colour) creates counts ("two blue squares")
# and objects that attributes alone cannot single out, which referring expressions then resolve
# with relations.
_REPEAT_SHAPE_PROB = 0.35
_REPEAT_COLOUR_PROB = 0.6
_PLACEMENT_TRIES = 100
# Forms of attribute-only descriptions, shortest first: "circle", "red circle", "small circle", ...
CATEGORY_IDS: dict[str, int] = {shape: k + 1 for k, shape in enumerate(SHAPES)}  # COCO category ids
REFERRING_FORMS: tuple[tuple[str, ...], ...] = (("shape",), ("colour", "shape"), ("size", "shape"),
                                               ("size", "colour", "shape"))

T = TypeVar("T")


@dataclass(frozen=True)
class Object:
    """One shape in an image. `id` is its instance-annotation id, unique over the whole world."""

    id: int
    shape: str
    colour: str
    size: str
    bbox: tuple[int, int, int, int]  # x, y, w, h in pixels

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "shape": self.shape, "colour": self.colour, "size": self.size,
                "bbox": list(self.bbox)}


@dataclass(frozen=True)
class Description:
    """A bag of attributes ("small red circle"); a field left None matches anything."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: Object) -> bool:
        return all(value is None or getattr(obj, name) == value
                   for name, value in (("shape", self.shape), ("colour", self.colour), ("size", self.size)))


def describe(obj: Object, fields: Sequence[str]) -> Description:
    """The description of `obj` that names only `fields` (e.g. ("colour", "shape"))."""
    return Description(**{name: getattr(obj, name) for name in fields})


@dataclass(frozen=True)
class Scene:
    """The content of one image; a twin (see `make_twin`) records its source in `twin_of`."""

    image_id: int
    image_size: int  # width == height
    objects: tuple[Object, ...]
    twin_of: int | None = None
    twin_kind: str | None = None  # "colour_swap" | "mirror" for twins

    @property
    def file_name(self) -> str:
        return f"synth_{self.image_id:06d}.png"

    def matching(self, desc: Description) -> list[Object]:
        return [obj for obj in self.objects if desc.matches(obj)]

    def exists_relation(self, subject: Description, rel: str, obj: Description) -> bool:
        """Is some object fitting `subject` in relation `rel` to another object fitting `obj`?"""
        return any(a.id != b.id and relation(a, b) == rel
                   for a in self.matching(subject) for b in self.matching(obj))

    def to_json(self) -> dict[str, object]:
        return {"objects": [obj.to_json() for obj in self.objects], "twin_of": self.twin_of,
                "twin_kind": self.twin_kind}


def relation(subject: Object, obj: Object) -> str:
    """The one spatial relation of `subject` to `obj`, along the axis where their centres differ most.

    Exactly one relation per ordered pair (ties go to the horizontal axis), so that a caption, a
    question and its answer can never disagree about which relation holds.
    """
    (sx, sy), (ox, oy) = subject.centre, obj.centre
    dx, dy = ox - sx, oy - sy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def unique_description(scene: Scene, obj: Object,
                       forms: Sequence[Sequence[str]] = REFERRING_FORMS) -> Description | None:
    """The first of `forms` whose description of `obj` fits no other object of the scene, or None."""
    for fields in forms:
        desc = describe(obj, fields)
        if scene.matching(desc) == [obj]:
            return desc
    return None


def choose(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One of `options`, uniformly (a plain Python value, unlike `rng.choice`'s numpy scalars)."""
    return options[int(rng.integers(len(options)))]


def pick_objects(rng: np.random.Generator, scene: Scene, k: int) -> list[Object]:
    """`k` distinct objects of the scene (fewer if it has fewer), in random order."""
    return [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))[:k]]


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0]
                or a[1] + a[3] + gap <= b[1] or b[1] + b[3] + gap <= a[1])


def _place(rng: np.random.Generator, sides: Sequence[int], image_size: int) -> list[tuple[int, int, int, int]]:
    """Rejection-sample non-overlapping square boxes inside a margin; a box that finds no room is dropped."""
    margin = max(2, round(0.04 * image_size))
    boxes: list[tuple[int, int, int, int]] = []
    for side in sides:
        for _ in range(_PLACEMENT_TRIES):
            x = int(rng.integers(margin, image_size - margin - side + 1))
            y = int(rng.integers(margin, image_size - margin - side + 1))
            box = (x, y, side, side)
            if not any(_overlaps(box, other, margin) for other in boxes):
                boxes.append(box)
                break
    return boxes


def sample_scene(rng: np.random.Generator, image_id: int, image_size: int, first_object_id: int) -> Scene:
    """A fresh scene of 1-4 objects with ids first_object_id, first_object_id + 1, ..."""
    attributes: list[tuple[str, str, str]] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        if attributes and rng.random() < _REPEAT_SHAPE_PROB:
            base_shape, base_colour, _ = attributes[int(rng.integers(len(attributes)))]
            colour = base_colour if rng.random() < _REPEAT_COLOUR_PROB else choose(rng, list(COLOURS))
            attributes.append((base_shape, colour, choose(rng, OBJECT_SIZES)))
        else:
            attributes.append((choose(rng, SHAPES), choose(rng, list(COLOURS)), choose(rng, OBJECT_SIZES)))
    sides = [round(_SIZE_FRACTION[size] * image_size * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER))
             for _, _, size in attributes]
    boxes = _place(rng, sides, image_size)
    objects = tuple(Object(first_object_id + k, shape, colour, size, box)
                    for k, ((shape, colour, size), box) in enumerate(zip(attributes, boxes)))
    return Scene(image_id, image_size, objects)


def make_twin(rng: np.random.Generator, source: Scene, image_id: int, first_object_id: int) -> Scene | None:
    """A scene with the same bag of objects as `source` but a different binding, or None if impossible.

    Either the colours of two differently coloured objects are swapped (preferring two different
    shapes, so that "red circle, blue square" becomes "blue circle, red square"), or the layout is
    mirrored horizontally (every "left of" becomes "right of"). A retrieval model must then look at
    which attribute goes with which object, and where, not only at the bag of words.
    """
    objs = source.objects
    if len(objs) < 2:
        return None
    pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs)) if objs[i].colour != objs[j].colour]
    mirrored = [replace(o, bbox=(source.image_size - o.bbox[0] - o.bbox[2],) + o.bbox[1:]) for o in objs]
    kinds = (["colour_swap"] if pairs else []) + (["mirror"] if mirrored != list(objs) else [])
    if not kinds:
        return None
    kind = choose(rng, kinds)
    if kind == "mirror":
        twin = mirrored
    else:
        pairs = [(i, j) for i, j in pairs if objs[i].shape != objs[j].shape] or pairs
        i, j = choose(rng, pairs)
        twin = list(objs)
        twin[i], twin[j] = replace(objs[i], colour=objs[j].colour), replace(objs[j], colour=objs[i].colour)
    renumbered = tuple(replace(o, id=first_object_id + k) for k, o in enumerate(twin))
    return Scene(image_id, source.image_size, renumbered, twin_of=source.image_id, twin_kind=kind)


def sample_scenes(rng: np.random.Generator, num_images: int, image_size: int, twin_fraction: float) -> list[Scene]:
    """Scenes for image ids 1..num_images; about `twin_fraction` of them are twins of the image before.

    Only an original scene with two or more objects can have a twin (a twin of a twin could undo
    the change), so such a scene is followed by its twin with probability f / ((1 - f) * p), p the
    share of scenes with two or more objects; the expected share of twins is then f. It cannot
    exceed p / (1 + p) = 3/7: any larger f gives that (every twinnable original gets a twin).
    """
    twinnable_share = (_MAX_OBJECTS - 1) / _MAX_OBJECTS  # the object count is uniform over 1.._MAX_OBJECTS
    follow_prob = min(1.0, twin_fraction / ((1.0 - twin_fraction) * twinnable_share)) if twin_fraction < 1 else 1.0
    scenes: list[Scene] = []
    next_object_id = 1
    for image_id in range(1, num_images + 1):
        scene = None
        previous = scenes[-1] if scenes else None
        if previous is not None and previous.twin_of is None and rng.random() < follow_prob:
            scene = make_twin(rng, previous, image_id, next_object_id)
        if scene is None:
            scene = sample_scene(rng, image_id, image_size, next_object_id)
        scenes.append(scene)
        next_object_id += len(scene.objects)
    return scenes
