"""Tests of SemVLP (mvptr.models.semvlp, its objectives MOP and QA, the iterative schedule, the question bank) on
a tiny model (hidden 32, 2 shared layers) and on small hand-built tensors, and of its QA data on the tiny world.

Run: `.venv/bin/pytest tests/test_semvlp.py` (under a minute; the question-bank tests build the tiny world's
artifacts once per session, conftest.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_objectives import tiny_batch

from mvptr.config import load_config
from mvptr.data.task_files import read_vqa
from mvptr.data.vqa_answers import answer_vocabulary, vqa_soft_scores
from mvptr.models.semvlp import SemVLPConfig, SemVLPModel, stream_mode
from mvptr.objectives import StepContext
from mvptr.objectives.mop import MOP, masked_region_outputs
from mvptr.objectives.qa import QA
from mvptr.objectives.reconstruction import region_targets
from mvptr.objectives.step import PretrainStep
from mvptr.pairs import PairDataset, PairInputs, collate
from mvptr.questions import QuestionBank
from mvptr.text import load_tokenizer

torch.set_num_threads(1)

OBJECTIVES = ["mlm", "mop", "itm", "qa"]


def tiny_semvlp(**changes: object) -> SemVLPModel:
    torch.manual_seed(0)
    config = dict(vocab_size=120, region_feature_dim=8, hidden_size=32, num_text_layers=1, num_cross_layers=1,
                  num_attention_heads=2, intermediate_size=64, dropout=0.0, objectives=OBJECTIVES, qa_answers=5)
    return SemVLPModel(SemVLPConfig(**{**config, **changes})).eval()


def semvlp_batch(size: int = 4) -> dict[str, torch.Tensor]:
    """tiny_batch with region tags and one question per pair but the last."""
    batch = tiny_batch(size)
    batch["region_tags"] = torch.tensor([[20 + i, 60 + i, 70] for i in range(size)])
    batch["question_ids"] = torch.tensor([[101, 40 + i, 41, 102] for i in range(size)])
    batch["question_mask"] = torch.ones(size, 4, dtype=torch.long)
    batch["answer_scores"] = torch.zeros(size, 5)
    batch["answer_scores"][torch.arange(size), torch.arange(size) % 5] = 1.0
    batch["has_question"] = torch.tensor([True] * (size - 1) + [False])
    return batch


def semvlp_options() -> dict[str, dict]:
    return {name: dict(o) for name, o in load_config(["method.name=semvlp"])["pretrain"]["objectives"].items()}


# --- the iterative schedule -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "block", "expected"), [
    ((1, 1), 1, "STSTSTST"),
    ((2, 1), 1, "SSTSSTSS"),
    ((1, 2), 1, "STTSTTST"),
    ((1, 1), 3, "SSSTTTSS"),
    ((1, 0), 1, "SSSSSSSS"),
    ((0, 1), 2, "TTTTTTTT"),
])
def test_the_schedule_gives_the_mode_sequence(ratio, block, expected):
    assert "".join(stream_mode(step, ratio, block)[0].upper() for step in range(8)) == expected


def test_a_schedule_without_steps_is_refused():
    with pytest.raises(ValueError, match="mode_ratio"):
        stream_mode(0, (0, 0))
    with pytest.raises(ValueError, match="mode_ratio"):
        SemVLPConfig(mode_ratio=[1, 1], mode_block=0)


def test_a_pretraining_step_runs_in_its_scheduled_mode_and_logs_it_apart():
    model = tiny_semvlp(mode_ratio=[1, 2])
    step = PretrainStep(model, OBJECTIVES, semvlp_options(), torch.Generator().manual_seed(0))
    seen = []
    for index in range(6):
        loss, logs = step(semvlp_batch(), step=index)
        seen.append(next(key.split("/")[1] for key in logs if key.startswith("loss/")))
        assert {f"loss_{name}/{seen[-1]}" for name in OBJECTIVES} <= set(logs) and torch.isfinite(loss)
        assert not any(key.endswith("/single" if seen[-1] == "two" else "/two") for key in logs)
    assert seen == ["single", "two", "two", "single", "two", "two"]
    assert model.mode == "single"  # the downstream mode is back after each step
    # Fine-tuning keeps the model's mode.
    fixed = PretrainStep(model, ["itm"], semvlp_options(), torch.Generator().manual_seed(0), scheduled_modes=False)
    assert not any("/" in key for key in fixed(semvlp_batch(), step=1)[1])


# --- the two modes ------------------------------------------------------------------------------------------------


def _text_change(model: SemVLPModel, layers: int) -> tuple[float, float]:
    """How much the text outputs and the region outputs after `layers` layers move when the regions' features
    (for the text) or the caption's words (for the regions) change."""
    batch = semvlp_batch(2)
    other = {**batch, "region_feats": batch["region_feats"] + 1.0}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    other_ids = ids.clone()
    other_ids[:, 1:3] = 90
    with torch.no_grad():
        text = model.encode_text(ids, mask).tokens
        image = model.encode_image(batch)
        base = model.fuse(text, mask, image, num_layers=layers)
        moved_image = model.fuse(text, mask, model.encode_image(other), num_layers=layers)
        moved_text = model.fuse(model.encode_text(other_ids, mask).tokens, mask, image, num_layers=layers)
    return ((moved_image.text - base.text).abs().max().item(), (moved_text.regions - base.regions).abs().max().item())


