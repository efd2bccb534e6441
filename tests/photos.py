"""Real photographs of every kind a user's folder holds, made from the photos scikit-image's wheel ships.

Why: the detector path must read what people really have - phone photos stored sideways, scans in 16-bit
greyscale, logos with transparency, print-shop CMYK JPEGs, palette GIF-likes, huge and tiny pictures, and
broken files. scikit-image ships real photographs in its wheel (skimage/data: astronaut, chelsea the cat,
coffee, the cameraman, a rocket, ...); they are read as files, without importing scikit-image.

Each kind comes with its *reference*: the plain 8-bit RGB picture a viewer shows, which the detector must
see whatever the file's form (for EXIF-rotated: the upright picture; for RGBA: composited over white).

Use:
    kinds = write_image_kinds(folder)      # -> {kind: ImageKind(path, reference or None if unreadable)}
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
_EXIF_ORIENTATION = 0x0112
# EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise to be upright, so the stored
# picture is the upright one turned 90 degrees counter-clockwise.
_ROTATE_90_CW = 6


def photo(name: str) -> Image.Image:
    """One of scikit-image's shipped photographs, fully loaded."""
    with Image.open(SKIMAGE_DATA / name) as image:
        image.load()
        return image


@dataclass(frozen=True)
class ImageKind:
    path: Path
    reference: Image.Image | None  # the RGB picture it shows; None: unreadable, must be reported


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def write_image_kinds(folder: Path) -> dict[str, ImageKind]:
    """Files of every kind under `folder`, named `<kind>.<ext>`, with what each must read as."""
    folder.mkdir(parents=True, exist_ok=True)
    astronaut, chelsea, coffee = photo("astronaut.png"), photo("chelsea.png"), photo("coffee.png")
    camera, rocket = photo("camera.png"), photo("rocket.jpg")
    kinds: dict[str, ImageKind] = {}

    def add(kind: str, image: Image.Image, name: str, reference: Image.Image | None, **options) -> None:
        kinds[kind] = ImageKind(_save(image, folder / name, **options), reference)

    add("rgb", astronaut.convert("RGB"), "rgb.png", astronaut.convert("RGB"))
    add("rgb_jpeg", rocket, "rgb_jpeg.jpg", None, quality=95)
    kinds["rgb_jpeg"] = ImageKind(kinds["rgb_jpeg"].path, Image.open(kinds["rgb_jpeg"].path).convert("RGB"))
    add("grayscale", camera, "grayscale.png", camera.convert("RGB"))
    sixteen = Image.fromarray(np.asarray(camera, dtype=np.uint16) * 257)  # the same picture at 16 bits
    add("gray16", sixteen, "gray16.png", camera.convert("RGB"))
    # RGBA: the photo, its left third transparent over noise (a viewer shows white there).
    rgba = np.dstack([np.asarray(chelsea), np.full(chelsea.size[::-1], 255, np.uint8)])
    third = rgba.shape[1] // 3
    rgba[:, :third, :3] = np.random.default_rng(0).integers(0, 255, (rgba.shape[0], third, 3))
    rgba[:, :third, 3] = 0
    reference = np.asarray(chelsea).copy()
    reference[:, :third] = 255
    add("rgba", Image.fromarray(rgba, mode="RGBA"), "rgba.png", Image.fromarray(reference))
    palette = coffee.quantize(colors=64)
    add("palette", palette, "palette.png", palette.convert("RGB"))
    upright = chelsea.convert("RGB")
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = _ROTATE_90_CW
    add("exif_rotated", upright.transpose(Image.Transpose.ROTATE_90), "exif_rotated.png", upright, exif=exif)
    # CMYK JPEG: decoded back to RGB by PIL; its reference is the photo (JPEG loss bounded in the test).
    add("cmyk_jpeg", coffee.convert("CMYK"), "cmyk_jpeg.jpg", coffee.convert("RGB"), quality=95)
    large = rocket.resize((rocket.width * 12, rocket.height * 12), Image.Resampling.BILINEAR)  # 5,424 x 3,432
    add("very_large", large, "very_large.jpg", large, quality=90)
    add("one_pixel", astronaut.convert("RGB").crop((100, 100, 101, 101)), "one_pixel.png",
        astronaut.convert("RGB").crop((100, 100, 101, 101)))
    data = (SKIMAGE_DATA / "rocket.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    kinds["truncated"] = ImageKind(folder / "truncated.jpg", None)
    (folder / "not_an_image.jpg").write_text("this is a caption file, not a picture\n")
    kinds["not_an_image"] = ImageKind(folder / "not_an_image.jpg", None)
    return kinds
