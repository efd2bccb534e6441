"""VQA v2 -> vqa/v2_OpenEnded_mscoco_{train,val,test}_questions.json + v2_mscoco_{split}_annotations.json.

Test-dev answers are not public, so VQA is scored locally: a question goes to the split of its image in the
corpus (train2014 images are Karpathy train; val2014 images are Karpathy restval -> train, val or test). No
question of a val or test image is in train, which SemVLP's QA pre-training relies on (mvptr.questions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mvptr.atomic import atomic_write_json
from mvptr.data.coco import read_json
from mvptr.data.formats.records import ImageIndex

SUBSETS = ("train2014", "val2014")
TASK_SPLITS = ("train", "val", "test")


def write_task(source: Any, source_dir: Path, out_dir: Path, index: ImageIndex) -> dict[str, Any]:
    questions: dict[str, list] = {split: [] for split in TASK_SPLITS}
    annotations: dict[str, list] = {split: [] for split in TASK_SPLITS}
    skipped = 0
    for subset in SUBSETS:
        qs = {q["question_id"]: q for q in
              read_json(source_dir / f"v2_OpenEnded_mscoco_{subset}_questions.json")["questions"]}
        for ann in read_json(source_dir / f"v2_mscoco_{subset}_annotations.json")["annotations"]:
            image = index.find("coco", str(ann["image_id"]))
            if image is None or image.split not in TASK_SPLITS:
                skipped += 1
                continue
            question = {**qs[ann["question_id"]], "image_id": image.id}
            questions[image.split].append(question)
            annotations[image.split].append({**ann, "image_id": image.id})
    for split in TASK_SPLITS:
        atomic_write_json(out_dir / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json",
                          {"questions": questions[split]})
        atomic_write_json(out_dir / "vqa" / f"v2_mscoco_{split}_annotations.json", {"annotations": annotations[split]})
    return {"questions": {split: len(questions[split]) for split in TASK_SPLITS}, "skipped": skipped}