@pytest.mark.parametrize("variant", [{}, {"cross_attention_position": "before_self"}, {"share_cross_attention": True},
                                     {"use_tags": True}])
def test_two_stream_mode_hides_the_other_modality_below_the_cross_attention_layers(variant):
    model = tiny_semvlp(num_text_layers=2, num_cross_layers=2, **variant)  # 4 shared layers, k = 2
    assert model.config.first_cross_layer == 2
    model.mode = "two"
    for layers in (1, 2):  # below L - k: each stream alone
        assert _text_change(model, layers) == (0.0, 0.0)
    for layers in (3, 4):
        text_moved, regions_moved = _text_change(model, layers)
        assert text_moved > 1e-4 and regions_moved > 1e-4
    model.mode = "single"  # full self-attention from the first layer
    text_moved, regions_moved = _text_change(model, 1)
    assert text_moved > 1e-4 and regions_moved > 1e-4


def test_k_sets_where_the_cross_attention_starts_and_shared_weights_are_saved_once(tmp_path):
    model = tiny_semvlp(num_text_layers=2, num_cross_layers=2, cross_attention_layers=3)
    model.mode = "two"
    assert _text_change(model, 1) == (0.0, 0.0) and _text_change(model, 2)[0] > 1e-4
    shared = tiny_semvlp(share_cross_attention=True)
    assert not any(".image." in name for name, _ in shared.named_parameters())
    assert any(".image." in name for name, _ in tiny_semvlp().named_parameters())
    shared.save_pretrained(tmp_path)
    loaded = SemVLPModel.from_pretrained(tmp_path)
    ours, theirs = shared.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert set(loaded.heads) == {"lm", "mop", "itm", "qa", "pooler"} and not loaded.has_contrastive


@pytest.mark.parametrize("mode", ["single", "two"])
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    batch = semvlp_batch()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        net = tiny_semvlp().train()
        net.mode = mode
        if checkpointing:
            net.activation_checkpointing_enable()
        text = net.encode_text(batch["input_ids"], batch["attention_mask"])
        net.match_logits(net.fuse(text.tokens, batch["attention_mask"], net.encode_image(batch))).sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("co_attention.") for name in plain) == (mode == "two")
    for name in plain:  # the same deterministic CPU kernels run again in backward: exact
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0)


# --- MOP ------------------------------------------------------------------------------------------------------------


def test_mop_targets_are_the_masked_regions_own_tags_and_features():
    batch = semvlp_batch(2)
    masked = torch.tensor([[False, True, False], [True, False, False]])
    tags, features = region_targets(batch, masked)
    assert tags.tolist() == [60, 21]  # row-major: image 0 region 1, then image 1 region 0
    torch.testing.assert_close(features, torch.stack([batch["region_feats"][0, 1], batch["region_feats"][1, 0]]))


def test_mop_predicts_from_fused_states_whose_masked_features_are_hidden():
    model = tiny_semvlp()
    batch = semvlp_batch(2)
    masked = torch.tensor([[False, True, False], [True, False, False]])
    changed = {**batch, "region_feats": batch["region_feats"].clone()}
    changed["region_feats"][masked] += 5.0  # only the masked regions' own features change
    for mode in ("single", "two"):
        model.mode = mode
        with torch.no_grad():
            states = masked_region_outputs(model, batch, masked, None)
            assert states.shape == (2, 32)
            torch.testing.assert_close(masked_region_outputs(model, changed, masked, None), states, rtol=0, atol=0)


def test_mop_loss_by_hand():
    model = tiny_semvlp()
    batch = semvlp_batch(2)
    options = {"weight": 1.0, "mask_prob": 0.5, "target": "both"}
    ctx = StepContext(generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss, logs = MOP(options, model.config)(model, batch, None, ctx)
        from mvptr.objectives.reconstruction import mask_regions

        masked = mask_regions(batch["region_mask"], 0.5, torch.Generator().manual_seed(3))
        states = masked_region_outputs(model, batch, masked, None)
        tags, features = region_targets(batch, masked)
        head = model.heads["mop"]
        expected = (torch.nn.functional.cross_entropy(head.tag(states), tags)
                    + torch.nn.functional.mse_loss(head.feature(states), features))
    torch.testing.assert_close(loss, expected)
    assert logs["mop_masked"] == masked.sum()


# --- QA -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "bce"])
def test_qa_loss_of_the_pairs_with_a_question_by_hand(kind):
    model = tiny_semvlp()
    batch = semvlp_batch()
    batch["answer_scores"][0, 4] = 0.3  # a second answer of the first question
    options = {"weight": 1.0, "loss": kind}
    with torch.no_grad():
        loss, logs = QA(options, model.config)(model, batch, None, StepContext())
        has = batch["has_question"]
        ids, mask = batch["question_ids"][has], batch["question_mask"][has]
        image = model.encode_image(batch).rows(has)
        logits = model.heads["qa"](model.pool(model.fuse(model.encode_text(ids, mask).tokens, mask, image)))
        scores = batch["answer_scores"][has]
        if kind == "bce":  # VQA fine-tuning's: summed over the answers, averaged over the questions
            expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, scores, reduction="sum") / 3
        else:  # cross-entropy against the normalised scores: question 0 is 1/1.3 answer 0 and 0.3/1.3 answer 4
            log_probs = torch.log_softmax(logits, dim=1)
            expected = -(log_probs[0, 0] / 1.3 + 0.3 / 1.3 * log_probs[0, 4] + log_probs[1, 1] + log_probs[2, 2]) / 3
    torch.testing.assert_close(loss, expected)
    assert logs["qa_questions"] == 3
    none = {**batch, "has_question": torch.zeros(4, dtype=torch.bool)}
    zero, _ = QA(options, model.config)(model, none, None, StepContext())
    assert zero.item() == 0.0 and zero.requires_grad


