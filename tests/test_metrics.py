"""Tests of mvptr.evaluate: retrieval recalls, the official VQA accuracy, IoU and classification metrics on
hand-computed cases, and ITM re-ranking against exhaustive scoring with deterministic pair scorers.

Run: `.venv/bin/python -m pytest -q tests/test_metrics.py` (a few seconds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvptr.data.vqa_answers import normalize_answer, vqa_accuracy, vqa_soft_scores
from mvptr.evaluate.metrics import (
    box_iou,
    classification_report,
    grounding_accuracy,
    retrieval_ranks,
    retrieval_recalls,
    vqa_report,
)
from mvptr.evaluate.rerank import exhaustive_scores, itm_pair_scorer, rerank, score_pairs
from mvptr.models.mvptr import MVPTRConfig, MVPTRModel

torch.set_num_threads(1)

# --- Retrieval ------------------------------------------------------------------------------------------------

# One text per image (text t belongs to image t). Rows are images, columns texts.
SCORES_3X3 = [[0.90, 0.80, 0.10],
              [0.95, 0.20, 0.60],
              [0.30, 0.50, 0.40]]
# Text retrieval, row by row (rank 0 = first):
#   image 0: [0.90, 0.80, 0.10], its text 0 is the highest                   -> rank 0
#   image 1: [0.95, 0.20, 0.60], its text 1 (0.20) is below 0.95 and 0.60    -> rank 2
#   image 2: [0.30, 0.50, 0.40], its text 2 (0.40) is below 0.50             -> rank 1
#   R@1 = 1/3, R@2 = 2/3, R@3 = 3/3
# Image retrieval, column by column:
#   text 0: [0.90, 0.95, 0.30], its image 0 (0.90) is below 0.95             -> rank 1
#   text 1: [0.80, 0.20, 0.50], its image 1 (0.20) is below 0.80 and 0.50    -> rank 2
#   text 2: [0.10, 0.60, 0.40], its image 2 (0.40) is below 0.60             -> rank 1
#   R@1 = 0/3, R@2 = 2/3, R@3 = 3/3
# r_sum = 100/3 + 200/3 + 100 + 0 + 200/3 + 100 = 366.67


def test_retrieval_recalls_hand_computed_3x3() -> None:
    text_ranks, image_ranks = retrieval_ranks(SCORES_3X3, [0, 1, 2])
    assert text_ranks.tolist() == [0, 2, 1]
    assert image_ranks.tolist() == [1, 2, 1]
    metrics = retrieval_recalls(np.array(SCORES_3X3), [0, 1, 2], ks=(1, 2, 3))
    expected = {"tr_r_at_1": 100 / 3, "tr_r_at_2": 200 / 3, "tr_r_at_3": 100.0,
                "ir_r_at_1": 0.0, "ir_r_at_2": 200 / 3, "ir_r_at_3": 100.0, "r_sum": 1100 / 3}
    assert metrics == pytest.approx(expected)
    # The default ks: with 3 candidates R@5 and R@10 are 100.
    default = retrieval_recalls(torch.tensor(SCORES_3X3), torch.tensor([0, 1, 2]))
    assert sorted(default) == sorted(["tr_r_at_1", "tr_r_at_5", "tr_r_at_10", "ir_r_at_1", "ir_r_at_5",
                                      "ir_r_at_10", "r_sum"])
    assert default["tr_r_at_1"] == pytest.approx(100 / 3) and default["ir_r_at_10"] == 100.0


def test_retrieval_recalls_several_texts_per_image() -> None:
    # Texts 0, 1 show image 0; texts 2, 3 image 1.
    scores = [[0.1, 0.7, 0.9, 0.2],
              [0.8, 0.3, 0.4, 0.5]]
    # Image 0 orders t2 (0.9, wrong), t1 (0.7, right): its best right text is second -> rank 1.
    # Image 1 orders t0 (0.8, wrong), t3 (0.5, right): rank 1. TR R@1 = 0, R@2 = 100.
    # Texts: t0 [0.1, 0.8] right i0 -> 1; t1 [0.7, 0.3] -> 0; t2 [0.9, 0.4] right i1 -> 1; t3 [0.2, 0.5] -> 0.
    # IR R@1 = 50, R@2 = 100.
    metrics = retrieval_recalls(scores, [0, 0, 1, 1], ks=(1, 2))
    assert metrics == pytest.approx({"tr_r_at_1": 0.0, "tr_r_at_2": 100.0, "ir_r_at_1": 50.0, "ir_r_at_2": 100.0,
                                     "r_sum": 250.0})


def test_retrieval_ties_count_against_the_model() -> None:
    # Every score equal: each right candidate ties with every wrong one, so its rank is the number of wrong
    # candidates: 2 wrong texts per image, 1 wrong image per text (right texts tying with each other do not count).
    text_ranks, image_ranks = retrieval_ranks(torch.zeros(2, 4), [0, 0, 1, 1])
    assert text_ranks.tolist() == [2, 2]
    assert image_ranks.tolist() == [1, 1, 1, 1]
    assert retrieval_recalls(torch.zeros(3, 3), [0, 1, 2], ks=(1,))["tr_r_at_1"] == 0.0


def test_retrieval_separate_t2i_matrix() -> None:
    # The i2t matrix puts every right text first, the t2i matrix every right image last.
    i2t = torch.eye(3)
    t2i = 1 - torch.eye(3)
    metrics = retrieval_recalls(i2t, [0, 1, 2], ks=(1,), t2i_scores=t2i)
    assert metrics == {"tr_r_at_1": 100.0, "ir_r_at_1": 0.0, "r_sum": 100.0}


def test_retrieval_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no text"):
        retrieval_recalls(torch.zeros(3, 2), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recalls(torch.tensor([[float("nan")]]), [0])
    with pytest.raises(ValueError, match="entries"):
        retrieval_recalls(torch.zeros(2, 2), [0, 1, 1])


# --- VQA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("matching", "expected"), [
    # m humans of 10 gave the predicted answer. Leave human i out: if i is one of the m, the other 9 hold m - 1
    # matches, else m; the subset scores min(matches / 3, 1). Average over the 10 subsets:
    (0, 0.0),   # every subset holds 0 matches                                    -> 0
    (1, 0.3),   # 1 subset (without the match) scores 0, 9 subsets score 1/3      -> (0 + 9/3) / 10 = 0.3
    (2, 0.6),   # 2 subsets score 1/3, 8 subsets score 2/3                        -> (2/3 + 16/3) / 10 = 0.6
    (3, 0.9),   # 3 subsets score 2/3, 7 subsets score 1                          -> (2 + 7) / 10 = 0.9
    (4, 1.0),   # 4 subsets hold 3 matches (1), 6 subsets hold 4 (capped at 1)     -> 10 / 10 = 1.0
    (10, 1.0),  # every subset holds 9 matches, capped at 1                       -> 1.0
])
def test_vqa_accuracy_matching_humans(matching: int, expected: float) -> None:
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)
    # Annotation records ({"answer": ...}) are accepted as well.
    assert vqa_accuracy("2", [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]) == \
        pytest.approx(expected)


@pytest.mark.parametrize(("raw", "normalised"), [
    ("Two", "2"),                # lower case, then the number word
    ("a dog.", "dog"),           # final period dropped, article dropped
    ("dont", "don't"),           # contraction restored
    ("The Cat's toy", "cat's toy"),
    ("none", "0"),
    ("3.5", "3.5"),              # a period before a digit stays
    ("1,000", "1000"),           # a comma between digits: every mark is deleted
    ("left-hand", "left hand"),  # a mark between letters becomes a space
    ("t - shirt", "t shirt"),    # a mark next to a space is deleted
    ("yes!\n", "yes"),
    ("im", "im"),                # the script's map has "Im", which lower-cased answers never reach
])
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_normalises_the_prediction_only() -> None:
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("the dog", ["dog"] * 5 + ["cat"] * 5) == 1.0
    # The script maps number words in the prediction but not in the human answers (VQA v2's answers are already
    # written as digits): "two" against ten "two" scores 0, as it does officially.
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    # Human answers that differ get the punctuation handling only: "hot-dog" becomes "hot dog" on both sides
    # (3 matches -> 0.9), but "dog?" becomes "dog " (the mark turns into a space, which nothing strips), so it
    # never equals the prediction "dog": the official script's behaviour, kept.
    assert vqa_accuracy("hot-dog", ["hot-dog"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("hot dog", ["hot-dog"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dog", ["dog?"] * 9 + ["cat"]) == 0.0


def test_vqa_soft_scores() -> None:
    answers = ["2"] * 4 + ["3"] * 2 + ["4"] + ["many"] * 3
    # 4 humans -> 1.0, 2 -> 0.6, 1 -> 0.3, 3 -> 0.9 (the same leave-one-out averages as above).
    assert vqa_soft_scores(answers) == pytest.approx({"2": 1.0, "3": 0.6, "4": 0.3, "many": 0.9})
    # Keys are normalised like predictions ("Two" -> "2"), but the score is what the metric gives predicting "2":
    # the humans' "Two" and "two" are compared unnormalised (as officially), so only the two "2" count.
    assert vqa_soft_scores(["Two", "2", "2", "two", "3"] + ["no"] * 5) == \
        pytest.approx({"2": 0.6, "3": 0.3, "no": 1.0})


@pytest.mark.parametrize("answers", [
    ["Two", "2", "2", "two", "3"] + ["no"] * 5,
    ["hot-dog"] * 3 + ["hot dog", "Hot Dog", "a hot dog", "dog?", "dog", "dog.", "x"],
    ["The Cat's toy", "cat's toy", "dont", "don't", "1,000", "1000", "3.5", "none", "0", "left-hand"],
    ["Two"] * 10,  # all the same: the humans get no processing at all
    ["yes"] * 10,
])
def test_vqa_soft_score_is_the_accuracy_of_predicting_the_answer(answers: list[str]) -> None:
    scores = vqa_soft_scores(answers)
    assert set(scores) == {normalize_answer(answer) for answer in answers}
    for answer in set(answers) | set(scores):
        # Every human answer, raw or as the vocabulary spells it: training's target is the metric's score.
        assert scores[normalize_answer(answer)] == vqa_accuracy(answer, answers), answer


def test_vqa_report_per_question_type() -> None:
    records = [
        {"question_type": "how many", "answer_type": "number", "prediction": "2", "answers": ["2"] * 10},  # 1.0
        {"question_type": "how many", "answer_type": "number", "prediction": "3",
         "answers": ["3"] + ["2"] * 9},                                                                   # 0.3
        {"question_type": "is the", "answer_type": "yes/no", "prediction": "no", "answers": ["yes"] * 10},  # 0
    ]
    report = vqa_report(records)
    assert report["count"] == 3
    assert report["overall"] == pytest.approx(100 * (1.0 + 0.3 + 0.0) / 3)
    assert report["per_question_type"] == pytest.approx({"how many": 65.0, "is the": 0.0})
    assert report["per_answer_type"] == pytest.approx({"number": 65.0, "yes/no": 0.0})
    with pytest.raises(ValueError):
        vqa_report([])


# --- Boxes and classes ----------------------------------------------------------------------------------------


def test_box_iou_hand_made() -> None:
    a = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], dtype=np.float32)
    b = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [5, 5, 6, 6]], dtype=np.float32)
    # a0 (area 4) vs b0 (area 4): overlap [1,1,2,2] = 1, union 4 + 4 - 1 = 7          -> 1/7
    # a0 vs b1 (area 1): overlap [0,0,1,1] = 1, union 4 + 1 - 1 = 4                     -> 1/4
    # a1 vs b0: the same box -> 1; a1 vs b1: they touch at the point (1, 1) -> 0; b2 is far from both -> 0
    expected = np.array([[1 / 7, 1 / 4, 0], [1, 0, 0]])
    iou = box_iou(a, b)
    assert isinstance(iou, np.ndarray) and iou.shape == (2, 3)
    np.testing.assert_allclose(iou, expected, rtol=1e-6)
    torch.testing.assert_close(box_iou(torch.tensor(a), torch.tensor(b)), torch.tensor(expected).float())
    # A degenerate (zero-area) box has IoU 0 with itself, not NaN.
    assert box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]]).tolist() == [[0.0]]


def test_grounding_accuracy() -> None:
    pred = [[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]]
    gold = [[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 2, 1]]
    # IoU 1 (hit), 1/7 (miss), 2/4 = 0.5 (hit: the threshold is inclusive) -> 2/3
    assert grounding_accuracy(pred, gold) == pytest.approx(200 / 3)
    assert grounding_accuracy(pred, gold, threshold=0.6) == pytest.approx(100 / 3)


def test_classification_report() -> None:
    labels = ("contradiction", "neutral", "entailment")
    gold = [0, 0, 1, 2, 2, 2]
    pred = [0, 1, 1, 2, 2, 0]
    # 4 of 6 right; contradiction 1/2, neutral 1/1, entailment 2/3.
    assert classification_report(pred, gold, labels) == pytest.approx(
        {"accuracy": 400 / 6, "accuracy_contradiction": 50.0, "accuracy_neutral": 100.0,
         "accuracy_entailment": 200 / 3})
    # A class absent from the gold labels has no accuracy.
    assert "accuracy_neutral" not in classification_report([0, 2], [0, 2], labels)
    with pytest.raises(ValueError):
        classification_report([0], [3], labels)


# --- Re-ranking -----------------------------------------------------------------------------------------------


class LookupScorer:
    """pair_scores from a fixed (n_images, n_texts) matrix, counting the pairs and calls it gets."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.pairs = 0
        self.calls = 0
        self.largest_batch = 0

    def __call__(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        self.pairs += image_idx.numel()
        self.calls += 1
        self.largest_batch = max(self.largest_batch, image_idx.numel())
        return self.table[image_idx, text_idx]


def random_world(n_images: int = 6, texts_per_image: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    n_texts = n_images * texts_per_image
    similarity = torch.rand(n_images, n_texts, generator=generator)
    itm = torch.randn(n_images, n_texts, generator=generator) * 3
    text_to_image = torch.arange(n_images).repeat_interleave(texts_per_image)
    return similarity, itm, text_to_image


def test_rerank_with_every_candidate_is_exhaustive() -> None:
    similarity, itm, text_to_image = random_world()
    n_images, n_texts = similarity.shape
    result = rerank(similarity, k_text=n_texts, k_image=n_images, pair_scores=LookupScorer(itm), batch_size=7)
    full = exhaustive_scores(n_images, n_texts, LookupScorer(itm), batch_size=5)
    torch.testing.assert_close(full, itm)
    torch.testing.assert_close(result.i2t, full, rtol=0, atol=0)
    torch.testing.assert_close(result.t2i, full, rtol=0, atol=0)
    ks = (1, 2, 5)
    assert retrieval_recalls(result.i2t, text_to_image, ks, t2i_scores=result.t2i) == \
        retrieval_recalls(full, text_to_image, ks)
    # k above the number of candidates is cut to it.
    assert rerank(similarity, 1000, 1000, LookupScorer(itm)).pairs_scored == 2 * n_images * n_texts


def test_rerank_scores_k_pairs_per_image_and_text() -> None:
    similarity, itm, _ = random_world(n_images=7, texts_per_image=5)
    n_images, n_texts = similarity.shape  # 7 x 35
    scorer = LookupScorer(itm)
    result = rerank(similarity, k_text=4, k_image=3, pair_scores=scorer, batch_size=8)
    assert result.pairs_scored == scorer.pairs == 4 * n_images + 3 * n_texts  # 28 + 105, not 7 * 35 = 245
    # Batched: ceil(28 / 8) + ceil(105 / 8) calls of at most 8 pairs.
    assert scorer.calls == 4 + 14 and scorer.largest_batch == 8
    exhaustive = LookupScorer(itm)
    exhaustive_scores(n_images, n_texts, exhaustive, batch_size=8)
    assert exhaustive.pairs == n_images * n_texts and exhaustive.calls == 31


def test_rerank_changes_the_top1() -> None:
    # Two images, one text each. VSC prefers the wrong text for image 0 and the wrong image for text 1;
    # ITM gets both right, and both are among the top-2 candidates, so re-ranking fixes R@1.
    similarity = torch.tensor([[0.4, 0.9],
                               [0.3, 0.8]])
    itm = torch.tensor([[5.0, -5.0],
                        [-5.0, 5.0]])
    text_to_image = [0, 1]
    before = retrieval_recalls(similarity, text_to_image, ks=(1,))
    # VSC: image 0 ranks text 1 first (miss), image 1 text 1 (hit); text 0 ranks image 0 (hit), text 1 image 0
    # (miss): 50 / 50.
    assert before == {"tr_r_at_1": 50.0, "ir_r_at_1": 50.0, "r_sum": 100.0}
    result = rerank(similarity, k_text=2, k_image=2, pair_scores=LookupScorer(itm))
    after = retrieval_recalls(result.i2t, text_to_image, ks=(1,), t2i_scores=result.t2i)
    assert after == {"tr_r_at_1": 100.0, "ir_r_at_1": 100.0, "r_sum": 200.0}


def test_rerank_keeps_noncandidates_below_in_similarity_order() -> None:
    similarity, itm, _ = random_world(n_images=5, texts_per_image=4, seed=1)
    result = rerank(similarity, k_text=3, k_image=2, pair_scores=LookupScorer(itm))
    for scores, sim, k in ((result.i2t, similarity, 3), (result.t2i.T, similarity.T, 2)):
        for row, sim_row in zip(scores, sim):
            candidates = sim_row.topk(k).indices
            others = torch.ones_like(sim_row, dtype=torch.bool)
            others[candidates] = False
            assert row[others].max() < row[candidates].min()
            assert torch.equal(row[others].argsort(), sim_row[others].argsort())
    # Candidates carry their ITM score (image 0's top text by similarity).
    best = int(similarity[0].argmax())
    assert result.i2t[0, best] == itm[0, best]
    # ALBEF's variant adds the similarity to the candidates' ITM score.
    albef = rerank(similarity, 3, 2, LookupScorer(itm), add_similarity=True)
    assert albef.i2t[0, best] == pytest.approx(float(itm[0, best] + similarity[0, best]))


def test_itm_hard_negative_accuracy_and_ranking() -> None:
    from mvptr.evaluate.finetune import itm_hard_negative_hits

    # Three images, one text each; the similarity's hardest wrong image of text t is image (t + 1) % 3.
    similarity = torch.tensor([[0.9, 0.1, 0.8],
                               [0.8, 0.9, 0.1],
                               [0.1, 0.8, 0.9]])
    text_to_image = torch.arange(3)
    # A head that ranks every own pair above its hard negative but calls every pair no match (all margins < 0,
    # as a head trained on more negatives than positives can be): accuracy 50, ranking 100.
    shifted = torch.tensor([[-1.0, -9.0, -5.0],
                            [-5.0, -1.0, -9.0],
                            [-9.0, -5.0, -1.0]])
    items = itm_hard_negative_hits(LookupScorer(shifted), similarity, text_to_image, batch_size=2)
    assert items["itm_hard_negative_accuracy"] == [0.0, 0.0, 0.0, 100.0, 100.0, 100.0]
    assert items["itm_hard_negative_ranking"] == [100.0, 100.0, 100.0]
    # Text 2's hard negative above its own pair, and called a match: both metrics lose that text's items.
    shifted[0, 2] = 2.0
    items = itm_hard_negative_hits(LookupScorer(shifted + 1.5), similarity, text_to_image, batch_size=2)
    assert items["itm_hard_negative_accuracy"] == [100.0, 100.0, 100.0, 100.0, 100.0, 0.0]
    assert items["itm_hard_negative_ranking"] == [100.0, 100.0, 0.0]
    # A constant head: 50 and 0 (a tie is not a ranking).
    items = itm_hard_negative_hits(LookupScorer(torch.ones(3, 3)), similarity, text_to_image, batch_size=2)
    assert sum(items["itm_hard_negative_accuracy"]) / 6 == 50.0 and items["itm_hard_negative_ranking"] == [0.0] * 3


def test_score_pairs_checks_the_scorer() -> None:
    with pytest.raises(ValueError, match="scores"):
        score_pairs(torch.arange(4), torch.arange(4), lambda i, t: torch.zeros(3), batch_size=4)


def test_itm_pair_scorer_matches_the_model() -> None:
    from mvptr.evaluate.encode import SplitEncoding

    torch.manual_seed(0)
    model = MVPTRModel(MVPTRConfig(vocab_size=120, region_feature_dim=8, hidden_size=32, num_text_layers=1,
                                   num_visual_layers=1, num_cross_layers=1, num_attention_heads=2,
                                   intermediate_size=64, dropout=0.0, objectives=["vsc", "itm"])).eval()
    text_hidden, region_hidden = torch.randn(3, 6, 32), torch.randn(2, 4, 32)
    text_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    region_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    enc = SplitEncoding(image_ids=[0, 1], caption_ids=[0, 1, 2], text_to_image=torch.tensor([0, 1, 1]),
                        text_hidden=text_hidden, text_mask=text_mask, image_cls=torch.randn(2, 32),
                        region_hidden=region_hidden, region_mask=region_mask, text_emb=torch.zeros(3, 32),
                        image_emb=torch.zeros(2, 32))
    image_idx, text_idx = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 2])
    with torch.no_grad():
        direct = model.match_logits(model.fuse(text_hidden[text_idx], text_mask[text_idx],
                                               enc.images(image_idx)))[:, 1]
        hidden = torch.cat([text_hidden[text_idx], region_hidden[image_idx]], dim=1)
        mask = torch.cat([text_mask[text_idx], region_mask[image_idx]], dim=1).bool()
        by_hand = model.heads["itm"](model.heads["pooler"](model.cross_encoder(
            hidden, attention_mask=torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
        ).last_hidden_state))[:, 1]
        trimmed = itm_pair_scorer(model, enc)(image_idx, text_idx)
        untrimmed = itm_pair_scorer(model, enc, trim_padding=False)(image_idx, text_idx)
    torch.testing.assert_close(untrimmed, direct, rtol=0, atol=0)
    torch.testing.assert_close(direct, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trimmed, direct, rtol=1e-5, atol=1e-5)
