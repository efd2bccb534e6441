"""COCO-format readers: a user's own dataset, and clear errors for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_mvptr
from PIL import Image

from mvptr.data.coco import CocoFormatDataset, open_prepared
from mvptr.errors import DataError


def write_dataset(root: Path, n_images: int = 3) -> dict[str, Path]:
    """A small COCO-format dataset written by hand: images, captions, instances and a Karpathy split."""
    images = root / "imgs"
    images.mkdir(parents=True)
    coco_images, captions, instances, split = [], [], [], []
    for i in range(1, n_images + 1):
        name = f"img{i}.jpg"
        Image.new("RGB", (32, 24), (10 * i, 0, 0)).save(images / name)
        coco_images.append({"id": i, "file_name": name, "width": 32, "height": 24})
        captions += [{"id": 10 * i + k, "image_id": i, "caption": f"picture {i} caption {k}"} for k in range(2)]
        instances.append({"id": 100 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100,
                          "iscrowd": 0})
        split.append({"cocoid": i, "split": "train" if i < n_images else "test"})
    paths = {"images_dir": images, "captions": root / "captions.json", "instances": root / "instances.json",
             "split_file": root / "split.json"}
    paths["captions"].write_text(json.dumps({"images": coco_images, "annotations": captions}))
    paths["instances"].write_text(json.dumps({"images": coco_images, "annotations": instances,
                                              "categories": [{"id": 1, "name": "thing"}]}))
    paths["split_file"].write_text(json.dumps({"images": split}))
    return paths


def test_reads_a_users_dataset(tmp_path: Path):
    paths = write_dataset(tmp_path)
    ds = CocoFormatDataset.open(**paths)
    assert ds.image_ids() == [1, 2, 3]
    assert ds.image_ids("train") == [1, 2] and ds.image_ids("test") == [3]
    assert ds.captions(2) == [(20, "picture 2 caption 0"), (21, "picture 2 caption 1")]
    assert ds.image_path(3) == paths["images_dir"] / "img3.jpg"
    assert len(ds.instances_coco.getAnnIds(imgIds=[1])) == 1


def test_without_split_file_everything_is_train(tmp_path: Path):
    paths = write_dataset(tmp_path)
    ds = CocoFormatDataset.open(paths["images_dir"], paths["captions"])
    assert ds.image_ids("train") == [1, 2, 3]


def test_missing_images_are_counted_and_the_first_named(tmp_path: Path):
    paths = write_dataset(tmp_path, n_images=4)
    for i in (2, 4):
        (paths["images_dir"] / f"img{i}.jpg").unlink()
    with pytest.raises(DataError) as err:
        CocoFormatDataset.open(**paths)
    message = str(err.value)
    assert "2 image file(s) missing" in message
    assert str(paths["images_dir"] / "img2.jpg") in message


def test_malformed_json_names_file_and_position(tmp_path: Path):
    paths = write_dataset(tmp_path)
    paths["captions"].write_text('{"images": [1, 2,\n  ]}')
    with pytest.raises(DataError) as err:
        CocoFormatDataset.open(**paths)
    assert str(paths["captions"]) in str(err.value)
    assert "line 2 column 3" in str(err.value)


def test_empty_caption_names_its_id(tmp_path: Path):
    paths = write_dataset(tmp_path)
    data = json.loads(paths["captions"].read_text())
    data["annotations"][3]["caption"] = "   "
    paths["captions"].write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotation ids: 21\b"):
        CocoFormatDataset.open(**paths)


def test_caption_that_is_not_utf8_names_its_id(tmp_path: Path):
    paths = write_dataset(tmp_path)
    raw = paths["captions"].read_bytes().replace(b"picture 3 caption 1", b"picture \xff\xfe caption")
    paths["captions"].write_bytes(raw)
    with pytest.raises(DataError, match=r"not valid UTF-8; annotation ids: 31\b"):
        CocoFormatDataset.open(**paths)


def test_prepare_and_check_a_coco_format_dataset_through_the_cli(tmp_path: Path):
    paths = write_dataset(tmp_path / "user")
    out = tmp_path / "prepared"
    overrides = ["dataset.name=coco_format"] + [f"dataset.coco_format.{k}={v}" for k, v in paths.items()]
    run_mvptr("data", "prepare", "--out", str(out), *overrides, check=True)
    ds = open_prepared(out)
    assert ds.image_ids("test") == [3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"images": 3, "captions": 6, "objects": 3, "images_train": 2, "images_test": 1,
                                  "images_without_objects": 0}
    check = run_mvptr("data", "check", str(out), check=True)
    assert json.loads(check.stdout) == {"captions": 6, "test": 1, "train": 2}


def test_prepare_of_a_bad_dataset_exits_with_the_message_and_writes_nothing(tmp_path: Path):
    paths = write_dataset(tmp_path / "user")
    (paths["images_dir"] / "img1.jpg").unlink()
    out = tmp_path / "prepared"
    overrides = ["dataset.name=coco_format"] + [f"dataset.coco_format.{k}={v}" for k, v in paths.items()]
    proc = run_mvptr("data", "prepare", "--out", str(out), *overrides)
    assert proc.returncode == 2
    assert "img1.jpg" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


WORLD_TASK_FILES = {"vqa": "vqa", "ve": "snli_ve", "rec": "refcoco/refs.json", "nlvr2": "nlvr2"}


def world_as_coco_format(world: Path, tasks: tuple[str, ...]) -> list[str]:
    """The overrides that read the synthetic world as a user's own coco_format dataset with `tasks`' files."""
    paths = {"images_dir": world / "images", "captions": world / "annotations/captions.json",
             "instances": world / "annotations/instances.json", "split_file": world / "karpathy_split.json"}
    return (["dataset.name=coco_format"] + [f"dataset.coco_format.{k}={v}" for k, v in paths.items()]
            + [f"dataset.coco_format.task_files.{t}={world / WORLD_TASK_FILES[t]}" for t in tasks])


def test_coco_format_task_files_are_copied_where_the_evaluation_reads_them(artifacts, tmp_path: Path):
    from mvptr.data.task_files import EVAL_SPLITS, TRAIN_SPLIT, read_task

    world, out = artifacts["dataset"], tmp_path / "prepared"
    run_mvptr("data", "prepare", "--out", str(out), *world_as_coco_format(world, tuple(WORLD_TASK_FILES)), check=True)
    for task in WORLD_TASK_FILES:
        for split in (TRAIN_SPLIT[task], *EVAL_SPLITS[task]):
            assert read_task(out, task, split) == read_task(world, task, split), (task, split)
    assert sorted(json.loads((out / "manifest.json").read_text())["task_files"]) == sorted(WORLD_TASK_FILES)


def test_a_missing_task_file_names_its_config_key_and_writes_nothing(artifacts, tmp_path: Path):
    overrides = world_as_coco_format(artifacts["dataset"], ("ve",))
    overrides[-1] = f"dataset.coco_format.task_files.ve={tmp_path}"
    proc = run_mvptr("data", "prepare", "--out", str(tmp_path / "prepared"), *overrides)
    assert proc.returncode == 2
    assert f"config key 'dataset.coco_format.task_files.ve': {tmp_path}/snli_ve_train.jsonl not found" in proc.stderr
    assert not (tmp_path / "prepared").exists()


def test_a_coco_format_dry_run_plans_only_the_tasks_it_has_files_for(artifacts, tmp_path: Path):
    from test_workflow import job_counts, snakemake

    world = artifacts["dataset"]
    coco_format = {"images_dir": world / "images", "captions": world / "annotations/captions.json",
                   "task_files": {"vqa": world / "vqa"}}
    text = "{" + ", ".join(f"{k}: {v}" for k, v in coco_format.items() if k != "task_files") \
        + f", task_files: {{vqa: {world / 'vqa'}}}}}"
    proc = snakemake("-n", "--config", f"dataset={{name: coco_format, coco_format: {text}}}", workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout)
    assert counts["evaluate_retrieval"] == counts["evaluate_vqa"] == counts["pretrain_stage2"]
    assert not {"evaluate_ve", "evaluate_rec", "evaluate_nlvr2"} & set(counts), counts
    assert ("mvptr: evaluate_rec left out: the coco_format dataset has no rec files (set "
            "dataset.coco_format.task_files.rec)") in proc.stderr


CAPTIONS_IN_ANY_SCRIPT = ["一只红色的猫坐在桌子上", "قطة حمراء على الطاولة", "Красная кошка на столе",
                          "a red cat 🐈 on a table", "ein roter Kater", "赤い猫がテーブルの上にいる",
                          "a large red cat on the table", "🙂🙂"]


def test_captions_in_any_language_and_script_survive_tokenisation_and_concept_parsing(tmp_path: Path):
    from mvptr.text import load_tokenizer

    paths = write_dataset(tmp_path / "user", n_images=4)
    captions = json.loads(paths["captions"].read_text())
    for ann, text in zip(captions["annotations"], CAPTIONS_IN_ANY_SCRIPT, strict=True):
        ann["caption"] = text
    paths["captions"].write_text(json.dumps(captions, ensure_ascii=False), encoding="utf-8")
    overrides = ["dataset.name=coco_format"] + [f"dataset.coco_format.{k}={v}" for k, v in paths.items()]
    run_mvptr("data", "prepare", "--out", str(tmp_path / "prepared"), *overrides, check=True)
    assert [text for _, text in open_prepared(tmp_path / "prepared").captions(1)] == CAPTIONS_IN_ANY_SCRIPT[:2]
    run_mvptr("concepts", "extract", "--dataset", str(tmp_path / "prepared"), "--out", str(tmp_path / "c.json"),
              "--n-process", "1", check=True)
    concepts = json.loads((tmp_path / "c.json").read_text())
    assert len(concepts) == len(CAPTIONS_IN_ANY_SCRIPT)  # every caption parsed, English ones with concepts
    # Every caption gives word pieces; scripts the English vocabulary lacks become [UNK] (a vocabulary that has
    # them is `model.tokenizer: <folder with vocab.txt>`), Latin-script ones do not.
    tokenizer = load_tokenizer("minilm")
    for text in CAPTIONS_IN_ANY_SCRIPT:
        assert tokenizer.tokenize(text), text
    assert tokenizer.unk_token not in tokenizer.tokenize("ein roter Kater auf dem Tisch")
