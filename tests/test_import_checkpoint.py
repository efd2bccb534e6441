"""Tests of `mvptr import-checkpoint` (mvptr.models.import_checkpoint, mvptr.models.commands).

The released checkpoints are not downloaded: each test builds a state dict with the released key names (of
Junction4Nako/mvp_pytorch oscar/modeling/modeling_vlbert.py `BiBertImgForPreTraining`, and codezakh/SIMLA
models/simla/pretrain.py `SIMLA` with models/med.py and models/vit.py) at tiny widths - and once at BERT-base
shapes - every tensor filled with its own random values, each key declared beside the parameter of ours it
must land in (or none). The import must put every value where the declaration says, converted as the released
code uses it, and report exactly the keys it did not use and the parameters it did not fill. The CLI test
writes the artifact and loads it with the evaluation's own loader (`mvptr.evaluate.finetune.Resources`).

Run: `.venv/bin/python -m pytest -q tests/test_import_checkpoint.py` (the CLI tests build the tiny world once,
about a minute on 2 cores; the rest take seconds).
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import run_mvptr
from safetensors.torch import load_file, safe_open, save_file, save_model

from mvptr.checkpoint_files import read_checkpoint
from mvptr.config import config_hash, load_config
from mvptr.errors import ConfigError, DataError
from mvptr.models import build_model
from mvptr.models.import_checkpoint import (
    SHAPE_MISMATCH,
    UNRECOGNISED,
    concept_rows,
    import_checkpoint,
)

torch.set_num_threads(1)

WORD_PIECES = 30522  # bert-base-uncased, the vocabulary of both releases and of the packaged minilm tokenizer
CONCEPT_ROWS = 7  # this project's concept rows after the word pieces, in these tests
TINY = {"hidden": 32, "intermediate": 64, "layers": 2}
TINY_CONFIG = ["model.name=tiny", "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
               "model.num_text_layers=2", "model.num_visual_layers=2", "model.num_cross_layers=2"]
FEATURE_DIM = 10


class Release:
    """A released state dict being built: each key with its random tensor and the parameter of ours it maps to
    (None: intentionally unmapped), and how the released code uses it (the conversion to expect)."""

    def __init__(self, seed: int = 0) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.target: dict[str, str | None] = {}
        self.how: dict[str, str] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, key: str, shape: tuple[int, ...], ours: str | None, how: str = "copy") -> None:
        assert key not in self.state, key
        self.state[key] = torch.randn(shape, generator=self.generator)
        self.target[key], self.how[key] = ours, how

    def linear(self, prefix: str, out: int, inp: int, ours: str | None, bias: bool = True) -> None:
        self.add(f"{prefix}.weight", (out, inp), ours and f"{ours}.weight")
        if bias:
            self.add(f"{prefix}.bias", (out,), ours and f"{ours}.bias")

    def layer_norm(self, prefix: str, width: int, ours: str | None) -> None:
        self.add(f"{prefix}.weight", (width,), ours and f"{ours}.weight")
        self.add(f"{prefix}.bias", (width,), ours and f"{ours}.bias")

    def attention(self, prefix: str, hidden: int, ours: str | None) -> None:
        for name in ("query", "key", "value"):
            self.linear(f"{prefix}.self.{name}", hidden, hidden, ours and f"{ours}.self.{name}")
        self.linear(f"{prefix}.output.dense", hidden, hidden, ours and f"{ours}.output.dense")
        self.layer_norm(f"{prefix}.output.LayerNorm", hidden, ours and f"{ours}.output.LayerNorm")

    def bert_layer(self, prefix: str, hidden: int, intermediate: int, ours: str | None, cross: bool = False) -> None:
        """A BERT layer (pytorch_transformers' and SIMLA's models/med.py name it alike)."""
        self.attention(f"{prefix}.attention", hidden, ours and f"{ours}.attention")
        if cross:
            self.attention(f"{prefix}.crossattention", hidden, ours and f"{ours}.crossattention")
        self.linear(f"{prefix}.intermediate.dense", intermediate, hidden, ours and f"{ours}.intermediate.dense")
        self.linear(f"{prefix}.output.dense", hidden, intermediate, ours and f"{ours}.output.dense")
        self.layer_norm(f"{prefix}.output.LayerNorm", hidden, ours and f"{ours}.output.LayerNorm")

    def lm_head(self, prefix: str, hidden: int, words: int, ours: str | None, decoder_bias: bool = False) -> None:
        self.linear(f"{prefix}.transform.dense", hidden, hidden, ours and f"{ours}.transform.dense")
        self.layer_norm(f"{prefix}.transform.LayerNorm", hidden, ours and f"{ours}.transform.LayerNorm")
        self.add(f"{prefix}.bias", (words,), ours and f"{ours}.bias", "rows")
        self.add(f"{prefix}.decoder.weight", (words, hidden), None)  # tied to the word embeddings
        if decoder_bias:
            self.add(f"{prefix}.decoder.bias", (words,), None)  # tied to {prefix}.bias

    def unmapped(self) -> set[str]:
        return {key for key, target in self.target.items() if target is None}


def mvptr_release(hidden: int, intermediate: int, layers: int, phrases: int = 5, feature_dim: int = FEATURE_DIM,
                  answers: int = 7, img_layernorm: bool = True) -> Release:
    """`BiBertImgForPreTraining`'s state dict (oscar/modeling/modeling_vlbert.py): `bert` = BiBertImgModel with
    three CaptionBertEncoders of num_hidden_layers // 2 layers, img_embedding over 2048 + 6 (here feature_dim + 6),
    txt_proj/vis_proj matrices, heads cls (MLM over only_word_size + seq_relationship), half_mlm, qa_head,
    logit_scale."""
    r = Release()
    r.add("bert.embeddings.word_embeddings.weight", (WORD_PIECES + phrases, hidden),
          "embeddings.word_embeddings.weight", "rows")
    r.add("bert.embeddings.position_embeddings.weight", (512, hidden), "embeddings.position_embeddings.weight")
    r.add("bert.embeddings.token_type_embeddings.weight", (2, hidden), "embeddings.token_type_embeddings.weight")
    r.layer_norm("bert.embeddings.LayerNorm", hidden, "embeddings.LayerNorm")
    for theirs, ours in (("txt_encoder", "text_encoder"), ("vis_encoder", "visual_encoder"),
                         ("mul_encoder", "cross_encoder")):
        for i in range(layers):
            r.bert_layer(f"bert.{theirs}.layer.{i}", hidden, intermediate, f"{ours}.layer.{i}")
    r.linear("bert.pooler.dense", hidden, hidden, "heads.pooler.dense")
    r.add("bert.txt_proj", (hidden, hidden), "heads.contrastive.text_proj.weight", "transpose")
    r.add("bert.vis_proj", (hidden, hidden), "heads.contrastive.image_proj.weight", "transpose")
    r.linear("bert.img_embedding", hidden, feature_dim + 6, "region_embeddings.0")
    if img_layernorm:
        r.layer_norm("bert.LayerNorm", hidden, "region_embeddings.1")
    r.lm_head("cls.predictions", hidden, WORD_PIECES, "heads.lm")
    r.add("cls.seq_relationship.weight", (2, hidden), "heads.itm.weight", "swap")
    r.add("cls.seq_relationship.bias", (2,), "heads.itm.bias", "swap")
    r.lm_head("half_mlm", hidden, WORD_PIECES, None)
    r.linear("qa_head", answers, hidden, None)
    r.add("logit_scale", (), "heads.contrastive.temperature", "temperature")
    return r


def vit(r: Release, prefix: str, width: int, depth: int, patches: int = 4) -> None:
    """models/vit.py's VisionTransformer (with its MIM mask token): no counterpart here."""
    r.add(f"{prefix}.cls_token", (1, 1, width), None)
    r.add(f"{prefix}.pos_embed", (1, patches + 1, width), None)
    r.add(f"{prefix}.mask_token", (1, 1, width), None)
    r.add(f"{prefix}.patch_embed.proj.weight", (width, 3, 16, 16), None)
    r.add(f"{prefix}.patch_embed.proj.bias", (width,), None)
    for i in range(depth):
        block = f"{prefix}.blocks.{i}"
        r.layer_norm(f"{block}.norm1", width, None)
        r.linear(f"{block}.attn.qkv", 3 * width, width, None)
        r.linear(f"{block}.attn.proj", width, width, None)
        r.layer_norm(f"{block}.norm2", width, None)
        r.linear(f"{block}.mlp.fc1", 4 * width, width, None)
        r.linear(f"{block}.mlp.fc2", width, 4 * width, None)
    r.layer_norm(f"{prefix}.norm", width, None)


