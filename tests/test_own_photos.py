"""A user's own COCO-format folder of real photographs, with every task's files, through the whole workflow.

The folder is the tiny synthetic world's annotations (captions, instances, Karpathy split, VQA v2, SNLI-VE,
RefCOCO and NLVR2 files, which name images by id or file name) over real photographs of every readable
kind (tests/photos.py: scikit-image's shipped photos as RGB/CMYK JPEG, greyscale, 16-bit, RGBA, palette,
EXIF-rotated, 5,424 px wide, 1x1), each image's boxes scaled to its photo; one image has no annotated object
and three have captions in Chinese, Russian and Arabic. Regions come from the detector path with random
weights; the model is tiny. Snakemake runs prepare_data -> ... -> evaluate_<task> for every task; without
the task files the dry run plans retrieval only and says why for each other task.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_mvptr
from photos import write_image_kinds
from test_detector import DETECTOR
from test_workflow import job_counts, snakemake

from mvptr.config import project_root
from mvptr.regions.images import read_image
from mvptr.regions.store import RegionStore

ROOT = project_root()
TASKS = ("retrieval", "vqa", "ve", "rec", "nlvr2")
TASK_FILES = {"vqa": "vqa", "ve": "snli_ve", "rec": "refcoco/refs.json", "nlvr2": "nlvr2"}
READABLE = ["rgb", "rgb_jpeg", "grayscale", "gray16", "rgba", "palette", "exif_rotated", "cmyk_jpeg",
            "very_large", "one_pixel"]
OTHER_SCRIPTS = ["一只猫坐在桌子旁边", "Кошка сидит рядом со столом", "قطة تجلس بجانب الطاولة"]


def photo_folder(world: Path, root: Path) -> tuple[dict[str, Path], int, list[int]]:
    """The folder's paths, the id of its image without objects and the caption ids in other scripts."""
    kinds = write_image_kinds(root / "kinds")
    images = root / "photos"
    images.mkdir()
    captions = json.loads((world / "annotations/captions.json").read_text())
    instances = json.loads((world / "annotations/instances.json").read_text())
    sizes = {}
    for k, image in enumerate(sorted(captions["images"], key=lambda im: im["id"])):
        # The photo's bytes under the world's file name (task files name images by it): PIL reads by content.
        source = kinds[READABLE[k % len(READABLE)]].path
        shutil.copyfile(source, images / image["file_name"])
        sizes[image["id"]] = (read_image(source).size, (image["width"], image["height"]))
    for data in (captions, instances):
        for image in data["images"]:
            image["width"], image["height"] = sizes[image["id"]][0]
    for ann in instances["annotations"]:  # the world's boxes, scaled to the photo shown in their place
        (width, height), (w0, h0) = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x * width / w0, y * height / h0, w * width / w0, h * height / h0]
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    train = [i for i, s in ((e["cocoid"], e["split"]) for e in
                            json.loads((world / "karpathy_split.json").read_text())["images"]) if s == "train"]
    no_objects = train[0]
    instances["annotations"] = [a for a in instances["annotations"] if a["image_id"] != no_objects]
    next_id = max(a["id"] for a in captions["annotations"]) + 1
    other = list(range(next_id, next_id + len(OTHER_SCRIPTS)))
    captions["annotations"] += [{"id": cid, "image_id": image_id, "caption": text}
                                for cid, image_id, text in zip(other, train[1:], OTHER_SCRIPTS)]
    (root / "captions.json").write_text(json.dumps(captions, ensure_ascii=False))
    (root / "instances.json").write_text(json.dumps(instances))
    for task, name in TASK_FILES.items():
        if task == "rec":  # no expression can refer to a box the image does not have
            (root / "refcoco").mkdir()
            refs = [r for r in json.loads((world / name).read_text()) if r["image_id"] != no_objects]
            (root / name).write_text(json.dumps(refs))
        else:
            shutil.copytree(world / name, root / name)
    paths = {"images_dir": images, "captions": root / "captions.json", "instances": root / "instances.json",
             "split_file": world / "karpathy_split.json"}
    return paths, no_objects, other


