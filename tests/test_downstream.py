"""Tests of downstream fine-tuning (mvptr.data.task_files, heads, finetune, commands) on the tiny world.

The artifacts (tiny synthetic world, concepts, vocabulary, region stores) are built once per session through
the `mvptr` CLI by conftest's fixture, and a never-trained model (stage 0) is saved; the model is
shrunk to 1+1+1 layers at width 32 and each task runs a few steps, so every task runs end to end in seconds.
Run: `.venv/bin/python -m pytest -q tests/test_downstream.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import quiet, run_mvptr
from safetensors.torch import load_file, load_model, save_model

# The tiny world, concepts, vocabulary and region stores, built through the CLI as the workflow builds them.
from mvptr.config import load_config
from mvptr.data import task_files
from mvptr.data.coco import read_json
from mvptr.data.vqa_answers import answer_vocabulary
from mvptr.errors import DataError
from mvptr.evaluate.finetune import TaskPaths, finetune, flat_metrics, iou_targets, with_head
from mvptr.models import build_model
from mvptr.regions.store import RegionStore

torch.set_num_threads(1)

FEW_STEPS = [f"evaluate.{task}.{key}={value}" for task in ("retrieval", "vqa", "ve", "rec", "nlvr2")
             for key, value in (("steps", 3), ("batch_size", 8))]
SMALL = ["model.hidden_size=32", "model.num_text_layers=1", "model.num_visual_layers=1", "model.num_cross_layers=1",
         "model.num_attention_heads=2", "model.intermediate_size=64", *FEW_STEPS,
         # The tiny world's test split has 4 images and 20 captions.
         "evaluate.retrieval.k_text=5", "evaluate.retrieval.k_image=3"]


@pytest.fixture(scope="module")
def stage0(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The artifacts and a model that was never trained (the "no pre-training" baseline's weights)."""
    weights = tmp_path_factory.mktemp("stage0") / "model.safetensors"
    feature_dim = RegionStore(artifacts["regions"] / "train.h5").feature_dim
    save_model(build_model(load_config(SMALL), read_json(artifacts["vocab"])["embedding_rows"], feature_dim),
               str(weights))
    return {**artifacts, "weights": weights}


def paths(stage0: dict[str, Path], save_to: Path | None = None) -> TaskPaths:
    return TaskPaths(stage0["dataset"], stage0["concepts"], stage0["vocab"], stage0["regions"], stage0["weights"],
                     save_to)


# --- Readers ------------------------------------------------------------------------------------------------

# Each (task, split) and the manifest count of its file (refcoco: of refs; every ref has two sentences).
FILES = {("vqa", "train"): "vqa/v2_mscoco_train_annotations.json",
         ("vqa", "val"): "vqa/v2_mscoco_val_annotations.json",
         ("vqa", "test"): "vqa/v2_mscoco_test_annotations.json",
         ("ve", "train"): "snli_ve/snli_ve_train.jsonl", ("ve", "dev"): "snli_ve/snli_ve_dev.jsonl",
         ("ve", "test"): "snli_ve/snli_ve_test.jsonl",
         ("nlvr2", "train"): "nlvr2/train.json", ("nlvr2", "dev"): "nlvr2/dev.json",
         ("nlvr2", "test1"): "nlvr2/test1.json"}


def test_readers_give_one_example_per_record_of_each_file(artifacts):
    world = artifacts["dataset"]
    counts = read_json(world / "manifest.json")["counts"]
    image_ids = {image["id"] for image in read_json(world / "annotations/captions.json")["images"]}
    for (task, split), name in FILES.items():
        examples = task_files.read_task(world, task, split)
        assert len(examples) == counts[name] > 0, (task, split)
        ids = {i for ex in examples for i in ((ex.left_image_id, ex.right_image_id) if task == "nlvr2"
                                              else (ex.image_id,))}
        assert ids <= image_ids
    vqa = task_files.read_task(world, "vqa", "train")
    assert all(len(ex.answers) == 10 for ex in vqa) and all(ex.question.endswith("?") for ex in vqa)
    raw = read_json(world / "vqa/v2_mscoco_train_annotations.json")["annotations"][0]
    assert vqa[0].answers == tuple(a["answer"] for a in raw["answers"])
    assert Counter(ex.label for ex in task_files.read_task(world, "ve", "train")).keys() == {0, 1, 2}
    assert Counter(ex.label for ex in task_files.read_task(world, "nlvr2", "train")).keys() == {0, 1}


