"""Decode any image file as the upright 8-bit RGB picture a person sees, or name the file that cannot be.

Why: photographs come in every form PIL can open, and a plain `Image.convert("RGB")` gets several wrong:
- EXIF orientation: a phone photo is stored sideways with a tag saying how to turn it; it is turned
  (`ImageOps.exif_transpose`), so boxes and features are those of the upright picture;
- 16-bit greyscale (PNG `I;16`, 32-bit `I`): `convert` clips every value above 255 to white; values are
  scaled to 8 bits instead (v / 257, so 65535 -> 255);
- float images (`F`): values in 0..1 are scaled to 0..255, others clipped;
- transparency (RGBA, LA, palette or greyscale with a transparent colour): `convert` keeps whatever colour
  lies under a transparent pixel; the picture is composited over white, as a viewer shows it;
- CMYK (a CMYK JPEG, Adobe's inverted form included) and YCbCr, palette, 1-bit, greyscale: PIL's conversion.
Anything PIL cannot open or fully decode (not an image, truncated, a decompression bomb over
`Image.MAX_IMAGE_PIXELS` x 2) becomes a DataError naming the path and PIL's reason; `ImageReader` applies
`regions.on_bad_image` to it (fail: stop; skip: list it in skipped.json).

A very large picture can be read at most `max_side` pixels on its longer side: a JPEG is decoded at a
reduced scale (`draft`), then any image is shrunk (box values are fractions of the picture's size, so they
do not change).

Use:
    image = read_image(path, max_side=1333)         # PIL RGB image
    reader = ImageReader(ds, on_bad_image="skip"); image = reader.read(image_id)   # None if skipped
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mvptr.data.coco import CocoFormatDataset
from mvptr.errors import DataError

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}


def _eight_bit(values: np.ndarray) -> Image.Image:
    """A greyscale array of 16-bit range as an 8-bit image (rounded v / 257)."""
    scaled = (np.clip(values.astype(np.float64), 0, 65535) / 257.0).round()
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """The decoded image as 8-bit RGB: deep greyscale scaled, transparency composited over white."""
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image)
        return (_eight_bit(values) if image.mode in _SIXTEEN_BIT or values.max(initial=0) > 255
                else Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = values * 255.0 if values.max(initial=0) <= 1.0 else values
        return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode in _ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: Path | str, max_side: int | None = None) -> Image.Image:
    """The upright RGB picture, fully decoded, its longer side at most `max_side`; DataError naming the path."""
    try:
        with Image.open(path) as image:
            if max_side is not None and image.format == "JPEG":
                image.draft(image.mode, (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale if that suffices
            rgb = to_rgb(ImageOps.exif_transpose(image))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return rgb


@dataclass
class ImageReader:
    """Reads images under the `on_bad_image` policy: `fail` raises, `skip` records the image and returns None."""

    ds: CocoFormatDataset
    on_bad_image: str
    max_side: int | None = None
    skipped: dict[int, dict[str, Any]] = field(default_factory=dict)

    def read(self, image_id: int) -> Image.Image | None:
        if image_id in self.skipped:
            return None
        path = self.ds.image_path(image_id)
        try:
            return read_image(path, self.max_side)
        except DataError as err:
            if self.on_bad_image == "fail":
                raise
            self.skipped[image_id] = {"image_id": image_id, "split": self.ds.splits[image_id], "path": str(path),
                                      "reason": str(err)}
            return None