def workflow_config(paths: dict[str, Path], root: Path, with_tasks: bool) -> Path:
    """A --configfile for the folder: the detector path, the tiny model, a few steps of each stage and task."""
    regions: dict = {}
    for item in DETECTOR:
        keys, value = item.removeprefix("regions.").split("=")
        *parents, leaf = keys.split(".")
        node = regions
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    coco_format = {k: str(v) for k, v in paths.items()}
    coco_format["task_files"] = {t: str(root / name) if with_tasks else None for t, name in TASK_FILES.items()}
    config = {"dataset": {"name": "coco_format", "coco_format": coco_format}, "regions": regions,
              "methods": ["mvptr"], "ablations": ["full"], "concepts": {"min_count": 2},
              "model": {"hidden_size": 32, "num_text_layers": 1, "num_visual_layers": 1, "num_cross_layers": 1,
                        "num_attention_heads": 2, "intermediate_size": 64},
              "pretrain": {"stage1": {"steps": 3, "batch_size": 8}, "stage2": {"steps": 3, "batch_size": 8}},
              "evaluate": {**{task: {"steps": 2, "batch_size": 8} for task in TASKS},
                           "retrieval": {"steps": 2, "batch_size": 8, "k_text": 5, "k_image": 3}}}
    path = root / ("with_tasks.yaml" if with_tasks else "without_tasks.yaml")
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def folder(artifacts, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("own_photos")
    paths, no_objects, other = photo_folder(artifacts["dataset"], root)
    return root, paths, no_objects, other


def test_a_photo_folder_with_every_task_file_runs_through_every_evaluation(folder, tmp_path: Path):
    root, paths, no_objects, other = folder
    proc = snakemake("--cores", "2", "--workflow-profile", str(ROOT / "workflow/profiles/default"),
                     "--configfile", str(workflow_config(paths, root, with_tasks=True)), workdir=tmp_path,
                     timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (dataset,) = (tmp_path / "resources/datasets").iterdir()
    results = tmp_path / "results" / dataset.name
    for task in TASKS:
        result = json.loads((results / f"mvptr/full/seed0/evaluate/{task}.json").read_text())
        assert result["train"]["steps"] == 2 and result["splits"], task
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["counts"]["images_without_objects"] == 1
    prepare_log = (tmp_path / f"results/logs/prepare_data/{dataset.name}.log").read_text()
    assert "1 image(s) have no annotated object: kept for captions and retrieval" in prepare_log
    with RegionStore(results / "regions/train.h5") as store:  # the detector found regions in it all the same
        assert no_objects in store and len(store.get(no_objects)) >= 5
    assert json.loads((results / "regions/skipped.json").read_text()) == []
    concepts = json.loads((results / "concepts/concepts.json").read_text())
    assert all(str(cid) in concepts for cid in other)  # parsed (to fewer concepts), not dropped


def test_without_task_files_only_retrieval_is_planned_and_each_other_task_says_why(folder, tmp_path: Path):
    root, paths, _, _ = folder
    proc = snakemake("-n", "--configfile", str(workflow_config(paths, root, with_tasks=False)), workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout)
    assert counts["evaluate_retrieval"] == counts["pretrain_stage2"] == 1
    assert not {f"evaluate_{t}" for t in TASKS[1:]} & set(counts), counts
    for task in TASKS[1:]:
        assert (f"mvptr: evaluate_{task} left out: the coco_format dataset has no {task} files (set "
                f"dataset.coco_format.task_files.{task})") in proc.stderr


def test_prepare_by_hand_writes_where_the_workflow_reads(folder, tmp_path: Path):
    """`mvptr data prepare` (no --out) in a project folder writes the folder the workflow's dry run then finds
    prepared: it plans no prepare_data job."""
    from mvptr.data.task_files import TRAIN_SPLIT, read_task

    root, paths, _, _ = folder
    overrides = ["dataset.name=coco_format", *(f"dataset.coco_format.{k}={v}" for k, v in paths.items()),
                 *(f"dataset.coco_format.task_files.{t}={root / name}" for t, name in TASK_FILES.items())]
    proc = run_mvptr("data", "prepare", "--root", str(ROOT), *overrides, cwd=tmp_path, check=True)
    assert "1 image(s) have no annotated object" in proc.stdout
    (prepared,) = (tmp_path / "resources/datasets").iterdir()
    assert f"prepared {prepared.relative_to(tmp_path)}" in proc.stdout
    for task in TASK_FILES:
        assert read_task(prepared, task, TRAIN_SPLIT[task]), task
    dry = snakemake("-n", "--configfile", str(workflow_config(paths, root, with_tasks=True)), workdir=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "prepare_data" not in job_counts(dry.stdout) and "extract_concepts" in job_counts(dry.stdout)
