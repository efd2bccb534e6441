"""Readers that map each download source's files onto the prepared format (mvptr.data.corpus writes it).

Why: every source publishes its own layout (COCO's instances and Karpathy's split, Visual Genome's region
descriptions, img2dataset's shards, VQA's question/annotation pairs, a Python 2 pickle for RefCOCO+, ...); each
reader turns one layout into the same records, so that the corpus step, and everything after it, never looks at
a source's format again.

- An image source's `read_images(source, source_dir, local)` gives `SourceImage`s: the prepared id (the source's
  `id_offset` + its own id), the file (relative to resources/downloads, or absolute for a local folder), the split
  the source gives it, captions, gold objects and aliases (("coco", "391895"), ("flickr", "4385058960")) by which
  the same photo is recognised across sources.
- A task source's `write_task(source, source_dir, out_dir, index)` writes the task files the evaluation reads
  (mvptr.data.task_files) with prepared image ids, resolving its records through the `ImageIndex`; it returns
  its counts (examples per split, examples skipped because their image is not in the corpus).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mvptr.data.formats import coco2014, flickr30k, nlvr2, refcoco, snli_ve, visual_genome, vqa_v2, web_captions
from mvptr.data.formats.records import ImageIndex, SourceImage

IMAGE_READERS: dict[str, Callable[..., list[SourceImage]]] = {
    "coco2014": coco2014.read_images, "visual_genome": visual_genome.read_images,
    "flickr30k": flickr30k.read_images, "web_captions": web_captions.read_images, "nlvr2": nlvr2.read_images}
TASK_WRITERS: dict[str, Callable[..., dict[str, Any]]] = {
    "vqa_v2": vqa_v2.write_task, "snli_ve": snli_ve.write_task, "refcoco": refcoco.write_task,
    "nlvr2": nlvr2.write_task}

__all__ = ["IMAGE_READERS", "TASK_WRITERS", "ImageIndex", "SourceImage"]