def test_refcoco_reader_gives_every_sentence_with_the_gold_box_of_instances(artifacts):
    world = artifacts["dataset"]
    refs = read_json(world / "refcoco/refs.json")
    instances = read_json(world / "annotations/instances.json")
    boxes = {a["id"]: a["bbox"] for a in instances["annotations"]}
    sizes = {i["id"]: (i["width"], i["height"]) for i in instances["images"]}
    total = 0
    for split in ("train", "val", "testA", "testB"):
        examples = task_files.read_task(world, "rec", split)
        split_refs = {r["ref_id"]: r for r in refs if r["split"] == split}
        assert len(examples) == sum(len(r["sentences"]) for r in split_refs.values())
        for ex in examples:
            ref = split_refs[ex.ref_id]
            x, y, w, h = boxes[ref["ann_id"]]
            width, height = sizes[ref["image_id"]]
            assert ex.gold_box == pytest.approx((x / width, y / height, (x + w) / width, (y + h) / height))
            assert ex.expression in {s["sent"] for s in ref["sentences"]}
        total += len(examples)
    assert total == 2 * len(refs) > 0


def test_a_malformed_json_lines_file_is_named_with_its_line(tmp_path):
    (tmp_path / "nlvr2").mkdir()
    (tmp_path / "nlvr2" / "dev.json").write_text('{"identifier": "dev-0-0-0"}\n{not json\n')
    with pytest.raises(DataError, match="dev.json line 2"):
        task_files.read_task(tmp_path, "nlvr2", "dev")


def test_public_records_without_image_ids_and_non_square_images(tmp_path):
    """Public NLVR2 and SNLI-VE name image files, not ids; a RefCOCO box is normalised by width AND height."""
    (tmp_path / "nlvr2").mkdir()
    (tmp_path / "nlvr2" / "dev.json").write_text(json.dumps(
        {"identifier": "dev-850-0-0", "sentence": "there are two dogs.", "label": "True"}) + "\n")
    (tmp_path / "snli_ve").mkdir()
    (tmp_path / "snli_ve" / "snli_ve_dev.jsonl").write_text(json.dumps(
        {"Flikr30kID": "7.jpg", "pairID": "p0", "sentence2": "a dog runs.", "gold_label": "neutral"}) + "\n")
    by_file = {"dev-850-0-img0.png": 11, "dev-850-0-img1.png": 12, "7.jpg": 7}
    assert task_files.read_task(tmp_path, "nlvr2", "dev", by_file) == [
        task_files.NLVR2Example("dev-850-0-0", 11, 12, "there are two dogs.", 1)]
    assert task_files.read_task(tmp_path, "ve", "dev", by_file) == [task_files.VEExample("p0", 7, "a dog runs.", 1)]
    (tmp_path / "manifest.json").write_text("{}")  # the standard layout: annotations/instances.json
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances.json").write_text(json.dumps(
        {"images": [{"id": 3, "width": 200, "height": 100}], "annotations": [{"id": 9, "bbox": [20, 10, 50, 40]}]}))
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "refs.json").write_text(json.dumps([
        {"ref_id": 0, "ann_id": 9, "image_id": 3, "split": "val", "sentences": [{"sent": "left dog", "sent_id": 5}]}]))
    assert task_files.read_task(tmp_path, "rec", "val") == [
        task_files.RefExample(0, 5, 3, "left dog", (0.1, 0.1, 0.35, 0.5))]


# --- Targets ------------------------------------------------------------------------------------------------