def simla_text_encoder(r: Release, prefix: str, hidden: int, intermediate: int, layers: int, mapped: bool) -> None:
    """models/med.py's BertForMaskedLM: `bert` (word + position embeddings, a position_ids buffer, no token
    types, no pooler; every layer with cross-attention) and `cls.predictions` (decoder.bias linked to bias)."""
    ours = (lambda name: name) if mapped else (lambda name: None)
    r.add(f"{prefix}.bert.embeddings.word_embeddings.weight", (WORD_PIECES, hidden),
          ours("embeddings.word_embeddings.weight"), "rows")
    r.add(f"{prefix}.bert.embeddings.position_embeddings.weight", (512, hidden),
          ours("embeddings.position_embeddings.weight"))
    r.layer_norm(f"{prefix}.bert.embeddings.LayerNorm", hidden, ours("embeddings.LayerNorm"))
    r.add(f"{prefix}.bert.embeddings.position_ids", (1, 512), None)
    for i in range(layers):
        r.bert_layer(f"{prefix}.bert.encoder.layer.{i}", hidden, intermediate, ours(f"encoder.layer.{i}"), cross=True)
    r.lm_head(f"{prefix}.cls.predictions", hidden, WORD_PIECES, ours("heads.lm"), decoder_bias=True)


def simla_release(hidden: int, intermediate: int, layers: int, embed_dim: int = 16, queue: int = 8) -> Release:
    """`SIMLA`'s state dict (models/simla/pretrain.py), momentum copies and queues included."""
    r = Release()
    vit(r, "visual_encoder", hidden, 1)
    simla_text_encoder(r, "text_encoder", hidden, intermediate, layers, mapped=True)
    r.linear("vision_proj", embed_dim, hidden, "heads.contrastive.image_proj")
    r.linear("text_proj", embed_dim, hidden, "heads.contrastive.text_proj")
    r.add("temp", (), "heads.contrastive.temperature")
    r.linear("itm_head", 2, hidden, "heads.itm")
    r.linear("mim_head", 8192, hidden, None)
    r.add("concept_head.weight", (WORD_PIECES, embed_dim), "heads.psl.weight", "rows")
    r.add("concept_head.bias", (WORD_PIECES,), "heads.psl.bias", "rows")
    vit(r, "visual_encoder_m", hidden, 1)
    r.linear("vision_proj_m", embed_dim, hidden, None)
    simla_text_encoder(r, "text_encoder_m", hidden, intermediate, layers, mapped=False)
    r.linear("text_proj_m", embed_dim, hidden, None)
    r.linear("mim_head_m", 8192, hidden, None)
    r.linear("concept_head_m", WORD_PIECES, embed_dim, None)
    r.add("image_queue", (embed_dim, queue), None)
    r.add("text_queue", (embed_dim, queue), None)
    r.add("queue_ptr", (1,), None)
    return r