def _bank(dataset: Path, splits: dict[int, str], outputs: int = 50) -> QuestionBank:
    return QuestionBank.from_dataset(dataset, load_tokenizer("minilm"), splits, outputs, 35)


def _splits(dataset: Path) -> dict[int, str]:
    from mvptr.data.coco import open_prepared

    return dict(open_prepared(dataset).splits)


def test_the_question_bank_holds_training_questions_of_pretraining_images_only(artifacts):
    dataset = artifacts["dataset"]
    splits = _splits(dataset)
    bank = _bank(dataset, splits)
    train = read_vqa(dataset, "train")
    evaluated = {ex.question_id for split in ("val", "test") for ex in read_vqa(dataset, split)}
    evaluated_images = {ex.image_id for split in ("val", "test") for ex in read_vqa(dataset, split)}
    kept = bank.question_ids()
    assert kept and kept <= {ex.question_id for ex in train} and not kept & evaluated
    assert all(splits[image_id] == "train" and image_id not in evaluated_images for image_id in bank.questions)
    # The answer vocabulary is the kept training questions' (normalised, most frequent first).
    kept_examples = [ex for ex in train if ex.question_id in kept]
    assert bank.answers == answer_vocabulary(kept_examples, 50)
    assert bank.counts["questions"] == len(kept) and bank.counts["answers"] == len(bank.answers)


def test_a_training_question_of_a_test_image_is_left_out_and_counted(artifacts, tmp_path):
    """The leak a real corpus has: a VQA training question about an image that is evaluated."""
    dataset = tmp_path / "dataset"
    shutil.copytree(artifacts["dataset"], dataset)
    splits = _splits(dataset)
    test_image = next(image_id for image_id, split in sorted(splits.items()) if split == "test")
    questions_file = dataset / "vqa" / "v2_OpenEnded_mscoco_train_questions.json"
    annotations_file = dataset / "vqa" / "v2_mscoco_train_annotations.json"
    questions, annotations = json.loads(questions_file.read_text()), json.loads(annotations_file.read_text())
    leak = 10 ** 9
    questions["questions"].append({"question_id": leak, "image_id": test_image, "question": "what is leaking?"})
    annotations["annotations"].append({"question_id": leak, "image_id": test_image, "question_type": "what",
                                       "answer_type": "other", "answers": [{"answer": "leakword", "answer_id": 1}] * 10})
    questions_file.write_text(json.dumps(questions))
    annotations_file.write_text(json.dumps(annotations))
    clean, leaky = _bank(artifacts["dataset"], splits), _bank(dataset, splits)
    assert leak not in leaky.question_ids() and "leakword" not in leaky.answers
    assert leaky.question_ids() == clean.question_ids()
    assert leaky.counts["dropped_held_out"] == clean.counts["dropped_held_out"] + 1


def test_pairs_carry_their_images_questions_with_soft_scores(artifacts):
    cfg = load_config(["method.name=semvlp"])
    inputs = PairInputs.from_artifacts(cfg, artifacts["dataset"], artifacts["concepts"], artifacts["vocab"])
    bank = _bank(artifacts["dataset"], dict(inputs.splits))
    pairs = PairDataset(inputs, artifacts["regions"] / "train.h5", "train", bank)
    batch = collate([pairs[i] for i in range(8)])
    assert batch["answer_scores"].shape == (8, 50) and batch["has_question"].any()
    by_id = {ex.question_id: ex for ex in read_vqa(artifacts["dataset"], "train")}
    for row, (index, (_, image_id)) in enumerate(zip(range(8), pairs.pairs[:8], strict=True)):
        if not batch["has_question"][row]:
            assert image_id not in bank.questions
            continue
        question = bank.questions[image_id][index % len(bank.questions[image_id])]
        n = int(batch["question_mask"][row].sum())
        assert batch["question_ids"][row, :n].tolist() == question.input_ids.tolist()
        expected = torch.zeros(50)
        for answer, score in vqa_soft_scores(by_id[question.question_id].answers).items():
            if answer in bank.answers:
                expected[bank.answers.index(answer)] = score
        torch.testing.assert_close(batch["answer_scores"][row], expected)
