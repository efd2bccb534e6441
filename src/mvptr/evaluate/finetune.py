"""Fine-tune a pre-trained model of any method on one downstream task and evaluate it (METHODS.md, "Downstream").

Why: the ablations are compared by what their pre-training buys downstream, so every task is fine-tuned from
the given weights with the same budget (`evaluate.<task>` steps, batch size, learning rate) whatever those
weights are - a model that was never trained gives the "no pre-training" baseline - and whatever the method:
the model is seen only through the interface of `mvptr.models.base`. The fine-tuning recipe does not follow
the pre-training ablation either: retrieval always trains the method's contrastive objective (the one with the
contrastive head: MVPTR's VSC, SIMLA's ITC with its queue and momentum model) + ITM with weight 1 and
`evaluate.retrieval.itm_sampling` negatives (the options otherwise the method's).

    retrieval  contrastive + hard-negative ITM (`PretrainStep`) on the train captions; on the test split, rank
               every pair by the contrastive similarity, re-rank the top k_text texts per image and k_image
               images per text with ITM; R@1/5/10 both ways and r_sum zero-shot (contrastive, before
               fine-tuning) and fine-tuned (contrastive, ITM). A method without contrastive embeddings
               (SemVLP) fine-tunes ITM with random negatives and ranks every test pair by ITM: exhaustive,
               images x texts cross-modal passes (`ranking` exhaustive_itm, with the pairs the re-ranking
               would have scored, `rerank_pairs`, and the seconds, `itm_seconds`, beside each other)
    vqa        answer vocabulary = every (normalised) training answer, most frequent first (capped by
               evaluate.vqa.max_answers); soft-score BCE; official VQA accuracy overall and per question and
               answer type
    ve         3-way cross-entropy; accuracy overall and per class
    rec        MSE of cosine(text [CLS], region) after `evaluate.rec.layer` cross-modal layers to the region's
               IoU with the gold box; accuracy = the top region has IoU >= 0.5 with the gold box
    nlvr2      2-way cross-entropy on [pooled(text, left) ; pooled(text, right)]; accuracy
Chance levels sit beside each result: retrieval the expected recalls of a random ranking; vqa the accuracy of
a uniformly random vocabulary answer (`chance`) and of always the most frequent training answer
(`majority`); ve and nlvr2 100 / classes (`chance`) and the training majority class (`majority`); rec the
expected accuracy of a random region (`chance`).

Texts (questions, hypotheses, expressions, statements) are parsed with the project's scene-graph parser and
encoded like captions (`[CLS] words concepts [SEP]`), so the text side keeps its concepts as in pre-training;
each distinct text is parsed once. The batch order is a function of (seed, step) (`batch_indices`) and
dropout is seeded per task, so a rerun (or a requeued job) computes the same numbers on CPU.

MLflow (when `TaskPaths.run_dir` is set, as `mvptr evaluate run` sets it to the job folder): the run of stage
`evaluate` is opened when the job starts (its id kept in run_dir/run.json, so a requeued job logs into the same
run), with the dataset as input and MLflow's system metrics; the fine-tuning loss is logged as it goes
(`finetune_loss`, `finetune_lr` per step) and the result's numeric metrics at the end. The run stays RUNNING:
the command ends it once the outputs are written (`mvptr.evaluate.commands`).

Use: `result = finetune(cfg, "vqa", TaskPaths(dataset, concepts, vocab, regions, weights), log=print)`
(or `mvptr evaluate run`, `mvptr.evaluate.commands`). The result:
    task, weights, seconds
    train     examples, steps, batch_size, lr, first_loss, final_loss (mean of the last tenth of the steps)
    splits    {split: metrics}: retrieval images, texts, ranking, zero_shot / fine_tuned_vsc / fine_tuned_itm
              recalls, k_text, k_image, pairs_scored, itm_seconds (exhaustive_itm: rerank_pairs),
              itm_hard_negative_accuracy; vqa vqa_report; ve, nlvr2 classification_report; rec accuracy; and
              item_scores {headline metric: its score per test item} (lists: not MLflow metrics)
    chance    {split: chance levels}, as above
    answers (vqa: vocabulary size), skipped_examples (example tasks: images in no region store)
"""

from __future__ import annotations