def config(method: str, *extra: str) -> dict:
    return load_config([f"method.name={method}", *TINY_CONFIG, *extra])


def expected_value(source: torch.Tensor, how: str, rows: int) -> torch.Tensor:
    """What the released code computes with `source`, in this project's convention (see the module docstring
    of mvptr.models.import_checkpoint): written out here, not taken from the rule table."""
    if how == "rows":
        return source[:rows]
    if how == "transpose":  # released: x @ P; ours nn.Linear: x @ W.T
        return source.T
    if how == "swap":  # released: class 0 = match; ours class 1
        return source[[1, 0]]
    if how == "temperature":  # released logits = sim * exp(logit_scale); ours sim / temperature
        return torch.exp(-source)
    return source


def assert_landed(model: torch.nn.Module, release: Release) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, target in release.target.items():
        if target is None:
            continue
        value = params[target]
        expected = expected_value(release.state[key], release.how[key], min(value.shape[0] if value.dim() else 0,
                                                                             WORD_PIECES))
        actual = value[: expected.shape[0]] if release.how[key] == "rows" else value
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=f"{key} -> {target}")


# --- MVPTR ---------------------------------------------------------------------------------------------------


def test_every_released_mvptr_tensor_lands_in_its_parameter():
    release = mvptr_release(**TINY)
    cfg = config("mvptr")
    model, report = import_checkpoint(release.state, cfg, WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    assert_landed(model, release)
    mapped = {key: target for key, target in release.target.items() if target is not None}
    assert report["loaded"] == {target: key for key, target in mapped.items()}
    assert set(report["unused"]) == release.unmapped()
    assert UNRECOGNISED not in report["unused"].values()
    assert report["missing"] == {} and report["shape_mismatch"] == [] and report["filled"] == {}
    assert set(report["partial"]) == {"embeddings.word_embeddings.weight", "heads.lm.bias"}
    # The concept rows after the word pieces keep the fresh initialisation of the same config.
    fresh = build_model(cfg, WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    torch.testing.assert_close(model.embeddings.word_embeddings.weight[WORD_PIECES:],
                               fresh.embeddings.word_embeddings.weight[WORD_PIECES:])
    # The LM head is still tied to the word embeddings.
    assert model.heads["lm"].decoder.weight.data_ptr() == model.embeddings.word_embeddings.weight.data_ptr()


def test_imported_mvptr_computes_what_the_released_code_computes():
    """The conventions, checked through our modules: VSC embeddings and logits, ITM match logit."""
    release = mvptr_release(**TINY)
    model, _ = import_checkpoint(release.state, config("mvptr"), WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    model.eval()
    s = release.state
    x = torch.randn(3, TINY["hidden"])
    head = model.heads["contrastive"]
    # BiBertImgModel.forward: F.normalize(txt_encoder_outputs[:, 0] @ self.txt_proj) (and vis_proj for the image).
    torch.testing.assert_close(head.embed_text(x), F.normalize(x @ s["bert.txt_proj"], dim=-1))
    torch.testing.assert_close(head.embed_image(x), F.normalize(x @ s["bert.vis_proj"], dim=-1))
    # BiBertImgForPreTraining.forward: retrieval logits = sim_mat * logit_scale.exp().
    sim = torch.randn(3, 3)
    torch.testing.assert_close(sim / head.temperature, sim * s["logit_scale"].exp())
    # seq_relationship label 0 = the matched pair; ours: class 1 = the pair matches.
    released = x @ s["cls.seq_relationship.weight"].T + s["cls.seq_relationship.bias"]
    torch.testing.assert_close(model.heads["itm"](x), released[:, [1, 0]])


def test_mvptr_without_the_region_layernorm_reports_it_missing_and_keeps_its_initialisation():
    release = mvptr_release(**TINY, img_layernorm=False)
    cfg = config("mvptr")
    model, report = import_checkpoint(release.state, cfg, WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    assert set(report["missing"]) == {"region_embeddings.1.weight", "region_embeddings.1.bias"}
    assert "use_img_layernorm" in report["missing"]["region_embeddings.1.weight"]
    fresh = build_model(cfg, WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    torch.testing.assert_close(model.region_embeddings[1].weight, fresh.region_embeddings[1].weight)
    # Without the LayerNorm in the model, nothing is missing.
    _, report = import_checkpoint(release.state, config("mvptr", "method.region_layernorm=false"),
                                  WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    assert report["missing"] == {}


def test_a_tensor_of_another_shape_is_reported_and_its_parameter_keeps_its_initialisation():
    release = mvptr_release(**TINY, feature_dim=2048)  # VinVL's 2048 + 6 against this model's 10 + 6
    cfg = config("mvptr")
    model, report = import_checkpoint(release.state, cfg, WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    assert report["shape_mismatch"] == [{"checkpoint": "bert.img_embedding.weight",
                                         "model": "region_embeddings.0.weight", "checkpoint_shape": [32, 2054],
                                         "model_shape": [32, FEATURE_DIM + 6]}]
    assert report["missing"] == {"region_embeddings.0.weight": SHAPE_MISMATCH}
    assert "bert.img_embedding.weight" not in report["loaded"].values()
    fresh = build_model(cfg, WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    torch.testing.assert_close(model.region_embeddings[0].weight, fresh.region_embeddings[0].weight)
    torch.testing.assert_close(model.region_embeddings[0].bias, release.state["bert.img_embedding.bias"])


def test_a_deeper_checkpoint_than_the_model_leaves_its_extra_layers_unused():
    release = mvptr_release(**{**TINY, "layers": 3})
    _, report = import_checkpoint(release.state, config("mvptr"), WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    extra = {key for key in release.state if ".layer.2." in key}
    assert len(extra) == 3 * 16 and set(report["unused"]) == release.unmapped() | extra
    assert report["missing"] == {}


def test_mvptr_concept_rows_are_copied_by_name():
    id2phrase = {"30522": ["boat", "two"], "30523": ["man", "ride", "wave"], "30524": ["surfboard"],
                 "30525": ["dog", "brown"], "30526": ["cat", "on", "mat"]}
    vocab = {"concepts": {"two boat": {"id": 30525, "reuses_word": False},
                          "man ride wave": {"id": 30522, "reuses_word": False},
                          "dog": {"id": 2000, "reuses_word": True},
                          "surfboard": {"id": 30523, "reuses_word": False},
                          "red ball": {"id": 30524, "reuses_word": False}}}
    rows = concept_rows(id2phrase, vocab)
    assert rows == {30525: 30522, 30522: 30523, 30523: 30524}
    release = mvptr_release(**TINY)
    cfg = config("mvptr")
    model, report = import_checkpoint(release.state, cfg, WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM, concepts=rows)
    table, source = model.embeddings.word_embeddings.weight, release.state["bert.embeddings.word_embeddings.weight"]
    for ours, theirs in rows.items():
        torch.testing.assert_close(table[ours], source[theirs])
    fresh = build_model(cfg, WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    torch.testing.assert_close(table[30524], fresh.embeddings.word_embeddings.weight[30524])  # "red ball"
    assert "3 concept rows" in report["partial"]["embeddings.word_embeddings.weight"]


def test_mvptr_key_set_at_bert_base_shapes():
    started = time.monotonic()
    release = mvptr_release(hidden=768, intermediate=3072, layers=6, phrases=50, feature_dim=2048, answers=3129)
    cfg = load_config(["method.name=mvptr", "model.name=bert_base"])
    model, report = import_checkpoint(release.state, cfg, WORD_PIECES + CONCEPT_ROWS, 2048)
    assert_landed(model, release)
    assert len(report["loaded"]) == len(release.state) - len(release.unmapped()) == 309
    assert set(report["unused"]) == release.unmapped()
    assert report["missing"] == {} and report["shape_mismatch"] == []
    assert time.monotonic() - started < 60


# --- SIMLA ---------------------------------------------------------------------------------------------------

SIMLA_MISSING_PREFIXES = ("image_cls", "region_mask_embedding", "image_encoder.", "region_embeddings.", "heads.xmm.",
                          "heads.pooler.")


def test_every_released_simla_tensor_lands_in_its_parameter_and_the_rest_is_reported():
    # The shared stack: model.num_text_layers + num_cross_layers = 4 layers, as SIMLA's 12 at BERT-base.
    release = simla_release(TINY["hidden"], TINY["intermediate"], layers=4)
    cfg = config("simla", "method.projection_dim=16")
    model, report = import_checkpoint(release.state, cfg, WORD_PIECES + CONCEPT_ROWS, FEATURE_DIM)
    assert_landed(model, release)
    assert set(report["unused"]) == release.unmapped()
    assert UNRECOGNISED not in report["unused"].values()
    assert all("momentum" in report["unused"][key] for key in release.state if "_m." in key)
    ours = {name for name, _ in model.named_parameters()}
    assert set(report["missing"]) == {name for name in ours if name.startswith(SIMLA_MISSING_PREFIXES)}
    assert report["shape_mismatch"] == []
    # SIMLA's embeddings have no token types: ours are zeroed, so that they add nothing.
    assert set(report["filled"]) == {"embeddings.token_type_embeddings.weight"}
    assert not model.embeddings.token_type_embeddings.weight.any()
    assert set(report["partial"]) == {"embeddings.word_embeddings.weight", "heads.lm.bias", "heads.psl.weight",
                                      "heads.psl.bias"}
    # ALBEF's ITC: sim / temp, as ours; itm_head label 1 = the pair matches, as ours.
    torch.testing.assert_close(model.heads["contrastive"].temperature, release.state["temp"])


def test_simla_fine_tuned_checkpoints_spell_the_text_encoder_without_bert():
    """models/simla/retrieval.py holds text_encoder as a BertModel: text_encoder.embeddings.*, .encoder.*"""
    release = simla_release(TINY["hidden"], TINY["intermediate"], layers=4)
    state = {key.replace("text_encoder.bert.", "text_encoder."): value for key, value in release.state.items()}
    model, report = import_checkpoint(state, config("simla", "method.projection_dim=16"), WORD_PIECES + CONCEPT_ROWS,
                                      FEATURE_DIM)
    torch.testing.assert_close(model.encoder.layer[3].crossattention.self.value.weight,
                               release.state["text_encoder.bert.encoder.layer.3.crossattention.self.value.weight"])
    assert UNRECOGNISED not in report["unused"].values()


# --- reading files and bad input ----------------------------------------------------------------------------


def test_reader_unwraps_model_and_state_dict_and_strips_module_prefixes(tmp_path):
    tensors = {"bert.pooler.dense.weight": torch.randn(4, 4), "logit_scale": torch.tensor(2.0)}
    torch.save({"model": {f"module.{k}": v for k, v in tensors.items()}, "epoch": 3}, tmp_path / "a.pth")
    torch.save({"state_dict": tensors}, tmp_path / "b.pt")
    (tmp_path / "folder").mkdir()
    torch.save(tensors, tmp_path / "folder" / "pytorch_model.bin")
    save_file(tensors, tmp_path / "c.safetensors")
    for path in ("a.pth", "b.pt", "folder", "c.safetensors"):
        state = read_checkpoint(tmp_path / path)
        assert set(state) == set(tensors), path
        for key, value in tensors.items():
            torch.testing.assert_close(state[key], value)


class ResumableConfig:
    """A class of the writer's (as SIMLA's hydra config): weights_only refuses to build it."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


def test_a_checkpoint_that_also_pickles_other_classes_is_read_without_running_them(tmp_path):
    tensors = {"temp": torch.tensor(0.05), "itm_head.weight": torch.randn(2, 4)}
    torch.save({"model": tensors, "config": ResumableConfig(1e-4), "epoch": 29}, tmp_path / "checkpoint_29.pth")
    with pytest.raises(Exception):  # what a plain weights_only load does with it
        torch.load(tmp_path / "checkpoint_29.pth", weights_only=True)
    state = read_checkpoint(tmp_path / "checkpoint_29.pth")
    assert set(state) == set(tensors)
    torch.testing.assert_close(state["itm_head.weight"], tensors["itm_head.weight"])


def test_simla_style_checkpoint_with_a_hydra_config_is_read(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    config_ = omegaconf.OmegaConf.create({"optimizer": {"opt": "adamW", "lr": 1e-4}, "train_file": ["a.json"]})
    torch.save({"model": {"temp": torch.tensor(0.07)}, "optimizer": {"state": {}, "param_groups": []},
                "config": config_, "epoch": 29}, tmp_path / "checkpoint_29.pth")
    assert set(read_checkpoint(tmp_path / "checkpoint_29.pth")) == {"temp"}


def test_unreadable_files_raise_data_errors_naming_them(tmp_path):
    (tmp_path / "broken.bin").write_bytes(b"not a checkpoint")
    (tmp_path / "weights.npz").write_bytes(b"")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
    for name in ("broken.bin", "weights.npz", "broken.safetensors", "no_tensors.pt", "absent.pth"):
        with pytest.raises(DataError, match=name):
            read_checkpoint(tmp_path / name)


def test_a_checkpoint_without_released_names_and_a_method_without_a_release_are_refused():
    with pytest.raises(DataError, match="my.ckpt: none of its 2 keys"):
        import_checkpoint({"encoder.weight": torch.zeros(2), "decoder.weight": torch.zeros(2)}, config("mvptr"),
                          WORD_PIECES, FEATURE_DIM, source="my.ckpt")
    # A SIMLA checkpoint given as MVPTR's: nothing of it is an MVPTR name.
    with pytest.raises(DataError, match="none of its"):
        import_checkpoint(simla_release(32, 64, 4).state, config("mvptr"), WORD_PIECES, FEATURE_DIM)
    with pytest.raises(ConfigError, match="semvlp"):
        import_checkpoint(mvptr_release(**TINY).state, config("semvlp"), WORD_PIECES, FEATURE_DIM)
    # Every released tensor of another width: nothing fits.
    with pytest.raises(DataError, match="no released weight matrix fits"):
        import_checkpoint(mvptr_release(hidden=16, intermediate=32, layers=2).state, config("mvptr"), WORD_PIECES,
                          FEATURE_DIM)


# --- the command -----------------------------------------------------------------------------------------------


def test_cli_refuses_bad_input_with_exit_status_2(tmp_path):
    torch.save(mvptr_release(**TINY).state, tmp_path / "mvptr.bin")
    common = ["--out", str(tmp_path / "out"), "--vocab-size", str(WORD_PIECES), "--feature-dim", str(FEATURE_DIM)]
    proc = run_mvptr("import-checkpoint", "--method", "semvlp", "--checkpoint", str(tmp_path / "mvptr.bin"), *common)
    assert proc.returncode == 2 and "semvlp" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_mvptr("import-checkpoint", "--method", "mvptr", "--checkpoint", str(tmp_path / "absent.bin"), *common)
    assert proc.returncode == 2 and "absent.bin" in proc.stderr
    proc = run_mvptr("import-checkpoint", "--method", "mvptr", "--checkpoint", str(tmp_path / "mvptr.bin"), *common,
                     "method.name=simla")
    assert proc.returncode == 2 and "method.name" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["mvptr", "simla"])
def test_cli_writes_the_artifact_the_evaluation_loads(method, artifacts, tmp_path):
    from mvptr.data.coco import read_json
    from mvptr.evaluate.finetune import Resources, TaskPaths
    from mvptr.regions.store import RegionStore

    feature_dim = RegionStore(artifacts["regions"] / "train.h5").feature_dim
    release = (mvptr_release(**TINY, feature_dim=feature_dim) if method == "mvptr"
               else simla_release(TINY["hidden"], TINY["intermediate"], layers=4))
    checkpoint = tmp_path / ("pytorch_model.bin" if method == "mvptr" else "checkpoint_29.pth")
    torch.save({"model": release.state, "epoch": 29} if method == "simla" else release.state, checkpoint)
    overrides = [*TINY_CONFIG, *(["method.projection_dim=16"] if method == "simla" else [])]
    out = tmp_path / "pretrain_stage2"
    proc = run_mvptr("import-checkpoint", "--method", method, "--checkpoint", str(checkpoint), "--out", str(out),
                     "--vocab", str(artifacts["vocab"]), "--regions", str(artifacts["regions"]), *overrides, check=True)
    summary = json.loads(proc.stdout.splitlines()[0])
    report = json.loads((out / "import_report.json").read_text())
    assert summary["loaded"] == len(report["loaded"]) == len(release.state) - len(release.unmapped())
    assert summary["unused"] == len(release.unmapped()) and set(report["unused"]) == release.unmapped()
    for kind in ("missing", "unused"):  # a line per reason, with its count
        counted = sum(int(line.split()[1]) for line in proc.stdout.splitlines()[1:] if line.split()[0] == kind)
        assert counted == summary[kind]
    cfg = load_config([f"method.name={method}", *overrides])
    assert report["config_hash"] == config_hash(cfg)
    # The evaluation's loader (what `mvptr evaluate run --weights` uses) takes it, strictly.
    weights = out / "model.safetensors"
    res = Resources(cfg, TaskPaths(artifacts["dataset"], artifacts["concepts"], artifacts["vocab"],
                                   artifacts["regions"], weights), torch.device("cpu"))
    assert res.model.config.vocab_size == read_json(artifacts["vocab"])["embedding_rows"] == report["vocab_size"]
    assert_landed(res.model, release)
    # The same format as a pre-training stage's model.safetensors (save_model: same keys and metadata).
    save_model(res.model, str(tmp_path / "stage.safetensors"))
    assert set(load_file(weights)) == set(load_file(tmp_path / "stage.safetensors"))
    with safe_open(weights, "pt") as a, safe_open(tmp_path / "stage.safetensors", "pt") as b:
        assert a.metadata() == b.metadata()
    assert not list(out.glob("*.tmp*"))
    assert math.isfinite(res.model.heads["contrastive"].temperature.item())