def test_iou_targets_of_a_known_region_and_hand_made_boxes(artifacts):
    # Hand-made: [0, 0, .5, .5] against [.25, 0, .75, .5] overlap in .25 x .5 = .125 of a union .375 -> 1/3;
    # a disjoint box gets 0 and the box itself 1.
    regions = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9, 0.3, 0.3],
                            [0.25, 0.0, 0.75, 0.5, 0.5, 0.5]])
    assert iou_targets(regions, (0.25, 0.0, 0.75, 0.5)).tolist() == pytest.approx([1 / 3, 0.0, 1.0])
    # The store keeps the gold boxes (regions.boxes: gold): the referred object's own region has IoU 1.
    example = task_files.read_task(artifacts["dataset"], "rec", "train")[0]
    store = RegionStore(artifacts["regions"] / "train.h5")
    boxes = torch.from_numpy(store.get(example.image_id).boxes)
    iou = iou_targets(boxes, example.gold_box)
    assert iou.shape == (len(boxes),) and iou.max().item() == pytest.approx(1.0, abs=1e-5)
    own = int(iou.argmax())
    assert boxes[own, :4].tolist() == pytest.approx(list(example.gold_box), abs=1e-5)
    assert (iou[torch.arange(len(iou)) != own] < 1 - 1e-3).all()


def test_answer_vocabulary_orders_by_frequency_and_caps():
    examples = [task_files.VQAExample(1, 1, "q?", "what", "other", ("Two",) * 6 + ("three",) * 4),
                task_files.VQAExample(2, 1, "q?", "what", "other", ("yes",) * 10)]
    assert answer_vocabulary(examples) == ["yes", "2", "3"]  # normalised: number words become digits
    assert answer_vocabulary(examples, max_answers=2) == ["yes", "2"]


def test_flat_metrics_are_mlflow_safe_numbers():
    flat = flat_metrics({"splits": {"test": {"overall": 50.0, "per_question_type": {"what's it@": 25}}},
                         "task": "vqa", "broken": math.nan, "flag": True})
    assert flat == {"splits/test/overall": 50.0, "splits/test/per_question_type/what_s it_": 25.0}


# --- Fine-tuning end to end ---------------------------------------------------------------------------------


def _percentages(node: object) -> list[float]:
    """Every number under keys that hold percentages (accuracies, recalls, chance levels)."""
    if isinstance(node, dict):
        return [v for k, child in node.items() for v in ([child] if isinstance(child, (int, float)) and
                (k.startswith(("accuracy", "overall", "tr_r_at", "ir_r_at", "chance", "majority")))
                else _percentages(child))]
    return []


EXPECTED_SPLITS = {"retrieval": {"test"}, "vqa": {"val", "test"}, "ve": {"dev", "test"},
                   "rec": {"val", "testA", "testB"}, "nlvr2": {"dev", "test1"}}


@pytest.mark.parametrize("task", task_files.TASKS)
def test_each_task_fine_tunes_and_reports_metrics_in_range(stage0, task, tmp_path):
    cfg = load_config(SMALL)
    result = finetune(cfg, task, paths(stage0, tmp_path / "model.safetensors"), log=quiet)
    assert result["task"] == task and result["train"]["steps"] == 3 and result["train"]["examples"] > 0
    assert math.isfinite(result["train"]["first_loss"]) and math.isfinite(result["train"]["final_loss"])
    # Every evaluation split that has examples in the tiny world is reported, with its chance level.
    assert set(result["splits"]) <= EXPECTED_SPLITS[task] and result["splits"].keys() == result["chance"].keys()
    assert set(result["splits"]) >= EXPECTED_SPLITS[task] - {"testB"}
    values = _percentages(result["splits"]) + _percentages(result["chance"])
    assert values and all(0.0 <= v <= 100.0 for v in values)
    for split, metrics in result["splits"].items():
        chance = result["chance"][split]
        # The per-item scores the summary's bootstrap resamples average to the metric they stand for.
        items = metrics["item_scores"]
        assert set(items) == ({"fine_tuned_vsc/ir_r_at_1", "fine_tuned_itm/ir_r_at_1", "itm_hard_negative_accuracy",
                               "itm_hard_negative_ranking"}
                              if task == "retrieval" else {"overall" if task == "vqa" else "accuracy"})
        for name, scores in items.items():
            value = metrics
            for part in name.split("/"):
                value = value[part]
            size = 2 * metrics["texts"] if name == "itm_hard_negative_accuracy" else metrics.get("texts",
                                                                                               metrics.get("examples"))
            assert len(scores) == size and value == pytest.approx(sum(scores) / len(scores), abs=1e-9), name
        if task == "retrieval":
            rcfg = cfg["evaluate"]["retrieval"]
            assert metrics["pairs_scored"] == rcfg["k_text"] * metrics["images"] + rcfg["k_image"] * metrics["texts"]
            assert {"zero_shot", "fine_tuned_vsc", "fine_tuned_itm"} <= set(metrics)
            assert set(metrics["fine_tuned_itm"]) == set(chance) >= {"tr_r_at_1", "ir_r_at_10", "r_sum"}
            assert chance["ir_r_at_1"] == pytest.approx(100 / metrics["images"])
        elif task == "vqa":
            assert {"overall", "per_question_type", "per_answer_type"} <= set(metrics)
            assert chance["chance"] <= chance["majority"] and result["answers"] > 2
        else:
            assert "accuracy" in metrics and metrics["examples"] > 0
            if task in ("ve", "nlvr2"):
                labels = task_files.VE_LABELS if task == "ve" else task_files.NLVR2_LABELS
                assert chance["chance"] == pytest.approx(100 / len(labels))
            else:
                assert 0 < chance["chance"] < 100  # a few regions per image, one of them the gold box
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("model.cross_encoder.") for k in saved)
    assert any(k.startswith("head.") for k in saved) == (task in ("vqa", "ve", "nlvr2"))


