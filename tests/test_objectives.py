"""Tests of mvptr.objectives: BERT-style masking, and MVPTR's five objectives (MCR, VSC, ITM, MLM, WPG) on a tiny
model (hidden 32, one layer per stack) and on small hand-built tensors whose right answer was computed by hand.

Also: every objective module is a plug-in (`OBJECTIVE`, options schema, head) and the names derived from them.

Run: `.venv/bin/pytest tests/test_objectives.py` (a few seconds; one test starts two gloo processes).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from mvptr.models.mvptr import MVPTRConfig, MVPTRModel
from mvptr.objectives import PairEncoding
from mvptr.objectives.itm import itm_loss, negative_pairs
from mvptr.objectives.masking import IGNORE_INDEX, mask_linked_concepts, mask_tokens, maskable
from mvptr.objectives.mcr import mcr_loss
from mvptr.objectives.mlm import mask_caption, mlm_loss
from mvptr.objectives.sampling import allowed_negatives, pick_negatives
from mvptr.objectives.vsc import info_nce, vsc_loss
from mvptr.objectives.wpg import grounding_hinge, grounding_scores, phrase_positions, wpg_loss

torch.set_num_threads(1)

PAD, CLS, SEP, MASK = 0, 101, 102, 103
SPECIAL = (PAD, CLS, SEP, MASK)


def tiny_model() -> MVPTRModel:
    torch.manual_seed(0)
    return MVPTRModel(MVPTRConfig(vocab_size=120, region_feature_dim=8, hidden_size=32, num_text_layers=1,
                                  num_visual_layers=1, num_cross_layers=1, num_attention_heads=2,
                                  intermediate_size=64, dropout=0.0, objectives=["mcr", "vsc", "itm", "mlm", "wpg"]))


def tiny_batch(size: int = 4) -> dict[str, torch.Tensor]:
    """`[CLS] w w w c c [SEP]` (the last caption has no concept), `[CLS] t t [SEP]`, 3 regions (the last image 2)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([[CLS, 10 + i, 30 + i, 50 + i, 110, 111 + i % 3, SEP, PAD] for i in range(size)])
    ids[-1, 4:] = torch.tensor([SEP, PAD, PAD, PAD])
    concept_mask = torch.zeros_like(ids, dtype=torch.bool)
    concept_mask[:-1, 4:6] = True
    links = torch.zeros(size, 8, 8, dtype=torch.bool)
    links[:-1, 4, 1] = links[:-1, 5, 2] = links[:-1, 5, 3] = True
    region_mask = torch.ones(size, 3, dtype=torch.long)
    region_mask[-1, 2] = 0
    return dict(input_ids=ids, attention_mask=(ids != PAD).long(), concept_mask=concept_mask, concept_links=links,
                tag_ids=torch.tensor([[CLS, 20 + i, 60 + i, SEP, PAD] for i in range(size)]),
                tag_mask=torch.tensor([[1, 1, 1, 1, 0]] * size),
                region_feats=torch.randn(size, 3, 8, generator=generator),
                region_boxes=torch.rand(size, 3, 6, generator=generator), region_mask=region_mask,
                image_ids=torch.arange(size), caption_ids=torch.arange(size))


def assert_gradients(model: MVPTRModel, used: Iterable[str], unused: Iterable[str] = ()) -> None:
    """Every parameter under a `used` prefix got a non-zero gradient; none under an `unused` prefix got one."""
    used, unused = tuple(used), tuple(unused)
    for name, parameter in model.named_parameters():
        if name.startswith(used):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient reached {name}"
        if name.startswith(unused):
            assert parameter.grad is None or parameter.grad.abs().sum() == 0, f"{name} should not be used"


UNIMODAL = ("embeddings.", "text_encoder.", "visual_encoder.", "region_embeddings.")

# --- masking -------------------------------------------------------------------------------------------------


def test_masking_never_touches_special_tokens():
    ids = torch.tensor([[CLS, 10, 11, MASK, 12, SEP, PAD, PAD]] * 50)
    candidates = maskable(ids, ids != PAD, SPECIAL)
    masked, labels = mask_tokens(ids, candidates, MASK, 120, torch.Generator().manual_seed(0), prob=1.0)
    special = torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(masked[special], ids[special])
    assert torch.all(labels[special] == IGNORE_INDEX)
    assert torch.all(labels[~special] == ids[~special])  # prob 1: every other token is picked