import functools
import json
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from mvptr.artifacts import RUN_FILE, TaskPaths
from mvptr.atomic import atomic_write_json
from mvptr.batching import fit_batch
from mvptr.data import task_files
from mvptr.data.coco import read_json
from mvptr.data.order import batch_indices
from mvptr.data.vqa_answers import answer_vocabulary, vqa_accuracy, vqa_soft_scores
from mvptr.errors import DataError
from mvptr.evaluate.encode import encode_split
from mvptr.evaluate.heads import pooled, region_scores
from mvptr.evaluate.metrics import (
    box_iou,
    classification_report,
    grounding_accuracy,
    retrieval_ranks,
    retrieval_recalls,
    vqa_report,
)
from mvptr.evaluate.rerank import exhaustive_scores, itm_pair_scorer, rerank
from mvptr.evaluate.zero_shot import chance_recalls
from mvptr.headline import flat_metrics
from mvptr.models import build_model
from mvptr.objectives import load_objective
from mvptr.objectives.heads import MLPHead
from mvptr.objectives.step import PretrainStep, momentum_options
from mvptr.pairs import EncodedText, PairDataset, PairInputs, TextEncoder, collate, collate_image, collate_text
from mvptr.progress import Progress
from mvptr.seeds import derive_seed
from mvptr.train.optim import build_optimizer

Log = Callable[[str], None]
Batch = dict[str, Tensor]


