"""The records every source reader produces (`SourceImage`) and the index task writers resolve images through.

    index = ImageIndex(images)
    index.find("coco", "391895")        # the SourceImage of COCO image 391895, or None
    index.add(image)                     # a pre-training image (an alias keeps naming the first image with it)
    index.add_missing(image)             # an image a task needs, unless the corpus has it already
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class SourceImage:
    id: int                                   # prepared id: the source's id_offset + its own id
    file: str                                 # relative to resources/downloads, or an absolute path
    split: str                                # train | val | test (the source's own split), or task
    width: int | None = None
    height: int | None = None
    captions: list[str] = field(default_factory=list)
    # ([x, y, w, h] in pixels, category name, prepared annotation id: the source's id_offset + its own id)
    objects: list[tuple[list[float], str, int]] = field(default_factory=list)
    aliases: tuple[tuple[str, str], ...] = ()


class ImageIndex:
    """The corpus's images by prepared id and by alias."""

    def __init__(self, images: Iterable[SourceImage] = ()) -> None:
        self.images: dict[int, SourceImage] = {}
        self._aliases: dict[tuple[str, str], int] = {}
        for image in images:
            self.add(image)

    def add(self, image: SourceImage) -> None:
        if image.id in self.images:
            raise ValueError(f"two images with prepared id {image.id}: {self.images[image.id].file}, {image.file}")
        self.images[image.id] = image
        for alias in image.aliases:
            self._aliases.setdefault(alias, image.id)

    def add_missing(self, image: SourceImage) -> SourceImage:
        """The corpus's image with one of `image`'s aliases, or `image`, added."""
        for alias in image.aliases:
            if alias in self._aliases:
                return self.images[self._aliases[alias]]
        self.add(image)
        return image

    def find(self, kind: str, value: str) -> SourceImage | None:
        image_id = self._aliases.get((kind, value))
        return self.images[image_id] if image_id is not None else None