def test_a_method_without_contrastive_embeddings_ranks_every_test_pair_by_itm(stage0, tmp_path):
    """SemVLP: ITM fine-tuned with random negatives, every (image, text) pair scored, in its downstream mode; the
    recalls are those of the exhaustive ITM scores of the fine-tuned weights."""
    from mvptr.evaluate.encode import encode_split
    from mvptr.evaluate.metrics import retrieval_recalls
    from mvptr.evaluate.rerank import exhaustive_scores, itm_pair_scorer
    from mvptr.pairs import PairDataset, PairInputs

    cfg = load_config([*SMALL, "method.name=semvlp", "method.qa_answers=50", "method.downstream_mode=two"])
    feature_dim = RegionStore(stage0["regions"] / "train.h5").feature_dim
    weights = tmp_path / "semvlp.safetensors"
    save_model(build_model(cfg, read_json(stage0["vocab"])["embedding_rows"], feature_dim), str(weights))
    task_paths = TaskPaths(stage0["dataset"], stage0["concepts"], stage0["vocab"], stage0["regions"], weights,
                           tmp_path / "tuned.safetensors")
    result = finetune(cfg, "retrieval", task_paths, log=quiet)
    metrics = result["splits"]["test"]
    assert metrics["ranking"] == "exhaustive_itm" and "zero_shot" not in metrics and "fine_tuned_vsc" not in metrics
    assert metrics["pairs_scored"] == metrics["images"] * metrics["texts"]
    assert metrics["rerank_pairs"] == 5 * metrics["images"] + 3 * metrics["texts"]
    inputs = PairInputs.from_artifacts(cfg, stage0["dataset"], stage0["concepts"], stage0["vocab"])
    model = build_model(cfg, inputs.vocab_size, feature_dim)
    load_model(with_head(model, None), str(tmp_path / "tuned.safetensors"))
    assert model.mode == "two"
    enc = encode_split(model, PairDataset(inputs, stage0["regions"] / "test.h5", "test"), torch.device("cpu"))
    scores = exhaustive_scores(len(enc.image_ids), len(enc.caption_ids), itm_pair_scorer(model, enc))
    assert metrics["fine_tuned_itm"] == pytest.approx(retrieval_recalls(scores, enc.text_to_image))


def test_same_seed_gives_the_same_result(stage0):
    cfg = load_config(SMALL)
    first, second = (finetune(cfg, "ve", paths(stage0), log=quiet) for _ in range(2))
    assert first["train"] == second["train"] and first["splits"] == second["splits"]


# --- The command ----------------------------------------------------------------------------------------------


