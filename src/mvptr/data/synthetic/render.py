"""Draw a scene of the synthetic world as an RGB image, and give each shape its outline polygon.

Why: the pixels and the COCO `segmentation` polygons must come from the same outline, and the
PNG bytes must be a pure function of (scene, seed) so that a regenerated world is byte-identical.

Use:
    image = render_scene(scene, np.random.default_rng([seed, 1, scene.image_id]))
    data = png_bytes(image)                       # deterministic: no metadata, no timestamps
    outline("star", (10, 20, 30, 30))             # [(x, y), ...] spanning exactly that box
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from mvptr.data.synthetic.scene import BACKGROUND, COLOURS, Scene

# Grey-level noise amplitude of the background: enough that the background is not a constant
# (so a model cannot use exact pixel values), far too little to be mistaken for an object.
_NOISE = 12
_CIRCLE_VERTICES = 32


def _normalised(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale points so that their bounding box is exactly the unit square."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return tuple(((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points)


def _regular(vertices: int, radii: tuple[float, ...], start: float) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (or a star, with alternating radii), counter-clockwise from `start`."""
    return [(radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / vertices),
             radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / vertices)) for k in range(vertices)]


# Each outline spans the unit square exactly, so a shape's tight bounding box is its placement box.
_UNIT_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "circle": _normalised(_regular(_CIRCLE_VERTICES, (1.0,), 0.0)),
    "square": ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "star": _normalised(_regular(10, (1.0, 0.45), -math.pi / 2)),
    "hexagon": ((0.0, 0.5), (0.25, 0.0), (0.75, 0.0), (1.0, 0.5), (0.75, 1.0), (0.25, 1.0)),
}


def outline(shape: str, bbox: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """The polygon of `shape` drawn in box (x, y, w, h), in pixel coordinates."""
    x, y, w, h = bbox
    return [(x + u * w, y + v * h) for u, v in _UNIT_OUTLINES[shape]]


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene's objects as filled polygons on a noisy mid-grey background."""
    n = scene.image_size
    noise = rng.integers(-_NOISE, _NOISE + 1, size=(n, n, 1), dtype=np.int16)
    pixels = np.clip(np.asarray(BACKGROUND, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)  # uint8 (n, n, 3) -> RGB
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw.polygon(outline(obj.shape, obj.bbox), fill=COLOURS[obj.colour])
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding with no text chunks or timestamps (Pillow adds none unless asked)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
