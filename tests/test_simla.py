"""Tests of SIMLA (mvptr.models.simla and its objectives ITC, XMM, PSL, the momentum model) on a tiny model
(hidden 32, one layer per stack) and on small hand-built tensors whose right answer was computed by hand.

Run: `.venv/bin/pytest tests/test_simla.py` (a few seconds).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_objectives import CLS, PAD, SEP, tiny_batch

from mvptr.config import load_config
from mvptr.models.simla import SIMLAConfig, SIMLAModel
from mvptr.objectives import PairEncoding, StepContext
from mvptr.objectives.itc import ITC, contrastive_targets, soft_cross_entropy
from mvptr.objectives.itm import negative_pairs
from mvptr.objectives.momentum import Momentum
from mvptr.objectives.psl import PSL, keyword_labels
from mvptr.objectives.reconstruction import mask_regions
from mvptr.objectives.sampling import allowed_negatives
from mvptr.objectives.step import PretrainStep
from mvptr.objectives.xmm import XMM

torch.set_num_threads(1)

OBJECTIVES = ["itc", "itm", "mlm", "xmm", "psl"]


def tiny_simla(**changes: object) -> SIMLAModel:
    torch.manual_seed(0)
    config = dict(vocab_size=120, region_feature_dim=8, hidden_size=32, num_text_layers=1, num_visual_layers=1,
                  num_cross_layers=1, num_attention_heads=2, intermediate_size=64, dropout=0.0, projection_dim=16,
                  objectives=OBJECTIVES)
    return SIMLAModel(SIMLAConfig(**{**config, **changes}))


def simla_batch(size: int = 4) -> dict[str, torch.Tensor]:
    batch = tiny_batch(size)
    batch["region_tags"] = torch.tensor([[20 + i, 60 + i, 70] for i in range(size)])
    return batch


def simla_options() -> dict[str, dict]:
    return {name: dict(options) for name, options in load_config(["method.name=simla"])["pretrain"]["objectives"].items()}


# --- the model -------------------------------------------------------------------------------------------------


def test_text_mode_skips_cross_attention_and_multimodal_mode_reads_the_image():
    model = tiny_simla().eval()
    batch = simla_batch()
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(text.tokens, model.embed_tokens(batch["input_ids"]))  # fusion starts from these
    text.cls.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "crossattention" in n)
    image = model.encode_image(batch)
    other = model.encode_image({**batch, "region_feats": batch["region_feats"].flip(0)})
    fused, fused_other = (model.fuse(text.tokens, batch["attention_mask"], im).text for im in (image, other))
    assert not torch.allclose(fused, fused_other)
    assert model.num_fusion_layers == 2 and SIMLAModel.fusion_layers(load_config(["method.name=simla"])) == 4


def test_masked_regions_are_replaced_by_the_mask_embedding():
    model = tiny_simla().eval()
    batch = simla_batch()
    masked = torch.zeros_like(batch["region_mask"], dtype=torch.bool)
    masked[0, 1] = True
    changed = {**batch, "region_feats": batch["region_feats"].clone()}
    changed["region_feats"][0, 1] += 5.0  # a masked region's own feature no longer matters
    a = model.encode_image({**batch, "masked_regions": masked})
    b = model.encode_image({**changed, "masked_regions": masked})
    torch.testing.assert_close(a.regions, b.regions)
    assert not torch.allclose(model.encode_image(batch).regions[0], a.regions[0])


def test_cls_attention_is_the_last_layers_softmax_over_real_tokens():
    model = tiny_simla(num_text_layers=0, num_cross_layers=1).eval()  # one shared layer: its input is the embeddings
    batch = simla_batch()
    text, image = model.encode_text(batch["input_ids"], batch["attention_mask"]), model.encode_image(batch)
    attention = model.cls_attention(text.tokens, batch["attention_mask"], image)
    assert attention.shape == (4, 2, 8)
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(4, 2))
    assert torch.all(attention[~batch["attention_mask"].bool()[:, None, :].expand(-1, 2, -1)] == 0)
    self_attention = model.encoder.layer[0].attention.self
    q = self_attention.query(text.tokens[0, :1]).view(1, 2, 16).transpose(0, 1)  # (heads, 1, 16)
    k = self_attention.key(text.tokens[0]).view(8, 2, 16).transpose(0, 1)  # (heads, 8, 16)
    scores = (q @ k.transpose(1, 2)).squeeze(1) / 4.0
    scores[:, ~batch["attention_mask"][0].bool()] = float("-inf")
    torch.testing.assert_close(attention[0], scores.softmax(dim=-1))


# --- ITC -------------------------------------------------------------------------------------------------------


def test_distillation_target_by_hand():
    # softmax([0, ln 2, 0]) = [1/4, 1/2, 1/4]; positives 0 and 2 -> [1/2, 0, 1/2];
    # 0.4 * soft + 0.6 * hard = [0.4, 0.2, 0.4].
    positives = torch.tensor([[True, False, True]])
    target = contrastive_targets(positives, torch.tensor([[0.0, math.log(2.0), 0.0]]), torch.ones(1, 3, dtype=bool), 0.4)
    torch.testing.assert_close(target, torch.tensor([[0.4, 0.2, 0.4]]))
    torch.testing.assert_close(contrastive_targets(positives, torch.zeros(1, 3), torch.ones(1, 3, dtype=bool), 0.0),
                               torch.tensor([[0.5, 0.0, 0.5]]))


def test_soft_cross_entropy_leaves_out_empty_queue_slots():
    # Valid columns 0 and 1 with logits 0 and 0: log-probabilities ln(1/2); the invalid logit 5 must not count.
    loss = soft_cross_entropy(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([[0.5, 0.5, 0.0]]),
                              torch.tensor([[True, True, False]]))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_queue_contents_and_pointer_after_steps():
    config = tiny_simla().config
    itc = ITC({"weight": 1.0, "queue_size": 5, "distill": 0.0, "allow_duplicates": False}, config)
    assert itc.ptr.item() == 0 and torch.all(itc.id_queue == -1)
    first, second = torch.randn(3, 16), torch.randn(3, 16)
    itc.enqueue(first, -first, torch.tensor([7, 8, 9]))
    assert itc.ptr.item() == 3 and itc.id_queue.tolist() == [7, 8, 9, -1, -1]
    torch.testing.assert_close(itc.text_queue[:3], first)
    torch.testing.assert_close(itc.image_queue[:3], -first)
    itc.enqueue(second, -second, torch.tensor([1, 2, 3]))  # wraps: slots 3, 4, then 0
    assert itc.ptr.item() == 1 and itc.id_queue.tolist() == [3, 8, 9, 1, 2]
    torch.testing.assert_close(itc.text_queue[[3, 4, 0]], second)
    torch.testing.assert_close(itc.text_queue[[1, 2]], first[1:])


def test_itc_targets_count_queued_captions_of_the_same_image_as_positives():
    """With the queue holding image 0's momentum embeddings, the loss is the hand formula over batch + queue."""
    model = tiny_simla().eval()
    batch = simla_batch()
    momentum = Momentum(model, 0.995)
    itc = ITC({"weight": 1.0, "queue_size": 4, "distill": 0.0, "allow_duplicates": False}, model.config)
    encoded = PairEncoding(model, batch)
    with torch.no_grad():
        text_m, image_m = momentum.model.contrastive_embeddings(encoded.text, encoded.image)
    # A queued entry of image 0 that is not the batch's own pair 0 (another caption of it, earlier).
    queued_text, queued_image = text_m[1:2].flip(-1), image_m[1:2].flip(-1)
    itc.enqueue(queued_text, queued_image, torch.tensor([0]))
    loss, _ = itc(model, batch, encoded, StepContext(momentum=momentum.model))
    with torch.no_grad():
        text, image = model.contrastive_embeddings(encoded.text, encoded.image)
        temperature = model.heads["contrastive"].temperature
        all_text, all_image = torch.cat([text_m, queued_text]), torch.cat([image_m, queued_image])
        expected = 0.0
        for i in range(4):
            positives = [i, 4] if i == 0 else [i]  # image 0 is also the queued entry (column 4)
            for ours, theirs in ((image[i], all_text), (text[i], all_image)):
                log_probs = torch.log_softmax(ours @ theirs.T / temperature, dim=0)
                expected += -log_probs[positives].mean() / 8
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # After the loss the batch was enqueued: 1 + 4 entries in a queue of 4, the oldest overwritten.
    assert itc.id_queue.tolist() == [3, 0, 1, 2] and itc.ptr.item() == 1


