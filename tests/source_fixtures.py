"""Tiny releases of every download source, in each one's public format, built from the synthetic world.

The world (mvptr.data.synthetic, 40 images) already writes COCO-format captions and instances, a Karpathy split
and the task files in their public formats; this module re-packs it the way each source publishes it: COCO's
train2014/val2014 zips and annotation zip, Karpathy's caption_datasets.zip, VQA's four zips, Visual Genome's
JSON zips, SBU's tar.gz of line-aligned URLs and captions, CC3M's TSV, SNLI-VE's jsonl.gz, RefCOCO+'s zip with a
protocol-2 pickle, NLVR2's JSON lines. Web images are served by the same loopback server (some URLs dead), and
the photos a licence keeps local (Flickr30k, NLVR2) are written to local folders.

`build_release(world, served, local, base_url)` writes the files under `served`; `write_catalog(...)` writes a catalog folder (`download.catalog`) whose entries are the real
configs/datasets entries with each file's URL, size and sha256 replaced by the fixture's.

Planted for the tests: a Visual Genome image that is a COCO Karpathy test image (coco_id), and an SBU photo that
is a Flickr30k test image (its Flickr id in the URL): both must be removed from pre-training.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from mvptr.data.coco import read_json

SBU_PLANTED_FLICKR_ID = "4385058960"


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _jpeg(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _flickr_id(world_id: int) -> str:
    """The Flickr photo id the fixtures give a world image (world image 1 is the planted SBU photo)."""
    return str(int(SBU_PLANTED_FLICKR_ID) + world_id - 1)


def _coco(world: Path, served: Path, split_of: dict[int, str]) -> dict[str, Any]:
    """COCO 2014: train-split world images in train2014, the rest in val2014 (as Karpathy's val/test are)."""
    captions, instances = read_json(world / "annotations/captions.json"), read_json(world / "annotations/instances.json")
    karpathy, by_subset = [], {"train2014": {}, "val2014": {}}
    for number, image in enumerate(captions["images"]):
        subset = "train2014" if split_of[image["id"]] == "train" else "val2014"
        name = f"COCO_{subset}_{image['id']:012d}.jpg"
        by_subset[subset][f"{subset}/{name}"] = _jpeg(world / "images" / image["file_name"])
        split = split_of[image["id"]] if subset == "val2014" else ("restval" if number % 4 == 0 else "train")
        sentences = [{"raw": a["caption"], "sentid": a["id"]} for a in captions["annotations"]
                     if a["image_id"] == image["id"]]
        karpathy.append({"filepath": subset, "filename": name, "cocoid": image["id"], "imgid": number,
                         "split": split, "sentences": sentences})
    members = {}
    for subset in by_subset:
        ids = {int(n.split("_")[-1].split(".")[0]) for n in by_subset[subset]}
        images = [dict(i, file_name=f"COCO_{subset}_{i['id']:012d}.jpg") for i in captions["images"] if i["id"] in ids]
        members[f"annotations/captions_{subset}.json"] = _json(
            {"images": images, "annotations": [a for a in captions["annotations"] if a["image_id"] in ids]})
        members[f"annotations/instances_{subset}.json"] = _json(
            {"images": images, "annotations": [a for a in instances["annotations"] if a["image_id"] in ids],
             "categories": instances["categories"]})
        _zip(served / f"{subset}.zip", by_subset[subset])
    _zip(served / "annotations_trainval2014.zip", members)
    return {"karpathy": karpathy, "instances": instances}


def _flickr(world: Path, local: Path, split_of: dict[int, str]) -> list[dict[str, Any]]:
    """Flickr30k: the world's images under Flickr-style names (`_flickr_id`)."""
    folder = local / "flickr30k-images"
    folder.mkdir(parents=True)
    captions = read_json(world / "annotations/captions.json")
    records = []
    for number, image in enumerate(captions["images"]):
        flickr_id = _flickr_id(image["id"])
        (folder / f"{flickr_id}.jpg").write_bytes(_jpeg(world / "images" / image["file_name"]))
        records.append({"filename": f"{flickr_id}.jpg", "imgid": number, "split": split_of[image["id"]],
                        "sentences": [{"raw": a["caption"]} for a in captions["annotations"]
                                      if a["image_id"] == image["id"]]})
    return records


def build_release(world: Path, served: Path, local: Path, base_url: str) -> None:
    """Write every source's files under `served` and the local folders under `local`."""
    served.mkdir(parents=True, exist_ok=True)
    split_of = {int(i["cocoid"]): i["split"] for i in read_json(world / "karpathy_split.json")["images"]}
    coco = _coco(world, served, split_of)
    flickr = _flickr(world, local, split_of)
    _zip(served / "caption_datasets.zip", {"dataset_coco.json": _json({"images": coco["karpathy"]}),
                                           "dataset_flickr30k.json": _json({"images": flickr})})
    # VQA v2: the world's train questions are train2014's, its val and test questions val2014's.
    vqa = {}
    for subset, splits in (("train2014", ("train",)), ("val2014", ("val", "test"))):
        qs = [q for s in splits for q in read_json(world / f"vqa/v2_OpenEnded_mscoco_{s}_questions.json")["questions"]]
        anns = [a for s in splits for a in read_json(world / f"vqa/v2_mscoco_{s}_annotations.json")["annotations"]]
        vqa[subset] = (qs, anns)
    for subset, zip_part in (("train2014", "Train"), ("val2014", "Val")):
        _zip(served / f"v2_Questions_{zip_part}_mscoco.zip",
             {f"v2_OpenEnded_mscoco_{subset}_questions.json": _json({"questions": vqa[subset][0]})})
        _zip(served / f"v2_Annotations_{zip_part}_mscoco.zip",
             {f"v2_mscoco_{subset}_annotations.json": _json({"annotations": vqa[subset][1]})})
    # Visual Genome: four train images with region descriptions and objects, and one that is a COCO test image.
    test_id = next(i for i, s in sorted(split_of.items()) if s == "test")
    vg_from = [i for i, s in sorted(split_of.items()) if s == "train"][:4] + [test_id]
    instances = coco["instances"]
    image_data, regions, objects, folders = [], [], [], {"VG_100K": {}, "VG_100K_2": {}}
    captions = read_json(world / "annotations/captions.json")
    for number, world_id in enumerate(vg_from, start=1):
        folder = "VG_100K" if number % 2 else "VG_100K_2"
        image = next(i for i in captions["images"] if i["id"] == world_id)
        folders[folder][f"{folder}/{number}.jpg"] = _jpeg(world / "images" / image["file_name"])
        image_data.append({"image_id": number, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{number}.jpg",
                           "width": image["width"], "height": image["height"],
                           "coco_id": world_id if world_id == test_id or number == 1 else None, "flickr_id": None})
        regions.append({"id": number, "regions": [
            {"region_id": 100 * number + k, "image_id": number, "phrase": a["caption"], "x": 0, "y": 0, "width": 10,
             "height": 10} for k, a in enumerate(a for a in captions["annotations"] if a["image_id"] == world_id)]})
        names = {c["id"]: c["name"] for c in instances["categories"]}
        objects.append({"image_id": number, "objects": [
            {"object_id": a["id"], "x": a["bbox"][0], "y": a["bbox"][1], "w": a["bbox"][2], "h": a["bbox"][3],
             "names": [names[a["category_id"]]], "synsets": []}
            for a in instances["annotations"] if a["image_id"] == world_id]})
    _zip(served / "images.zip", folders["VG_100K"])
    _zip(served / "images2.zip", folders["VG_100K_2"])
    for name, data in (("image_data", image_data), ("region_descriptions", regions), ("objects", objects),
                       ("attributes", [{"image_id": o["image_id"], "attributes": []} for o in objects]),
                       ("relationships", [{"image_id": o["image_id"], "relationships": []} for o in objects])):
        _zip(served / f"{name}.json.zip", {f"{name}.json": _json(data)})
    # Web image lists: the world's first six train images at Flickr-style URLs (SBU) and plain URLs (CC3M), plus
    # a dead URL and a file that is no image; one SBU photo is the Flickr30k test image planted above.
    web = served / "web"
    web.mkdir()
    urls, texts = [], []
    for world_id in [i for i, s in sorted(split_of.items()) if s == "train"][:6] + [test_id]:
        image = next(i for i in captions["images"] if i["id"] == world_id)
        name = f"{_flickr_id(world_id)}_0a1b2c3d.jpg"
        (web / name).write_bytes(_jpeg(world / "images" / image["file_name"]))
        urls.append(f"{base_url}/web/{name}")
        texts.append(next(a["caption"] for a in captions["annotations"] if a["image_id"] == world_id))
    (web / "broken_00000000.jpg").write_bytes(b"not an image")
    urls += [f"{base_url}/web/gone_12345678.jpg", f"{base_url}/web/broken_00000000.jpg"]
    texts += ["a dead link.", "not an image."]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member, lines in (("dataset/SBU_captioned_photo_dataset_urls.txt", urls),
                              ("dataset/SBU_captioned_photo_dataset_captions.txt", texts)):
            data = "".join(f"{x}\n" for x in lines).encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (served / "SBUCaptionedPhotoDataset.tar.gz").write_bytes(buffer.getvalue())
    (served / "Train_GCC-training.tsv").write_text("".join(f"{t}\t{u}\n" for t, u in zip(texts, urls)))
    # SNLI-VE about the Flickr30k images (public field Flikr30kID "<id>.jpg", no image_id).
    for split in ("train", "dev", "test"):
        lines = []
        for line in (world / f"snli_ve/snli_ve_{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            record["Flikr30kID"] = f"{_flickr_id(record.pop('image_id'))}.jpg"
            lines.append(json.dumps(record))
        (served / f"snli_ve_{split}.jsonl.gz").write_bytes(gzip.compress("".join(f"{x}\n" for x in lines).encode()))
    # RefCOCO+: the world's refs as a protocol-2 pickle (as Python 2 wrote them) with COCO-style instances.
    refs = read_json(world / "refcoco/refs.json")
    _zip(served / "refcoco+.zip", {"refcoco+/refs(unc).p": pickle.dumps(refs, protocol=2),
                                   "refcoco+/instances.json": _json(instances)})
    # NLVR2: public records (no image ids or files) and images named after the identifiers, in sub-folders.
    nlvr2_images = local / "nlvr2-images"
    for split in ("train", "dev", "test1"):
        lines, pairs = [], {}
        for line in (world / f"nlvr2/{split}.json").read_text().splitlines():
            record = json.loads(line)
            stem = "-".join(record["identifier"].split("-")[:3])
            pair = (record.pop("left_file"), record.pop("right_file"))
            record.pop("left_image_id"), record.pop("right_image_id")
            if pairs.setdefault(stem, pair) != pair:
                continue
            lines.append(json.dumps(record))
        for number, (stem, files) in enumerate(sorted(pairs.items())):
            folder = nlvr2_images / split / str(number % 3)
            folder.mkdir(parents=True, exist_ok=True)
            for side, file in enumerate(files):
                Image.open(world / "images" / file).save(folder / f"{stem}-img{side}.png")
        (served / f"{split}.json").write_text("".join(f"{x}\n" for x in lines))


def _real_entries() -> dict[str, dict[str, Any]]:
    from conftest import ROOT

    out = {}
    for path in sorted((ROOT / "configs" / "datasets").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "source" in data:
            out[path.stem] = data
    return out


def write_catalog(folder: Path, served: Path, base_url: str, local: Path) -> Path:
    """The real catalog entries with each file's URL, size and sha256 the fixture's; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _real_entries().items():
        for file in data["source"]["files"]:
            payload = (served / file["name"]).read_bytes()
            file.update(url=f"{base_url}/{file['name']}", size=len(payload), md5=None,
                        sha256=hashlib.sha256(payload).hexdigest())
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


LOCAL_FOLDERS = {"flickr30k": "flickr30k-images", "nlvr2": "nlvr2-images"}