def test_masking_rates_and_determinism():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (64, 512), generator=generator)
    candidates = torch.ones_like(ids, dtype=torch.bool)
    masked, labels = mask_tokens(ids, candidates, MASK, 30522, torch.Generator().manual_seed(1))
    picked = labels != IGNORE_INDEX
    assert picked.float().mean().item() == pytest.approx(0.15, abs=0.01)
    replaced = masked[picked]
    assert (replaced == MASK).float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert (replaced == ids[picked]).float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert torch.equal(masked[~picked], ids[~picked])
    again, _ = mask_tokens(ids, candidates, MASK, 30522, torch.Generator().manual_seed(1))
    assert torch.equal(again, masked)


def test_linked_concepts_are_masked_with_their_word():
    ids = torch.tensor([[CLS, 30, 31, 30, 115, 116, SEP]])
    links = torch.zeros(1, 7, 7, dtype=torch.bool)
    links[0, 3, 1] = links[0, 4, 1] = links[0, 4, 2] = links[0, 5, 2] = True
    masked_words = torch.tensor([[False, True, False, False, False, False, False]])
    out = mask_linked_concepts(ids, masked_words, links, MASK)
    assert out.tolist() == [[CLS, 30, 31, MASK, MASK, 116, SEP]]


# --- MCR -------------------------------------------------------------------------------------------------------


def test_mcr_recovers_tags_from_the_visual_encoder_only(monkeypatch: pytest.MonkeyPatch):
    model, batch = tiny_model(), tiny_batch()
    seen = []
    encode_image = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda images: seen.append(images["tag_ids"]) or encode_image(images))
    loss, logs = mcr_loss(model, batch, mask_prob=1.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dim() == 0 and "mcr_text" not in logs
    special = torch.isin(batch["tag_ids"], torch.tensor(SPECIAL))
    assert torch.equal(seen[0][special], batch["tag_ids"][special]) and (seen[0][~special] == MASK).any()
    assert_gradients(model, ("embeddings.", "visual_encoder.", "region_embeddings.", "heads.lm."),
                     unused=("text_encoder.", "cross_encoder.", "heads.pooler.", "heads.itm."))


def test_mcr_text_option_also_recovers_concepts_from_the_text_encoder():
    model, batch = tiny_model(), tiny_batch()
    loss, logs = mcr_loss(model, batch, text=True, mask_prob=1.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() == pytest.approx((logs["mcr_visual"] + logs["mcr_text"]).item())
    assert_gradients(model, ("text_encoder.", "visual_encoder.", "heads.lm."), unused=("cross_encoder.",))


# --- VSC -------------------------------------------------------------------------------------------------------


def test_vsc_loss_equals_the_hand_value():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits / 0.5 = [[2, 1.2], [0, 1.6]]: rows (text->image) and columns (image->text) each a 2-way softmax.
    rows = math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))
    columns = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))
    expected = (rows / 2 + columns / 2) / 2
    assert info_nce(text, image, 0.5, gather=False).item() == pytest.approx(expected, abs=1e-6)


def test_vsc_gradients_and_temperature_clamp():
    model, batch = tiny_model(), tiny_batch()
    with torch.no_grad():
        model.heads["contrastive"].temperature.fill_(5.0)
    loss, logs = vsc_loss(model, batch)
    loss.backward()
    assert logs["temperature"].item() == pytest.approx(0.5)
    assert_gradients(model, UNIMODAL + ("heads.contrastive.",),
                     unused=("cross_encoder.", "heads.pooler.", "heads.itm.", "heads.lm."))


_GATHER_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from mvptr.objectives.vsc import info_nce
    from mvptr.train.distributed import teardown_distributed
    rank, folder = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    data = torch.load(f"{folder}/data.pt")
    text = data["text"][2 * rank: 2 * rank + 2].clone().requires_grad_()
    image = data["image"][2 * rank: 2 * rank + 2].clone().requires_grad_()
    loss = info_nce(text, image, 0.1, gather=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "text": text.grad, "image": image.grad}, f"{folder}/rank{rank}.pt")
    teardown_distributed()