# --- ITM with both negatives -----------------------------------------------------------------------------------


def test_itm_both_gives_every_text_and_every_image_a_negative_never_sharing_image_or_caption():
    batch = tiny_batch(4)
    batch["image_ids"] = torch.tensor([0, 0, 1, 2])  # captions 0 and 1 show the same image
    allowed = allowed_negatives(batch)
    texts, images = negative_pairs(torch.randn(4, 4), allowed, "softmax", torch.Generator().manual_seed(0), both=True)
    assert len(texts) == 8
    assert all(allowed[t, i] for t, i in zip(texts.tolist(), images.tolist()))
    assert sorted(texts[:4].tolist()) == [0, 1, 2, 3] and sorted(images[4:].tolist()) == [0, 1, 2, 3]
    # One image's captions only: nothing may be a negative, on either side.
    batch["image_ids"] = torch.zeros(4, dtype=torch.long)
    texts, _ = negative_pairs(torch.randn(4, 4), allowed_negatives(batch), "softmax",
                              torch.Generator().manual_seed(0), both=True)
    assert len(texts) == 0


# --- XMM -------------------------------------------------------------------------------------------------------


def test_mask_regions_masks_at_least_one_real_region_per_image():
    region_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    masked = mask_regions(region_mask, 0.0, torch.Generator().manual_seed(0))  # prob 0: only the fallback
    assert masked.sum(dim=1).tolist() == [1, 1, 0] and not (masked & ~region_mask.bool()).any()
    everything = mask_regions(region_mask, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(everything, region_mask.bool())


def test_xmm_targets_are_the_masked_regions_tags_and_features():
    """A head whose weights are 0 predicts its bias everywhere: the losses are then known by hand."""
    model = tiny_simla().eval()
    batch = simla_batch()
    head = model.heads["xmm"]
    with torch.no_grad():
        head.tag.weight.zero_()
        head.tag.bias.zero_()
        head.tag.bias[[20, 21, 22, 23]] = math.log(3.0)  # the tags of the first region of each image
        head.feature.weight.zero_()
        head.feature.bias.fill_(0.5)
    options = {"weight": 1.0, "mask_prob": 0.0, "distill": 0.0}  # prob 0: one region per image
    for target in ("tag", "feature", "both"):
        xmm = XMM({**options, "target": target}, model.config)
        generator = torch.Generator().manual_seed(3)
        masked = mask_regions(batch["region_mask"], 0.0, torch.Generator().manual_seed(3))
        loss, logs = xmm(model, batch, None, StepContext(generator=generator))
        # CE of a logit vector with four entries ln 3 (the rest 0) over 120 rows: log(4*3 + 116) - (ln 3 if the
        # region's tag is one of the four).
        tags = batch["region_tags"][masked]
        tag_loss = sum(math.log(128.0) - (math.log(3.0) if t in (20, 21, 22, 23) else 0.0) for t in tags.tolist())
        tag_loss /= len(tags)
        feature_loss = ((0.5 - batch["region_feats"][masked].float()) ** 2).mean().item()
        expected = {"tag": tag_loss, "feature": feature_loss, "both": tag_loss + feature_loss}[target]
        assert loss.item() == pytest.approx(expected, rel=1e-5), target


# --- PSL -------------------------------------------------------------------------------------------------------

# [CLS] 10 11 12 [SEP] [PAD]; two heads' [CLS] attention rows.
PSL_IDS = torch.tensor([[CLS, 10, 11, 12, SEP, PAD]])
PSL_ATTENTION = torch.tensor([[[0.30, 0.25, 0.05, 0.10, 0.30, 0.00],
                               [0.40, 0.05, 0.30, 0.04, 0.21, 0.00]]])


def labelled(labels: torch.Tensor) -> list[int]:
    return torch.nonzero(labels[0]).flatten().tolist()


def test_psl_keywords_exclude_special_tokens_and_stop_words():
    # Candidates: positions 1-3. Head 0 votes for 1 (0.25) and 3 (0.10); head 1 for 2 (0.30) and 1 (0.05).
    # Votes: 1 -> 2, 2 -> 1, 3 -> 1; two keywords: position 1, then the tie 2/3 goes to the earlier, 2.
    candidates = torch.tensor([[False, True, True, True, False, False]])
    assert labelled(keyword_labels(PSL_ATTENTION, PSL_IDS, candidates, 2, 2, 120)) == [10, 11]
    # A stop word (12 here) is not a candidate: head 0 then votes for 1 and 2.
    no_stop = torch.tensor([[False, True, True, False, False, False]])
    assert labelled(keyword_labels(PSL_ATTENTION, PSL_IDS, no_stop, 2, 3, 120)) == [10, 11]
    # More votes per head than candidates: the votes left over go nowhere (no special token becomes a keyword).
    assert labelled(keyword_labels(PSL_ATTENTION, PSL_IDS, no_stop, 3, 3, 120)) == [10, 11]


def test_psl_keywords_of_the_released_code_let_sep_and_pad_in():
    # Every position votes: head 0 -> 0 and 4 (0.30 each), head 1 -> 0 (0.40) and 2 (0.30). Votes: 0 -> 2,
    # 2 -> 1, 4 -> 1, the rest 0. Four keywords: 0, 2, 4, then 1 (no votes, the earliest left); [CLS] cleared.
    assert labelled(keyword_labels(PSL_ATTENTION, PSL_IDS, None, 2, 4, 120, cls_token_id=CLS)) == [10, 11, SEP]
    # Six keywords take every position, padding included.
    assert PAD in labelled(keyword_labels(PSL_ATTENTION, PSL_IDS, None, 2, 6, 120, cls_token_id=CLS))


def test_psl_candidates_leave_out_stop_words_of_the_tokenizer():
    from mvptr.text import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    ids = tokenizer(["the dog is on a red mat"], return_tensors="pt")["input_ids"]
    model_config = tiny_simla(vocab_size=len(tokenizer)).config
    psl = PSL({"weight": 1.0, "votes_per_head": 4, "keywords": 5, "distill": 0.4,
               "exclude_special_and_stop_words": True}, model_config)
    candidates = psl.candidates({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    words = tokenizer.convert_ids_to_tokens(ids[0][candidates[0]].tolist())
    assert words == ["dog", "red", "mat"]
    released = PSL({"weight": 1.0, "votes_per_head": 4, "keywords": 5, "distill": 0.4,
                    "exclude_special_and_stop_words": False}, model_config)
    assert released.candidates({"input_ids": ids, "attention_mask": torch.ones_like(ids)}) is None


# --- momentum ---------------------------------------------------------------------------------------------------


def test_momentum_update_is_the_ema_by_hand():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    momentum = Momentum(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]]))
    momentum.update(model)
    torch.testing.assert_close(momentum.model.weight, torch.tensor([[1.2, 1.8]]))  # 0.9 * old + 0.1 * new
    assert not momentum.model.weight.requires_grad


