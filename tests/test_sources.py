"""Every download source end to end against a real HTTP server on 127.0.0.1: download, web images, prepare.

The fixture releases (tests/source_fixtures.py) are the tiny synthetic world re-packed in each source's public
format, served by tests/loopback_http.py; the catalog is the real configs/datasets entries with the fixture's
URLs, sizes and checksums (`download.catalog`). The CLI runs each step as the Snakemake rules do. Web images go
through img2dataset from its own environment (`make img2dataset`, found at MVPTR_IMG2DATASET or
.venv-img2dataset/bin/img2dataset). No test touches the internet.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from conftest import ROOT, run_mvptr
from loopback_http import LoopbackServer
from source_fixtures import LOCAL_FOLDERS, SBU_PLANTED_FLICKR_ID, build_release, write_catalog
from test_workflow import FAST, job_counts, snakemake

from mvptr.config import load_config
from mvptr.data.catalog import needed_sources
from mvptr.data.coco import open_prepared
from mvptr.data.task_files import EVAL_SPLITS, TRAIN_SPLIT, read_task

# The tiny model, the no-pretraining baseline of MVPTR (its stages run zero steps) and VQA only.
FAST_ONE_TASK = [*(item for item in FAST if not item.startswith(("ablations=", "methods="))), "ablations=[no_pretraining]",
                 "methods=[mvptr]", "evaluate={tasks: [vqa], vqa: {steps: 2, batch_size: 8}}"]
IMG2DATASET = Path(os.environ.get("MVPTR_IMG2DATASET", ROOT / ".venv-img2dataset" / "bin" / "img2dataset"))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory):
    """The served fixture releases, the server, the catalog and the local folders."""
    root = tmp_path_factory.mktemp("release")
    run_mvptr("data", "synth", "--size", "tiny", "--seed", "0", "--out", str(root / "world"), check=True)
    with LoopbackServer(root / "served") as server:
        base = server.url("").rstrip("/")
        (root / "served").mkdir()
        build_release(root / "world", root / "served", root / "local", base)
        catalog = write_catalog(root / "catalog", root / "served", base, root / "local")
        overrides = [f"download.catalog={catalog}", "download.retries=1", "download.backoff_s=0.01",
                     f"download.img2dataset={IMG2DATASET}", "download.web_processes=1", "download.web_threads=2",
                     "download.timeout_s=5",
                     *(f"dataset.local.{name}={root / 'local' / folder}" for name, folder in LOCAL_FOLDERS.items())]
        yield {"root": root, "server": server, "overrides": overrides}


def _download_all(release, downloads: Path, dataset: list[str]) -> list[str]:
    cfg = load_config([*dataset, *release["overrides"]])
    names = needed_sources(cfg)
    for name in names:
        run_mvptr("data", "download", "--source", name, "--out", str(downloads / name), *dataset, *release["overrides"],
                  check=True)
    return names


def test_the_4m_corpus_downloads_and_prepares_from_every_source(release, tmp_path: Path):
    if not IMG2DATASET.is_file():
        pytest.fail(f"img2dataset is not installed at {IMG2DATASET}: run `make img2dataset` (CI does)")
    downloads = tmp_path / "downloads"
    names = _download_all(release, downloads, ["dataset.name=4m"])
    assert names == ["coco2014", "vg", "cc3m", "sbu", "flickr30k", "vqa_v2", "snli_ve", "refcocoplus", "nlvr2"]
    for name in ("cc3m", "sbu"):
        run_mvptr("data", "web-images", "--source", name, "--dir", str(downloads / name), "dataset.name=4m",
                  *release["overrides"], check=True)
        summary = json.loads((downloads / name / "images.json").read_text())
        # 7 images, a 404 and a file that is no image
        assert (summary["urls"], summary["landed"], summary["dead"]) == (9, 7, 2), summary
        assert any("404" in reason for reason in summary["dead_by_reason"]), summary
    # A rerun resumes: img2dataset skips the finished shards, so no image URL is requested again.
    server = release["server"]
    before = sum(n for path, n in server.requests.items() if path.startswith("/web/"))
    run_mvptr("data", "web-images", "--source", "sbu", "--dir", str(downloads / "sbu"), "dataset.name=4m",
              *release["overrides"], check=True)
    assert sum(n for path, n in server.requests.items() if path.startswith("/web/")) == before
    assert json.loads((downloads / "sbu" / "images.json").read_text())["landed"] == 7
    out = tmp_path / "prepared"
    proc = run_mvptr("data", "prepare", "--out", str(out), "--downloads", str(downloads), "dataset.name=4m",
                     *release["overrides"], check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    # The VG image whose coco_id is a Karpathy test image and the SBU photo that is a Flickr30k test image.
    assert manifest["removed_test_images"] == {"vg": 1, "sbu": 1}, proc.stdout
    assert manifest["sources"] == {"coco2014": 40, "vg": 4, "cc3m": 7, "sbu": 6}
    assert manifest["web_images"]["sbu"]["dead"] == 2
    ds = open_prepared(out)
    assert len(ds.image_ids("test")) == 4 and len(ds.image_ids("val")) == 4
    assert all(ds.image_path(i).is_file() for i in ds.image_ids())
    assert not any(ds.image_path(i).name.startswith(SBU_PLANTED_FLICKR_ID) for i in ds.image_ids("train")
                   if "sbu" in str(ds.image_path(i)))
    world = release["root"] / "world"
    for task, world_files in (("vqa", None), ("ve", None), ("rec", None), ("nlvr2", None)):
        for split in (TRAIN_SPLIT[task], *EVAL_SPLITS[task]):
            examples = read_task(out, task, split)
            assert examples or split == "testB", (task, split)
            images = {getattr(e, "image_id", None) or e.left_image_id for e in examples}
            assert images <= set(ds.image_ids()), (task, split)
    # Every task example of the world is there (the world's own task files have the same counts).
    assert len(read_task(out, "vqa", "test")) == len(read_task(world, "vqa", "test"))
    assert len(read_task(out, "ve", "dev")) == len(read_task(world, "ve", "dev"))
    assert manifest["tasks"]["nlvr2"]["skipped"] == 0 and manifest["tasks"]["rec"]["skipped_refs"] == 0
    # concepts and regions read it (spaCy over every caption; the region backbone on the gold crops)
    run_mvptr("concepts", "extract", "--dataset", str(out), "--out", str(tmp_path / "concepts.json"),
              "--n-process", "1", check=True)
    assert json.loads((tmp_path / "concepts.json").read_text())
    run_mvptr("regions", "extract", "--dataset", str(out), "--out", str(tmp_path / "regions"),
              "regions.backbone.epochs=1", check=True)
    assert sorted(p.name for p in (tmp_path / "regions").glob("*.h5")) == ["task.h5", "test.h5", "train.h5", "val.h5"]


def test_a_rerun_of_the_download_step_fetches_nothing(release, tmp_path: Path):
    downloads = tmp_path / "downloads"
    run_mvptr("data", "download", "--source", "vqa_v2", "--out", str(downloads / "vqa_v2"), *release["overrides"], check=True)
    server = release["server"]
    before = sum(server.requests.values())
    first = json.loads((downloads / "vqa_v2" / "manifest.json").read_text())
    run_mvptr("data", "download", "--source", "vqa_v2", "--out", str(downloads / "vqa_v2"), *release["overrides"], check=True)
    assert sum(server.requests.values()) == before
    assert json.loads((downloads / "vqa_v2" / "manifest.json").read_text()) == first
    assert sorted(first["extracted"]) == sorted(f for f in first["files"])


def test_a_source_whose_file_fails_its_checksum_exits_2_naming_the_url(release, tmp_path: Path):
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    text = (Path(release["overrides"][0].split("=", 1)[1]) / "nlvr2.yaml").read_text()
    entry = __import__("yaml").safe_load(text)
    entry["source"]["files"][1]["sha256"] = "0" * 64
    (catalog / "nlvr2.yaml").write_text(__import__("yaml").safe_dump(entry))
    proc = run_mvptr("data", "download", "--source", "nlvr2", "--out", str(tmp_path / "nlvr2"), *release["overrides"],
                     f"download.catalog={catalog}")
    assert proc.returncode == 2
    assert "dev.json: downloaded file has sha256" in proc.stderr and "kept aside" in proc.stderr
    assert not (tmp_path / "nlvr2" / "dev.json").exists() and (tmp_path / "nlvr2" / "dev.json.rejected").is_file()
    assert not (tmp_path / "nlvr2" / "manifest.json").exists()


def test_a_malicious_refcoco_pickle_is_refused_at_prepare(release, tmp_path: Path):
    downloads = tmp_path / "downloads"
    dataset = ["dataset.name=coco2014", "dataset.corpus.tasks={rec: refcocoplus}"]
    _download_all(release, downloads, dataset)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (downloads / "refcocoplus" / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([Evil()], protocol=2))
    proc = run_mvptr("data", "prepare", "--out", str(tmp_path / "out"), "--downloads", str(downloads), *dataset,
                     *release["overrides"])
    assert proc.returncode == 2 and "the pickle asks for posix.system" in proc.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_prepare_before_the_download_names_the_source_and_the_command(release, tmp_path: Path):
    proc = run_mvptr("data", "prepare", "--out", str(tmp_path / "out"), "--downloads", str(tmp_path / "none"),
                     "dataset.name=coco2014", *release["overrides"])
    assert proc.returncode == 2
    assert "source 'coco2014' is not downloaded" in proc.stderr and "mvptr data download --source coco2014" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_local_folder_says_what_to_do_by_hand(release, tmp_path: Path):
    downloads = tmp_path / "downloads"
    dataset = ["dataset.name=coco2014", "dataset.corpus.tasks={ve: snli_ve}"]
    _download_all(release, downloads, dataset)
    overrides = [o for o in release["overrides"] if not o.startswith("dataset.local.flickr30k")]
    proc = run_mvptr("data", "prepare", "--out", str(tmp_path / "out"), "--downloads", str(downloads), *dataset,
                     *overrides)
    assert proc.returncode == 2
    assert "dataset.local.flickr30k' is not set: fill in the form at https://forms.illinois.edu" in proc.stderr


def test_a_dry_run_of_the_4m_corpus_plans_every_step_from_download_to_evaluation(tmp_path: Path):
    proc = snakemake("-n", "--config", "dataset={name: 4m}", workdir=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout)
    assert counts["download_source"] == 9 and counts["fetch_web_images"] == 2 and counts["prepare_data"] == 1
    assert all(counts[f"evaluate_{task}"] == counts["pretrain_stage2"] for task in ("retrieval", "vqa", "ve", "rec",
                                                                                     "nlvr2"))


def test_a_task_the_corpus_has_no_files_for_is_left_out_saying_why(tmp_path: Path):
    proc = snakemake("-n", "--config", "dataset={name: coco2014, corpus: {tasks: {vqa: vqa_v2}}}", workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout)
    assert counts["evaluate_retrieval"] == counts["evaluate_vqa"] == counts["pretrain_stage2"]
    assert not {"evaluate_ve", "evaluate_rec", "evaluate_nlvr2"} & set(counts), counts
    for task in ("ve", "rec", "nlvr2"):
        assert (f"mvptr: evaluate_{task} left out: dataset 'coco2014' has no {task} files (name a source in "
                f"dataset.corpus.tasks.{task})") in proc.stderr


def test_the_workflow_runs_coco2014_and_vqa_v2_from_download_to_evaluate_vqa(release, tmp_path: Path):
    """The acceptance run: the fixture releases through download_source -> prepare_data -> ... -> evaluate_vqa."""
    download = "{" + ", ".join(o.removeprefix("download.").replace("=", ": ", 1) for o in release["overrides"]
                               if o.startswith("download.")) + "}"
    config = [*FAST_ONE_TASK, "dataset={name: coco2014, corpus: {tasks: {vqa: vqa_v2}}}", f"download={download}"]
    proc = snakemake("--cores", "2", "--workflow-profile", str(ROOT / "workflow/profiles/default"), "--config",
                     *config, workdir=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "resources/downloads").iterdir()) == ["coco2014", "vqa_v2"]
    result = json.loads(next(tmp_path.glob("results/coco2014-*/mvptr/no_pretraining/seed0/evaluate/vqa.json")).read_text())
    world = release["root"] / "world"
    assert result["splits"]["test"]["examples"] == len(read_task(world, "vqa", "test"))
    assert result["splits"]["val"]["examples"] == len(read_task(world, "vqa", "val"))
    log = next(tmp_path.glob("results/logs/download_source/coco2014.log")).read_text()
    assert "download train2014.zip:" in log  # the progress line in the rule's log