def test_cli_runs_a_task_through_submitit_writes_the_json_and_logs_to_mlflow(stage0, tmp_path):
    from mvptr import tracking

    out, model_out = tmp_path / "rec.json", tmp_path / "rec.safetensors"
    proc = run_mvptr("evaluate", "run", "--task", "rec",
                     *(f"--{k}={stage0[k]}" for k in ("dataset", "concepts", "vocab", "regions", "weights")),
                     f"--job-dir={tmp_path / 'job'}", f"--out={out}", f"--model-out={model_out}", *SMALL,
                     "launch.cluster=local", "ablation=no_wpg", check=True)
    result = json.loads(out.read_text())
    assert result["task"] == "rec" and "val" in result["splits"] and model_out.stat().st_size > 0
    assert (tmp_path / "job" / "job.json").is_file()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["val_accuracy"] == round(
        result["splits"]["val"]["accuracy"], 2)
    mc = tracking.client()
    experiment = mc.get_experiment_by_name(tracking.experiment_name(load_config(SMALL)))
    runs = [r for r in tracking.search_all_runs(mc, [experiment.experiment_id], "tags.stage = 'evaluate'")
            if r.data.tags["ablation"] == "no_wpg" and r.data.tags["task"] == "rec"]
    assert len(runs) == 1
    assert runs[0].data.metrics["splits/val/accuracy"] == pytest.approx(result["splits"]["val"]["accuracy"])


def test_cli_refuses_missing_weights_and_a_rec_layer_the_model_lacks(stage0, tmp_path):
    def run(task: str, weights: Path, *overrides: str):
        return run_mvptr("evaluate", "run", "--task", task,
                         *(f"--{k}={stage0[k]}" for k in ("dataset", "concepts", "vocab", "regions")),
                         f"--weights={weights}", f"--job-dir={tmp_path / 'job'}", f"--out={tmp_path / 'x.json'}",
                         *overrides)

    missing = run("ve", tmp_path / "none.safetensors")
    assert missing.returncode == 2 and "none.safetensors" in missing.stderr
    too_deep = run("rec", stage0["weights"], *SMALL, "evaluate.rec.layer=2")
    assert too_deep.returncode == 2 and "evaluate.rec.layer" in too_deep.stderr
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "job").exists()


def test_a_fine_tuning_batch_larger_than_the_task_is_capped_before_submission_and_said(stage0, tmp_path):
    from mvptr.batching import count_task_examples

    examples = count_task_examples(stage0["dataset"], stage0["regions"], "ve")
    out = tmp_path / "ve.json"
    proc = run_mvptr("evaluate", "run", "--task", "ve",
                     *(f"--{k}={stage0[k]}" for k in ("dataset", "concepts", "vocab", "regions")),
                     f"--weights={stage0['weights']}", f"--job-dir={tmp_path / 'job'}", f"--out={out}", *SMALL,
                     "evaluate.ve.steps=2", f"evaluate.ve.batch_size={examples + 50}", "launch.cluster=local")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"mvptr: evaluate.ve.batch_size is {examples + 50} but the data has {examples} training item(s)"
            in proc.stdout)
    assert json.loads(out.read_text())["train"]["batch_size"] == examples


def test_task_texts_are_parsed_once_and_read_from_the_task_concepts_file(stage0, tmp_path):
    """`mvptr concepts tasks` parses every task text as the evaluation would; the evaluation then takes the
    graphs from that file (a graph edited there is the one encoded) and parses only the texts it lacks."""
    from mvptr.evaluate.finetune import Resources

    out = tmp_path / "task_concepts.json"
    run_mvptr("concepts", "tasks", "--dataset", str(stage0["dataset"]), "--tasks", "vqa", "ve", "rec", "nlvr2",
              "--out", str(out), "--n-process", "1", check=True)
    parsed = json.loads(out.read_text())
    questions = sorted({ex.question for ex in task_files.read_task(stage0["dataset"], "vqa", "train")})
    assert set(questions) <= set(parsed)
    cfg = load_config(SMALL)
    artifacts = {k: stage0[k] for k in ("dataset", "concepts", "vocab", "regions", "weights")}
    fresh = Resources(cfg, TaskPaths(**artifacts), torch.device("cpu"))
    fresh.encode_texts(questions)
    edited = next(q for q in questions if fresh.texts[q].concept_mask.any())
    missing = next(q for q in questions if q != edited)
    parsed[edited] = {**parsed[edited], "objects": [], "attributes": [], "relations": [],
                      "spans": {"objects": [], "attributes": [], "relations": []}}
    del parsed[missing]
    out.write_text(json.dumps(parsed))
    cached = Resources(cfg, TaskPaths(**artifacts, task_concepts=out), torch.device("cpu"))
    cached.encode_texts([edited, missing])
    assert not cached.texts[edited].concept_mask.any()  # the file's (edited) graph, not a fresh parse
    assert (cached.texts[missing].input_ids == fresh.texts[missing].input_ids).all()  # parsed here