def test_pretrain_step_runs_every_simla_objective_and_updates_the_momentum_model():
    model = tiny_simla()
    options = simla_options()
    options["itc"]["queue_size"] = 8
    step = PretrainStep(model, OBJECTIVES, options, torch.Generator().manual_seed(0), momentum=0.5, ramp_steps=4)
    assert step.momentum is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in step.momentum.model.named_parameters()}
    loss, logs = step(simla_batch(), step=0)
    loss.backward()
    optimizer.step()
    assert {f"loss_{name}" for name in OBJECTIVES} <= set(logs) and torch.isfinite(loss)
    step.after_step()
    for name, parameter in model.named_parameters():
        expected = 0.5 * before[name] + 0.5 * parameter.detach()
        torch.testing.assert_close(step.momentum.model.get_parameter(name), expected, msg=name)
    assert any(not torch.equal(before[n], p) for n, p in step.momentum.model.named_parameters())
    # The step's state holds the momentum model and the queue: the trainer checkpoints it.
    state = step.state_dict()
    assert "objectives.itc.text_queue" in state and "objectives.itc.ptr" in state
    assert any(key.startswith("momentum.model.") for key in state)


def test_save_pretrained_round_trip_and_gradient_checkpointing(tmp_path):
    model = tiny_simla()
    model.save_pretrained(tmp_path)
    loaded = SIMLAModel.from_pretrained(tmp_path)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert set(loaded.heads) == {"contrastive", "itm", "lm", "xmm", "psl", "pooler"}

    batch = simla_batch()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = tiny_simla().train()
        if checkpointing:
            net.activation_checkpointing_enable()
        text = net.encode_text(batch["input_ids"], batch["attention_mask"])
        fusion = net.fuse(text.tokens, batch["attention_mask"], net.encode_image(batch))
        (net.match_logits(fusion).sum() + text.cls.sum()).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and "encoder.layer.0.crossattention.self.query.weight" in plain
    for name in plain:  # the same deterministic CPU kernels run again in backward: exact
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0)