class Resources:
    """What every task reads: the model with the given weights, the images of every region store, and the
    text encoder (with the scene-graph parser, loaded on first use)."""

    def __init__(self, cfg: Mapping[str, Any], paths: TaskPaths, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.inputs = PairInputs.from_artifacts(cfg, paths.dataset, paths.concepts, paths.vocab)
        # One PairDataset per split of the images: a task example's image is in its split's store.
        stores = {split: Path(paths.regions) / f"{split}.h5" for split in sorted(set(self.inputs.splits.values()))}
        self.sets = {split: PairDataset(self.inputs, path, split) for split, path in stores.items() if path.is_file()}
        feature_dim = next(iter(self.sets.values())).store.feature_dim
        self.model = build_model(cfg, self.inputs.vocab_size, feature_dim)
        load_model(self.model, str(paths.weights))
        self.model.to(device)
        pcfg = cfg["pretrain"]
        self.text_encoder = TextEncoder(self.inputs.tokenizer, read_json(paths.vocab), pcfg["max_words"],
                                        pcfg["max_concepts"])
        self.texts: dict[str, EncodedText] = {}
        # Scene graphs of the task texts, parsed once for every evaluation (`mvptr concepts tasks`), if given.
        self.parsed: dict[str, Any] = read_json(paths.task_concepts) if paths.task_concepts is not None else {}
        self._images: dict[int, dict[str, Any]] = {}
        self.track: Callable[[Mapping[str, float], int], None] | None = None  # step metrics to MLflow

    def has_image(self, image_id: int) -> bool:
        dataset = self.sets.get(self.inputs.splits.get(image_id, ""))
        return dataset is not None and image_id in dataset.store

    def image_item(self, image_id: int) -> dict[str, Any]:
        """The image's tags, region features and boxes (PairDataset.image_item), read once."""
        if image_id not in self._images:
            self._images[image_id] = self.sets[self.inputs.splits[image_id]].image_item(image_id)
        return self._images[image_id]

    def image_batch(self, image_ids: Sequence[int]) -> Batch:
        return self.to_device(collate_image([self.image_item(i) for i in image_ids]))

    def encode_texts(self, texts: Sequence[str]) -> None:
        """Encode every text not seen yet (each distinct text once), with its scene graph from the task concepts
        file (`mvptr concepts tasks`) where it has the text, else parsed here."""
        new = sorted(set(texts) - set(self.texts))
        if not new:
            return
        graphs = dict.fromkeys(new) | {t: self.parsed[t] for t in new if t in self.parsed}
        missing = [t for t, graph in graphs.items() if graph is None]
        if missing:
            from mvptr.concepts.parser import SceneGraphParser

            ccfg = self.cfg["concepts"]
            parser = SceneGraphParser(ccfg["spacy_model"], batch_size=ccfg["batch_size"], n_process=1)
            graphs.update(zip(missing, (graph.to_json() for graph in parser.parse(missing)), strict=True))
        self.texts.update(zip(new, self.text_encoder.encode_many(new, [graphs[t] for t in new]), strict=True))

    def text_batch(self, texts: Sequence[str]) -> Batch:
        items = [{"input_ids": enc.input_ids, "concept_mask": enc.concept_mask, "concept_links": enc.concept_links,
                  "caption_id": -1} for enc in (self.texts[t] for t in texts)]
        return self.to_device(collate_text(items))

    def encode_text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(B, L, H) token states of encoded texts (`TextEncoding.tokens`, what the fusion starts from), and their
        attention mask."""
        batch = self.text_batch(texts)
        text = self.model.encode_text(batch["input_ids"], batch["attention_mask"])
        return text.tokens, batch["attention_mask"]

    def to_device(self, batch: Mapping[str, Tensor]) -> Batch:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}


def _autocast(device: torch.device) -> torch.autocast:
    # bf16 on CUDA as in pre-training; fp32 on CPU (deterministic).
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def fit(module: nn.Module, batch_loss: Callable[[list[int], int], Tensor], num_items: int, tcfg: Mapping[str, Any],
        ecfg: Mapping[str, Any], seed: int, device: torch.device, log: Log, name: str,
        after_step: Callable[[], None] | None = None,
        track: Callable[[Mapping[str, float], int], None] | None = None) -> dict[str, Any]:
    """AdamW with linear warmup and decay over `tcfg["steps"]` steps of `tcfg["batch_size"]` items drawn by
    `batch_indices` (`batch_loss(indices, step)`), then `after_step()` (a momentum update) if given; `track`
    gets the loss and learning rate of (at most about 200 of) the steps; returns the first loss and the mean
    loss of the last tenth of the steps."""
    # `mvptr evaluate run` capped the batch at the task file's examples before submitting; fewer can be usable
    # here (images skipped as unreadable), the same rule then applies again.
    batch_size, note = fit_batch(f"evaluate.{name}.batch_size", tcfg["batch_size"], num_items)
    if note:
        log(note)
    steps = tcfg["steps"]
    optimizer, scheduler = build_optimizer(module, {
        "steps": steps, "lr": tcfg["lr"], "warmup_steps": round(ecfg["warmup_fraction"] * steps), "decay": "linear",
        "weight_decay": ecfg["weight_decay"]})
    losses: list[float] = []
    progress = Progress(f"{name} fine-tuning", steps, "steps", log)
    for step in range(steps):
        module.train()
        with _autocast(device):
            loss = batch_loss(batch_indices(num_items, batch_size, step, seed), step)
        loss.backward()
        if ecfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), ecfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        progress.advance(note=f", loss {losses[-1]:.4f}")
        if track is not None and ((step + 1) % max(1, steps // 200) == 0 or step + 1 == steps):
            track({"finetune_loss": losses[-1], "finetune_lr": scheduler.get_last_lr()[0]}, step + 1)
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "batch_size": batch_size, "lr": tcfg["lr"], "first_loss": losses[0],
            "final_loss": sum(tail) / len(tail)}


# --- Retrieval ----------------------------------------------------------------------------------------------


def retrieval_objectives(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The method's objectives that retrieval fine-tunes with (those with the contrastive or the ITM head),
    at weight 1, ITM with `evaluate.retrieval.itm_sampling` negatives - or uniformly random ones when the method
    has no contrastive objective (SemVLP: no similarity to pick hard negatives by)."""
    chosen = {}
    for name, options in cfg["pretrain"]["objectives"].items():
        head = load_objective(name).head_name
        if head in ("contrastive", "itm"):
            chosen[name] = {**options, "weight": 1.0}
    contrastive = any(load_objective(name).head_name == "contrastive" for name in chosen)
    for name in chosen:
        if load_objective(name).head_name == "itm":
            chosen[name]["sampling"] = cfg["evaluate"]["retrieval"]["itm_sampling"] if contrastive else "random"
    return chosen


def retrieval(res: Resources, cfg: Mapping[str, Any], seed: int, log: Log) -> tuple[dict[str, Any], None]:
    """Fine-tune with the contrastive objective + ITM, evaluate zero-shot and fine-tuned retrieval; no head (the
    model's own). A model without contrastive embeddings (SemVLP) fine-tunes ITM alone and ranks every test
    pair by ITM (`exhaustive_scores`); its result says what that cost beside the re-ranking protocol."""
    ecfg, rcfg = cfg["evaluate"], cfg["evaluate"]["retrieval"]
    train, test = res.sets[task_files.TRAIN_SPLIT["retrieval"]], res.sets[task_files.EVAL_SPLITS["retrieval"][0]]
    contrastive = res.model.has_contrastive
    metrics: dict[str, Any] = {}
    if contrastive:
        before = encode_split(res.model, test, res.device, ecfg["eval_batch_size"])
        metrics["zero_shot"] = retrieval_recalls(before.similarity(), before.text_to_image)
    options = retrieval_objectives(cfg)
    generator = torch.Generator().manual_seed(derive_seed(seed, "objectives"))
    step = PretrainStep(res.model, list(options), options, generator, **momentum_options(cfg),
                        scheduled_modes=False).to(res.device)

    def batch_loss(indices: list[int], index: int) -> Tensor:
        return step(res.to_device(collate([train[i] for i in indices])), step=index)[0]

    training = fit(res.model, batch_loss, len(train), rcfg, ecfg, seed, res.device, log, "retrieval",
                   after_step=step.after_step, track=res.track)
    enc = encode_split(res.model, test, res.device, ecfg["eval_batch_size"]).to(res.device)
    scorer = itm_pair_scorer(res.model, enc)
    n_images, n_texts = len(enc.image_ids), len(enc.caption_ids)
    started = time.monotonic()
    if contrastive:
        similarity = enc.similarity()
        with _autocast(res.device):
            reranked = rerank(similarity, rcfg["k_text"], rcfg["k_image"], scorer, ecfg["eval_batch_size"],
                              add_similarity=rcfg["add_similarity"])
        metrics.update(
            ranking="rerank", fine_tuned_vsc=retrieval_recalls(similarity, enc.text_to_image),
            fine_tuned_itm=retrieval_recalls(reranked.i2t, enc.text_to_image, t2i_scores=reranked.t2i),
            k_text=rcfg["k_text"], k_image=rcfg["k_image"], add_similarity=rcfg["add_similarity"],
            pairs_scored=reranked.pairs_scored)
        item_scores = {"fine_tuned_vsc/ir_r_at_1": image_hits(similarity, enc.text_to_image),
                       "fine_tuned_itm/ir_r_at_1": image_hits(reranked.i2t, enc.text_to_image, reranked.t2i)}
        hardest = similarity
    else:
        with _autocast(res.device):
            scores = exhaustive_scores(n_images, n_texts, scorer, ecfg["eval_batch_size"], device=res.device)
        # What the re-ranking protocol of the other methods would have scored, for the cost comparison.
        rerank_pairs = min(rcfg["k_text"], n_texts) * n_images + min(rcfg["k_image"], n_images) * n_texts
        metrics.update(ranking="exhaustive_itm", fine_tuned_itm=retrieval_recalls(scores, enc.text_to_image),
                       pairs_scored=n_images * n_texts, rerank_pairs=rerank_pairs)
        item_scores = {"fine_tuned_itm/ir_r_at_1": image_hits(scores, enc.text_to_image)}
        hardest = scores
    metrics["itm_seconds"] = round(time.monotonic() - started, 2)
    with _autocast(res.device):
        itm_items = itm_hard_negative_hits(itm_pair_scorer(res.model, enc, margin=True), hardest,
                                           enc.text_to_image, ecfg["eval_batch_size"])
    for name, items in itm_items.items():
        metrics[name] = sum(items) / len(items)
    item_scores.update(itm_items)
    metrics["item_scores"] = item_scores
    log(f"retrieval: {metrics['ranking']} scored {metrics['pairs_scored']} pairs by ITM in {metrics['itm_seconds']}s")
    test_split = task_files.EVAL_SPLITS["retrieval"][0]
    return {"train": {"examples": len(train), **training},
            "splits": {test_split: {"images": n_images, "texts": n_texts, **metrics}},
            "chance": {test_split: chance_recalls(enc.text_to_image)}}, None


def image_hits(scores: Tensor, text_to_image: Tensor, t2i_scores: Tensor | None = None) -> list[float]:
    """Per test text, 100 if its image ranks first among the images (image retrieval R@1), else 0: the items the
    summary's bootstrap resamples (their mean is `ir_r_at_1`)."""
    _, image_ranks = retrieval_ranks(scores, text_to_image, t2i_scores=t2i_scores)
    return (100.0 * (image_ranks < 1).double()).tolist()


def itm_hard_negative_hits(margin_scorer: Callable[[Tensor, Tensor], Tensor], scores: Tensor,
                           text_to_image: Tensor, batch_size: int) -> dict[str, list[float]]:
    """The ITM head on each test text's own image and its hard negative - the wrong image `scores` (n_images,
    n_texts) ranks first - as per-item scores (100 or 0) of two metrics:

    - `itm_hard_negative_accuracy`, two items per text: the own pair called a match (margin > 0), the hard
      negative called no match. 50 for a head that says the same of every pair, whatever it ranks: a head whose
      margins are all shifted to one side of 0 (trained on more negatives than positives) scores 50 here;
    - `itm_hard_negative_ranking`, one item per text: the own pair's margin above the hard negative's, the
      threshold-free comparison re-ranking makes (50 for a head that cannot tell them apart, ties counted 0)."""
    from mvptr.evaluate.rerank import score_pairs

    owner = text_to_image.to(scores.device)
    texts = torch.arange(scores.shape[1], device=scores.device)
    wrong = scores.float().clone()
    wrong[owner, texts] = float("-inf")
    negative = wrong.argmax(dim=0)
    positive_margin = score_pairs(owner, texts, margin_scorer, batch_size)
    negative_margin = score_pairs(negative, texts, margin_scorer, batch_size)
    return {"itm_hard_negative_accuracy":
            (100.0 * torch.cat([positive_margin > 0, negative_margin <= 0]).double()).tolist(),
            "itm_hard_negative_ranking": (100.0 * (positive_margin > negative_margin).double()).tolist()}


# --- Tasks on examples (vqa, ve, rec, nlvr2) ----------------------------------------------------------------


class ExampleTask(ABC):
    """What an example task defines: its head, the text of an example, the outputs a batch of examples gives
    (one row of scores per example, whose argmax is the prediction; -inf on padding), the training loss, the
    report of predictions and the chance levels."""

    head: nn.Module | None = None

    def __init__(self, res: Resources, cfg: Mapping[str, Any], train: Sequence[Any]) -> None:
        self.res, self.cfg = res, cfg

    @abstractmethod
    def text(self, example: Any) -> str: ...

    @abstractmethod
    def outputs(self, examples: Sequence[Any]) -> Tensor: ...

    @abstractmethod
    def loss(self, outputs: Tensor, examples: Sequence[Any]) -> Tensor: ...

    @abstractmethod
    def report(self, predictions: list[int], examples: Sequence[Any]) -> dict[str, Any]: ...

    @abstractmethod
    def item_scores(self, predictions: list[int], examples: Sequence[Any]) -> dict[str, list[float]]:
        """{headline metric: its score on each example} (the metric is their mean): what the summary's bootstrap
        resamples."""

    @abstractmethod
    def chance(self, examples: Sequence[Any]) -> dict[str, float]: ...


class ClassificationTask(ExampleTask):
    """Cross-entropy over `labels` on MLPHead(pooled); VE (one image) and NLVR2 (two) differ in `features`."""

    labels: tuple[str, ...] = ()
    images_per_example = 1

    def __init__(self, res: Resources, cfg: Mapping[str, Any], train: Sequence[Any]) -> None:
        super().__init__(res, cfg, train)
        hidden = res.model.config.hidden_size
        self.head = MLPHead(self.images_per_example * hidden, len(self.labels)).to(res.device)
        self.majority = Counter(ex.label for ex in train).most_common(1)[0][0]

    def outputs(self, examples: Sequence[Any]) -> Tensor:
        return self.head(self.features(examples))

    @abstractmethod
    def features(self, examples: Sequence[Any]) -> Tensor: ...

    def loss(self, outputs: Tensor, examples: Sequence[Any]) -> Tensor:
        labels = torch.tensor([ex.label for ex in examples], device=outputs.device)
        return F.cross_entropy(outputs.float(), labels)

    def report(self, predictions: list[int], examples: Sequence[Any]) -> dict[str, Any]:
        return classification_report(predictions, [ex.label for ex in examples], self.labels)

    def item_scores(self, predictions: list[int], examples: Sequence[Any]) -> dict[str, list[float]]:
        return {"accuracy": [100.0 * (p == ex.label) for p, ex in zip(predictions, examples, strict=True)]}

    def chance(self, examples: Sequence[Any]) -> dict[str, float]:
        majority = 100.0 * sum(ex.label == self.majority for ex in examples) / len(examples)
        return {"chance": 100.0 / len(self.labels), "majority": majority}


class VisualEntailment(ClassificationTask):
    labels = task_files.VE_LABELS

    def text(self, example: task_files.VEExample) -> str:
        return example.hypothesis

    def features(self, examples: Sequence[task_files.VEExample]) -> Tensor:
        text, mask = self.res.encode_text([ex.hypothesis for ex in examples])
        return pooled(self.res.model, text, mask, self.res.image_batch([ex.image_id for ex in examples]))


class NLVR2(ClassificationTask):
    labels = task_files.NLVR2_LABELS
    images_per_example = 2

    def text(self, example: task_files.NLVR2Example) -> str:
        return example.sentence

    def features(self, examples: Sequence[task_files.NLVR2Example]) -> Tensor:
        # One text encoding, two cross-modal passes (one per image), as NLVR2 models pair the images.
        text, mask = self.res.encode_text([ex.sentence for ex in examples])
        model, images = self.res.model, self.res.image_batch
        left = pooled(model, text, mask, images([ex.left_image_id for ex in examples]))
        right = pooled(model, text, mask, images([ex.right_image_id for ex in examples]))
        return torch.cat([left, right], dim=-1)


class VQA(ExampleTask):
    def __init__(self, res: Resources, cfg: Mapping[str, Any], train: Sequence[task_files.VQAExample]) -> None:
        super().__init__(res, cfg, train)
        self.answers = answer_vocabulary(train, cfg["evaluate"]["vqa"]["max_answers"])
        self.index = {answer: i for i, answer in enumerate(self.answers)}
        self.head = MLPHead(res.model.config.hidden_size, len(self.answers)).to(res.device)

    def text(self, example: task_files.VQAExample) -> str:
        return example.question

    def outputs(self, examples: Sequence[task_files.VQAExample]) -> Tensor:
        text, mask = self.res.encode_text([ex.question for ex in examples])
        return self.head(pooled(self.res.model, text, mask, self.res.image_batch([ex.image_id for ex in examples])))

    def targets(self, examples: Sequence[task_files.VQAExample]) -> Tensor:
        """(B, answers) soft scores: the VQA accuracy each vocabulary answer would get (0 if out of vocabulary)."""
        out = torch.zeros(len(examples), len(self.answers))
        for row, ex in enumerate(examples):
            for answer, score in vqa_soft_scores(ex.answers).items():
                if answer in self.index:
                    out[row, self.index[answer]] = score
        return out

    def loss(self, outputs: Tensor, examples: Sequence[task_files.VQAExample]) -> Tensor:
        # Summed over answers, averaged over questions (VinVL: mean BCE times the number of answers).
        targets = self.targets(examples).to(outputs.device)
        return F.binary_cross_entropy_with_logits(outputs.float(), targets, reduction="sum") / len(examples)

    def report(self, predictions: list[int], examples: Sequence[task_files.VQAExample]) -> dict[str, Any]:
        return vqa_report(self._records([self.answers[p] for p in predictions], examples))

    def item_scores(self, predictions: list[int], examples: Sequence[task_files.VQAExample]) -> dict[str, list[float]]:
        return {"overall": [100.0 * vqa_accuracy(self.answers[p], ex.answers)
                            for p, ex in zip(predictions, examples, strict=True)]}

    def chance(self, examples: Sequence[task_files.VQAExample]) -> dict[str, float]:
        # Uniform: the mean over questions of the mean VQA accuracy of the vocabulary's answers.
        uniform = sum(self.targets(examples).sum(dim=1).tolist()) / (len(examples) * len(self.answers))
        majority = vqa_report(self._records([self.answers[0]] * len(examples), examples))["overall"]
        return {"chance": 100.0 * uniform, "majority": majority}

    @staticmethod
    def _records(predictions: Sequence[str], examples: Sequence[task_files.VQAExample]) -> list[dict[str, Any]]:
        return [{"question_type": ex.question_type, "answer_type": ex.answer_type, "prediction": prediction,
                 "answers": ex.answers} for prediction, ex in zip(predictions, examples, strict=True)]


def iou_targets(region_boxes: Tensor, gold_box: Sequence[float]) -> Tensor:
    """(R,) IoU of each region (normalised [x1, y1, x2, y2, w, h] boxes, (R, 6)) with the normalised gold box."""
    gold = torch.tensor([list(gold_box)], dtype=torch.float32)
    return box_iou(region_boxes[:, :4].float(), gold)[:, 0]


class ReferringExpressions(ExampleTask):
    def __init__(self, res: Resources, cfg: Mapping[str, Any], train: Sequence[task_files.RefExample]) -> None:
        super().__init__(res, cfg, train)
        self.layer = cfg["evaluate"]["rec"]["layer"]

    def text(self, example: task_files.RefExample) -> str:
        return example.expression

    def outputs(self, examples: Sequence[task_files.RefExample]) -> Tensor:
        text, mask = self.res.encode_text([ex.expression for ex in examples])
        images = self.res.image_batch([ex.image_id for ex in examples])
        return region_scores(self.res.model, text, mask, images, self.layer)

    def regions(self, example: task_files.RefExample) -> Tensor:
        """(R, 6) the example's region boxes."""
        return torch.from_numpy(self.res.image_item(example.image_id)["region_boxes"])

    def loss(self, outputs: Tensor, examples: Sequence[task_files.RefExample]) -> Tensor:
        valid = torch.isfinite(outputs)
        targets = torch.zeros_like(outputs)
        for row, ex in enumerate(examples):
            iou = iou_targets(self.regions(ex), ex.gold_box)
            targets[row, : len(iou)] = iou.to(outputs.device)
        return F.mse_loss(outputs[valid], targets[valid])

    def report(self, predictions: list[int], examples: Sequence[task_files.RefExample]) -> dict[str, Any]:
        chosen, gold = self._boxes(predictions, examples)
        return {"accuracy": grounding_accuracy(chosen, gold)}

    def item_scores(self, predictions: list[int], examples: Sequence[task_files.RefExample]) -> dict[str, list[float]]:
        chosen, gold = self._boxes(predictions, examples)
        hits = box_iou(chosen, gold).diagonal() >= 0.5
        return {"accuracy": (100.0 * hits.double()).tolist()}

    def _boxes(self, predictions: list[int], examples: Sequence[task_files.RefExample]) -> tuple[Tensor, Tensor]:
        """(N, 4) the chosen region's box and (N, 4) the gold box of each example."""
        chosen = torch.stack([self.regions(ex)[p, :4] for p, ex in zip(predictions, examples, strict=True)])
        return chosen.float(), torch.tensor([list(ex.gold_box) for ex in examples], dtype=torch.float32)

    def chance(self, examples: Sequence[task_files.RefExample]) -> dict[str, float]:
        hits = [(iou_targets(self.regions(ex), ex.gold_box) >= 0.5).double().mean().item() for ex in examples]
        return {"chance": 100.0 * sum(hits) / len(hits)}


EXAMPLE_TASKS: dict[str, type[ExampleTask]] = {"vqa": VQA, "ve": VisualEntailment, "rec": ReferringExpressions,
                                               "nlvr2": NLVR2}


@torch.no_grad()
def predict(task: ExampleTask, examples: Sequence[Any], batch_size: int) -> list[int]:
    task.res.model.eval()
    if task.head is not None:
        task.head.eval()
    predictions: list[int] = []
    for start in range(0, len(examples), batch_size):
        with _autocast(task.res.device):
            outputs = task.outputs(examples[start:start + batch_size])
        predictions += outputs.float().argmax(dim=1).tolist()
    return predictions


def example_task(res: Resources, cfg: Mapping[str, Any], name: str, paths: TaskPaths, seed: int,
                 log: Log) -> tuple[dict[str, Any], nn.Module | None]:
    """Fine-tune on the task's training examples and evaluate on its evaluation splits; returns the head."""
    ecfg = cfg["evaluate"]
    by_file = task_files.image_ids_by_file(paths.dataset)
    read = {split: task_files.read_task(paths.dataset, name, split, by_file)
            for split in (task_files.TRAIN_SPLIT[name], *task_files.EVAL_SPLITS[name])}
    # Examples whose image is in no region store (skipped as unreadable) cannot be used.
    usable = {split: [ex for ex in examples if all(map(res.has_image, _image_ids(ex)))]
              for split, examples in read.items()}
    train = usable.pop(task_files.TRAIN_SPLIT[name])
    if not train:
        raise DataError(f"{paths.dataset}: {name} has no training example whose images are in the region stores")
    # A small world may leave an evaluation split empty (e.g. no RefCOCO testB expression): it gets no metrics.
    usable = {split: examples for split, examples in usable.items() if examples}
    task = EXAMPLE_TASKS[name](res, cfg, train)
    started = time.monotonic()
    res.encode_texts([task.text(ex) for examples in (train, *usable.values()) for ex in examples])
    log(f"{name}: parsed and encoded {len(res.texts)} distinct texts in {time.monotonic() - started:.1f}s")
    module = with_head(res.model, task.head)

    def batch_loss(indices: list[int], _: int) -> Tensor:
        examples = [train[i] for i in indices]
        return task.loss(task.outputs(examples), examples)

    training = fit(module, batch_loss, len(train), ecfg[name], ecfg, seed, res.device, log, name, track=res.track)
    splits = {}
    for split, examples in usable.items():
        predictions = predict(task, examples, ecfg["eval_batch_size"])
        splits[split] = {"examples": len(examples), **task.report(predictions, examples),
                         "item_scores": task.item_scores(predictions, examples)}
    result = {"train": {"examples": len(train), **training}, "splits": splits,
              "chance": {split: task.chance(examples) for split, examples in usable.items()},
              "skipped_examples": sum(len(read[s]) for s in read) - len(train) - sum(map(len, usable.values()))}
    if isinstance(task, VQA):
        result["answers"] = len(task.answers)
    return result, task.head


def with_head(model: nn.Module, head: nn.Module | None) -> nn.ModuleDict:
    """The fine-tuned parameters as one module: `model.*` (+ `head.*`), what is optimised and saved."""
    return nn.ModuleDict({"model": model, **({"head": head} if head is not None else {})})


def _image_ids(example: Any) -> tuple[int, ...]:
    if isinstance(example, task_files.NLVR2Example):
        return example.left_image_id, example.right_image_id
    return (example.image_id,)


def finetune(cfg: Mapping[str, Any], task: str, paths: TaskPaths, *, log: Log = print) -> dict[str, Any]:
    """Fine-tune `paths.weights` on `task` and evaluate it; saves model (+ head) to `paths.save_to` if set."""
    if task not in task_files.TASKS:
        raise ValueError(f"unknown downstream task {task!r}; tasks: {', '.join(task_files.TASKS)}")
    started = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Dropout draws from the global generator: seeded per (seed, task) (mvptr.seeds), as are the heads'
    # initialisation.
    seed = derive_seed(cfg["train_seed"], "finetune", task)
    torch.manual_seed(seed)
    run_id = open_evaluation_run(cfg, task, paths) if paths.run_dir is not None else None
    monitor = None
    if run_id:
        from mvptr import tracking

        monitor = tracking.start_system_metrics(run_id)
    try:
        res = Resources(cfg, paths, device)
        if run_id:
            res.track = functools.partial(_log_step, run_id)
        if task == "retrieval":
            result, head = retrieval(res, cfg, seed, log)
        else:
            result, head = example_task(res, cfg, task, paths, seed, log)
    finally:
        if monitor is not None:
            monitor.finish()
    if paths.save_to is not None:
        tmp = Path(paths.save_to).with_name(Path(paths.save_to).name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        save_model(with_head(res.model, head), str(tmp))
        tmp.replace(paths.save_to)
    seconds = time.monotonic() - started
    log(f"{task}: done in {seconds:.1f}s")
    out = {"task": task, "weights": str(paths.weights), **result, "seconds": round(seconds, 1)}
    if run_id:
        from mvptr import tracking

        tracking.log_metrics(run_id, flat_metrics(out), step=0)
        out["mlflow_run_id"] = run_id
    return out




def open_evaluation_run(cfg: Mapping[str, Any], task: str, paths: TaskPaths) -> str:
    """The task's MLflow run: resumed from run_dir/run.json (a requeued job), else started; its id kept there."""
    from mvptr import tracking

    run_file = Path(paths.run_dir) / RUN_FILE
    previous = json.loads(run_file.read_text())["mlflow_run_id"] if run_file.is_file() else None
    try:
        run_id = tracking.open_run(cfg, stage="evaluate", task=task, run_id=previous, on_param_conflict="warn",
                                   dataset=paths.dataset)
    except tracking.ResumeConflict:  # an older job folder of another study: a new run
        run_id = tracking.open_run(cfg, stage="evaluate", task=task, dataset=paths.dataset)
    atomic_write_json(run_file, {"mlflow_run_id": run_id})
    return run_id


def _log_step(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mvptr import tracking

    tracking.log_metrics(run_id, metrics, step)