""")


def test_vsc_gathers_negatives_from_every_rank(tmp_path: Path):
    """Two gloo ranks with two pairs each: their mean loss is the loss over the global batch of four, and each
    rank's gradient reaches its rows through the gather (all_gather sums the ranks' gradients: 2x the mean)."""
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    torch.save({"text": text, "image": image}, tmp_path / "data.pt")
    script = tmp_path / "worker.py"
    script.write_text(_GATHER_WORKER)
    workers = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path)]) for rank in range(2)]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    full_text, full_image = text.clone().requires_grad_(), image.clone().requires_grad_()
    full = info_nce(full_text, full_image, 0.1, gather=False)
    full.backward()
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(torch.cat([r["text"] for r in ranks]), 2 * full_text.grad)
    torch.testing.assert_close(torch.cat([r["image"] for r in ranks]), 2 * full_image.grad)


# --- ITM -------------------------------------------------------------------------------------------------------

SCORES = torch.tensor([[0.9, 0.2, 0.5],
                       [0.1, 0.8, 0.7],
                       [0.3, 0.6, 0.95]])


def id_batch(image_ids: list[int], caption_ids: list[int], rows: list[list[int]] | None = None) -> dict:
    ids = torch.tensor(rows or [[CLS, 10 + i, SEP] for i in range(len(image_ids))])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_ids=torch.tensor(image_ids),
                caption_ids=torch.tensor(caption_ids))


def test_the_hardest_negative_is_chosen():
    allowed = allowed_negatives(id_batch([0, 1, 2], [0, 1, 2]))
    image_for_text, valid = pick_negatives(SCORES, allowed)
    text_for_image, _ = pick_negatives(SCORES.T, allowed.T)
    assert image_for_text.tolist() == [2, 2, 1] and text_for_image.tolist() == [2, 2, 1] and valid.all()


@pytest.mark.parametrize("batch", [
    id_batch([7, 7, 8], [0, 1, 2]),                                  # texts 0 and 1 show the same image
    id_batch([0, 1, 2], [5, 5, 6]),                                  # the same caption id
    id_batch([0, 1, 2], [0, 1, 2], [[CLS, 10, SEP], [CLS, 10, SEP], [CLS, 12, SEP]]),  # identical tokens
], ids=["image", "caption", "tokens"])
def test_duplicates_are_never_negatives(batch: dict):
    # Text 0's most similar other image is image 1 (0.9), a duplicate of its own pair.
    scores = torch.tensor([[0.5, 0.9, 0.2], [0.9, 0.5, 0.3], [0.1, 0.4, 0.5]])
    choice, _ = pick_negatives(scores, allowed_negatives(batch))
    assert choice[:2].tolist() == [2, 2]
    quirk, _ = pick_negatives(scores, allowed_negatives(batch, allow_duplicates=True))
    assert quirk[:2].tolist() == [1, 0]  # the released code takes the duplicate


@pytest.mark.parametrize("sampling", ["softmax", "random"])
def test_sampling_never_picks_a_masked_pair(sampling: str):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 6, generator=generator) * 3
    allowed = torch.rand(6, 6, generator=generator) < 0.5
    allowed[0] = False  # a row with no candidate is reported invalid
    allowed[1] = torch.tensor([False, False, True, True, False, True])
    picks = []
    for _ in range(300):
        choice, valid = pick_negatives(scores, allowed, sampling, generator)
        assert valid.tolist() == allowed.any(dim=1).tolist()
        assert allowed[valid.nonzero().squeeze(1), choice[valid]].all()
        picks.append(choice[1].item())
    assert set(picks) == {2, 3, 5}  # a draw, not the argmax


def test_half_the_negatives_replace_the_image_half_the_text():
    allowed = allowed_negatives(id_batch([0, 1, 2, 3], [0, 1, 2, 3]))
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.3, 0.9, 0.7, 0.1], [0.2, 0.1, 0.9, 0.6], [0.5, 0.4, 0.3, 0.9]])
    texts, images = negative_pairs(scores, allowed, generator=torch.Generator().manual_seed(0))
    hard_image = {(0, 1), (1, 2), (2, 3), (3, 0)}   # (text, its hardest image)
    hard_text = {(3, 0), (0, 1), (1, 2), (2, 3)}    # (hardest text, image): columns' argmax
    pairs = list(zip(texts.tolist(), images.tolist()))
    assert len(pairs) == 4 and all(allowed[t, i] for t, i in pairs) and set(pairs) <= hard_image | hard_text
    # Every sample anchors exactly one negative: as the text of the first half or the image of the second.
    anchors = sorted(texts[:2].tolist() + images[2:].tolist())
    assert anchors == [0, 1, 2, 3]


def test_itm_loss_gradients_and_no_negative_without_a_true_negative():
    model, batch = tiny_model(), tiny_batch()
    loss, logs = itm_loss(model, batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert logs["itm_negatives"].item() == 4
    assert_gradients(model, UNIMODAL + ("cross_encoder.", "heads.pooler.", "heads.itm."),
                     unused=("heads.contrastive.", "heads.lm."))
    same_image = {**batch, "image_ids": torch.zeros(4, dtype=torch.long)}
    assert itm_loss(model, same_image)[1]["itm_negatives"].item() == 0
    assert itm_loss(model, same_image, allow_duplicates=True)[1]["itm_negatives"].item() == 4


# --- MLM -------------------------------------------------------------------------------------------------------


def test_mlm_gradients():
    model, batch = tiny_model(), tiny_batch()
    encoded = PairEncoding(model, batch)
    loss, _ = mlm_loss(model, batch, encoded, mask_prob=0.5, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert_gradients(model, UNIMODAL + ("cross_encoder.", "heads.lm."), unused=("heads.pooler.", "heads.itm."))


def test_mlm_masks_words_only_and_their_concepts():
    batch = tiny_batch()
    config = tiny_model().config
    masked, labels = mask_caption(batch, config, mask_prob=1.0, generator=torch.Generator().manual_seed(0))
    words = maskable(batch["input_ids"], batch["attention_mask"], SPECIAL) & ~batch["concept_mask"]
    assert torch.equal(labels != IGNORE_INDEX, words)  # concepts and special tokens are not predicted
    assert torch.all(masked[batch["concept_mask"]] == MASK)  # every concept is linked to a masked word


def test_nothing_of_a_masked_word_leaks_through_its_concepts(monkeypatch: pytest.MonkeyPatch):
    """Two captions that differ only in word 1 ("dog" vs "cat") and in the concepts parsed from it: once
    word 1 is masked, the text encoder must receive identical ids."""
    model = tiny_model()
    links = torch.zeros(1, 6, 6, dtype=torch.bool)
    links[0, 3, 1] = links[0, 4, 1] = links[0, 4, 2] = True
    images = {key: value[:1] for key, value in tiny_batch().items() if key.startswith(("tag", "region"))}

    def caption(word: int, phrase: int) -> dict:
        ids = torch.tensor([[CLS, word, 31, word, phrase, SEP]])  # concept 3 reuses the word's id
        return dict(images, input_ids=ids, attention_mask=torch.ones_like(ids), concept_links=links,
                    concept_mask=torch.tensor([[False, False, False, True, True, False]]))

    seen = []
    encode_text = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda ids, mask: seen.append(ids) or encode_text(ids, mask))
    for word, phrase in ((30, 115), (40, 116)):
        mlm_loss(model, caption(word, phrase), mask_prob=1.0, generator=torch.Generator().manual_seed(1))
    assert seen[0][0, 1] == MASK  # the precondition: this seed replaces word 1 by [MASK]
    assert torch.equal(seen[0], seen[1])


# --- WPG -------------------------------------------------------------------------------------------------------


def test_wpg_hinge_equals_the_hand_value():
    # Sample 0: phrases (1,0), (0,1); regions (1,0), (0.6,0.8). Sample 1: phrase (0.6,0.8) (+ a padded phrase);
    # regions (0,1), (-1,0) (+ a padded region (1,0) that would otherwise be the best match of phrase (1,0)).
    phrases = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [1.0, 0.0]]])
    phrase_mask = torch.tensor([[True, True], [True, False]])
    regions = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]]])
    region_mask = torch.tensor([[True, True, False], [True, True, False]])
    # top-1: s(P0,R0) = (1 + 0.8)/2 = 0.9, s(P0,R1) = (0 + 1)/2 = 0.5, s(P1,R1) = 0.8, s(P1,R0) = 1.0
    hinge = grounding_hinge(phrases, phrase_mask, regions, region_mask, torch.tensor([1, 0]), margin=0.5, topk=1)
    assert hinge.tolist() == pytest.approx([0.5 + 0.5 - 0.9, 0.5 + 1.0 - 0.8])
    assert grounding_hinge(phrases, phrase_mask, regions, region_mask, torch.tensor([1, 0]), margin=0.2,
                           topk=1).tolist() == pytest.approx([0.0, 0.4])


def test_wpg_picks_at_random_among_the_top_k_existing_regions():
    phrase = torch.tensor([[[1.0, 0.0]]])
    regions = torch.tensor([[[0.9, 0.436], [0.5, 0.866], [0.1, 0.995]]])
    generator = torch.Generator().manual_seed(0)
    full = torch.ones(1, 3, dtype=torch.bool)
    picks = {round(grounding_scores(phrase, torch.ones(1, 1, dtype=torch.bool), regions, full, 2, generator).item(), 3)
             for _ in range(100)}
    assert picks == {0.9, 0.5}
    one_region = torch.tensor([[False, True, False]])
    picks = {round(grounding_scores(phrase, torch.ones(1, 1, dtype=torch.bool), regions, one_region, 3,
                                    generator).item(), 3) for _ in range(20)}
    assert picks == {0.5}


def test_wpg_phrases_are_concepts_or_words_without_concepts():
    batch, config = tiny_batch(), tiny_model().config
    phrases = phrase_positions(batch, config)
    assert phrases[0].nonzero().squeeze(1).tolist() == [4, 5]
    assert phrases[-1].nonzero().squeeze(1).tolist() == [1, 2, 3]


def test_wpg_gradients_and_partners_are_true_negatives():
    model, batch = tiny_model(), tiny_batch()
    encoded = PairEncoding(model, batch)
    loss, _ = wpg_loss(model, batch, encoded, margin=10.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 9.0
    assert_gradients(model, UNIMODAL + ("cross_encoder.",), unused=("heads.pooler.", "heads.itm.", "heads.lm."))
    same_image = {**batch, "image_ids": torch.zeros(4, dtype=torch.long)}
    assert wpg_loss(model, same_image, margin=10.0)[0].item() == 0.0  # no allowed partner, no hinge


# --- objectives as plug-ins ------------------------------------------------------------------------------------


def test_every_objective_module_is_a_plug_in():
    import jsonschema

    from mvptr.objectives import Objective, available_objectives, load_objective, options_schema

    names = available_objectives()
    assert {"mcr", "vsc", "itm", "mlm", "wpg", "itc", "xmm", "psl"} <= set(names)
    for name in names:
        cls = load_objective(name)
        assert issubclass(cls, Objective) and cls.name == name and cls.stage in (1, 2)
        jsonschema.Draft202012Validator.check_schema(options_schema(name))
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        load_objective("nope")


@pytest.mark.parametrize("method", ["mvptr", "simla"])
def test_a_methods_objectives_and_options_come_from_its_config(method: str):
    from mvptr.config import load_config
    from mvptr.models import model_class

    cfg = load_config([f"method.name={method}"])
    names = list(cfg["pretrain"]["objectives"])
    expected = {"mvptr": ["mcr", "vsc", "itm", "mlm", "wpg"], "simla": ["itc", "itm", "mlm", "xmm", "psl"]}
    assert names == expected[method]
    assert model_class(method).__name__ == {"mvptr": "MVPTRModel", "simla": "SIMLAModel"}[method]


def test_an_objective_option_is_validated_by_its_modules_schema():
    from mvptr.config import load_config
    from mvptr.errors import ConfigError

    with pytest.raises(ConfigError, match=r"pretrain\.objectives\.psl\.votes_per_head': 0 is not allowed"):
        load_config(["method.name=simla", "pretrain.objectives.psl.votes_per_head=0"])
    with pytest.raises(ConfigError, match=r"unknown config key pretrain\.objectives\.itm\.colour"):
        load_config(["pretrain.objectives.itm.colour=red"])
    # Adding SIMLA's XMM to MVPTR asks for all of its options, named.
    with pytest.raises(ConfigError, match=r"config key 'pretrain\.objectives\.xmm\.mask_prob' is missing"):
        load_config(["pretrain.objectives.xmm.weight=1"])


def test_the_method_table_the_schema_and_the_method_files_agree():
    from mvptr.config import project_root, read_yaml, schema_path
    from mvptr.models import METHODS

    schema = read_yaml(schema_path())
    files = sorted(p.stem for p in (project_root() / "configs" / "methods").glob("*.yaml"))
    assert sorted(METHODS) == sorted(schema["$defs"]["method_name"]["enum"]) == files
