"""The config: merge order, validation messages that name the key, hashes, Snakemake round trip."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_mvptr

from mvptr.config import (
    compose,
    config_hash,
    dataset_dir,
    load_config,
    overrides_from,
    parse_overrides,
    read_yaml,
    step_keys,
)
from mvptr.errors import ConfigError


def test_default_config_merges_the_model_layer():
    cfg = load_config(root=ROOT)
    assert cfg["dataset"]["name"] == "synthetic"
    # hidden_size is only in configs/models/tiny.yaml: the layer was merged.
    assert cfg["model"]["hidden_size"] == read_yaml(ROOT / "configs/models/tiny.yaml")["model"]["hidden_size"]


def test_an_override_selects_another_layer():
    assert load_config(["model.name=bert_base"], root=ROOT)["model"]["hidden_size"] == 768


@pytest.fixture
def layered_root(tmp_path: Path) -> Path:
    """A copy of the project's configs (the schema ships in the package), to add values to single layers."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    return tmp_path


LAYERS = ["default.yaml", "datasets/synthetic.yaml", "models/tiny.yaml", "methods/mvptr.yaml"]


@pytest.mark.parametrize("top", range(len(LAYERS) + 2))
def test_merge_order_base_dataset_model_method_cli_ablation(layered_root: Path, top: int):
    """Layer i sets seed=i for every layer up to `top` (the files, then the overrides, then the ablation); the
    highest layer that sets it must win."""
    for i, name in enumerate(LAYERS[: top + 1]):
        path = layered_root / "configs" / name
        data = read_yaml(path)
        data["seed"] = 100 + i
        path.write_text(yaml.safe_dump(data))
    overrides = [f"seed={100 + len(LAYERS)}"] if top >= len(LAYERS) else []
    if top == len(LAYERS) + 1:  # the ablation layer
        (layered_root / "configs/ablations.yaml").write_text(
            yaml.safe_dump({"full": {"seed": 100 + len(LAYERS) + 1}}))
    assert load_config(overrides, root=layered_root)["seed"] == 100 + top


def test_an_experiment_budget_leaves_the_no_pretraining_baseline_untrained():
    """The study's config reaches every command as overrides (stage steps among them): no_pretraining's own
    steps (0) must stay, the other ablations take the study's."""
    budget = ["pretrain.stage1.steps=100", "pretrain.stage2.steps=150"]
    baseline = load_config([*budget, "ablation=no_pretraining"], root=ROOT)["pretrain"]
    assert baseline["stage1"]["steps"] == baseline["stage2"]["steps"] == 0
    full = load_config([*budget, "ablation=full"], root=ROOT)["pretrain"]
    assert (full["stage1"]["steps"], full["stage2"]["steps"]) == (100, 150)


def test_unknown_key_is_named_with_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(["model.hidden_sise=64"], root=ROOT)
    assert "model.hidden_sise" in str(err.value)
    assert "hidden_size" in str(err.value)


@pytest.mark.parametrize("override, words", [
    ("model.hidden_size=banana", ["model.hidden_size", "integer"]),
    ("model.hidden_size=8", ["model.hidden_size", ">= 16"]),
    ("dataset.synthetic.size=huge", ["dataset.synthetic.size", "tiny", "small", "default"]),
    ("dataset.name=imagenet", ["dataset.name", "coco_format", "synthetic"]),
    ("ablation=nope", ["ablation", "full"]),
    ("dataset.name=coco_format", ["dataset.coco_format.images_dir", "string"]),
])
def test_bad_value_names_the_key_and_what_is_allowed(override: str, words: list[str]):
    with pytest.raises(ConfigError) as err:
        load_config([override], root=ROOT)
    for word in words:
        assert word in str(err.value)


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["seed"])


def test_hash_follows_content():
    cfg = load_config(root=ROOT)
    assert config_hash(cfg) == config_hash(load_config(root=ROOT))
    assert config_hash(cfg) != config_hash(load_config(["seed=1"], root=ROOT))


def test_dataset_folder_changes_with_the_keys_that_shape_it_only():
    base = dataset_dir(load_config(root=ROOT))
    assert dataset_dir(load_config(["seed=1"], root=ROOT)) != base
    assert dataset_dir(load_config(["dataset.synthetic.size=tiny"], root=ROOT)) != base
    assert dataset_dir(load_config(["model.name=bert_base"], root=ROOT)) == base


def test_snakemake_style_config_round_trips_to_the_same_overrides():
    base = read_yaml(ROOT / "configs/default.yaml")
    # What Snakemake hands the workflow for --config seed=3 'dataset={synthetic: {size: tiny}}':
    # BaseLoader leaves numbers as strings.
    sm_config = {**base, "seed": "3", "dataset": {**base["dataset"], "synthetic": {**base["dataset"]["synthetic"],
                                                                                      "size": "tiny"}}}
    overrides = overrides_from(sm_config, base)
    assert sorted(overrides) == ["dataset.synthetic.size=tiny", "seed=3"]
    assert compose(base, overrides, ROOT) == load_config(["seed=3", "dataset.synthetic.size=tiny"], root=ROOT)


def test_cli_show_prints_config_and_hash():
    proc = run_mvptr("config", "show", "seed=3", check=True)
    text = proc.stdout
    assert yaml.safe_load(text)["seed"] == 3
    assert f"# config hash: {config_hash(load_config(['seed=3'], root=ROOT))}" in text


def test_cli_bad_value_exits_nonzero_naming_the_key():
    proc = run_mvptr("config", "show", "model.hidden_size=banana")
    assert proc.returncode != 0
    assert "model.hidden_size" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- what a key affects: declared once in the schema (x-affects) ----------------------------------------------

METHODS = ["mvptr", "simla"]


@pytest.mark.parametrize("method", METHODS)
def test_every_leaf_of_every_method_is_classified(method: str):
    from mvptr.config import LEAF_CLASSES, classify

    classes = classify(load_config([f"method.name={method}"]))
    assert set(classes.values()) <= set(LEAF_CLASSES)
    assert classes["pretrain.stage2.lr"] == "stage2" and classes["launch.cluster"] == "launch"
    assert classes["evaluate.vqa.steps"] == "evaluate" and classes["model.tokenizer"] == "concepts"


def test_an_unannotated_key_is_an_error(tmp_path: Path):
    from mvptr.config import classify, read_yaml, schema_path

    schema = read_yaml(schema_path(ROOT))
    del schema["properties"]["regions"]["x-affects"]
    with pytest.raises(ConfigError, match=r"config key 'regions\.boxes' is not classified"):
        classify(load_config(), schema)


def test_an_objectives_options_follow_its_stage_and_the_schedule():
    from mvptr.config import leaf_class

    cfg = load_config()
    assert leaf_class(cfg, "pretrain.objectives.mcr.mask_prob") == "stage1"  # MCR is uni-modal
    assert leaf_class(cfg, "pretrain.objectives.wpg.margin") == "stage2"
    joint = load_config(["ablation=joint"])
    assert leaf_class(joint, "pretrain.objectives.mcr.mask_prob") == "stage2"  # one pass: all in stage two


# A value of each stage-one leaf that the schema accepts and that differs from the default.
def _changed(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    return None


@pytest.mark.parametrize("method", METHODS)
def test_changing_any_stage_one_number_gives_a_new_stage_one_folder(method: str):
    """Every numeric or boolean leaf that stage one depends on changes the stage-one hash; stage-two and launch
    leaves do not."""
    from mvptr.config import classify, config_hash, flatten, format_override, step_keys

    base = load_config([f"method.name={method}"])
    digest = config_hash(base, step_keys(base, "stage1"))
    classes = classify(base)
    tried = 0
    for key, value in flatten(base).items():
        new = _changed(value)
        if new is None or key.startswith("dataset.") or key == "seed":
            continue  # the dataset leaves name another world; their hash is tested in test_synthetic_world
        try:
            cfg = load_config([f"method.name={method}", format_override(key, new)])
        except ConfigError:
            continue  # not a valid value for this key (e.g. above its maximum)
        changed = config_hash(cfg, step_keys(cfg, "stage1")) != digest
        if classes[key] in ("concepts", "regions", "stage1"):
            assert changed, f"{key} affects stage one but does not change its hash"
            tried += 1
        elif classes[key] in ("stage2", "evaluate", "launch", "workflow"):
            assert not changed, f"{key} ({classes[key]}) changes the stage-one hash"
    assert tried > 20


# --- a method's own model options (method.*) reach the model it builds ---------------------------------------

def _built(*overrides: str):
    from mvptr.models import build_model
    from mvptr.text import load_tokenizer

    cfg = load_config(["model.hidden_size=32", "model.intermediate_size=64", *overrides], root=ROOT)
    return build_model(cfg, vocab_size=len(load_tokenizer(cfg["model"]["tokenizer"])), region_feature_dim=8)


@pytest.mark.parametrize("method", ["mvptr", "simla", "semvlp"])
def test_a_methods_model_options_reach_the_built_model(method: str):
    import torch

    contrastive = method != "semvlp"  # SemVLP has no contrastive heads: no temperature_init, projection_dim
    options = ["method.region_layernorm=false"] + (["method.temperature_init=0.05", "method.projection_dim=24"]
                                                   if contrastive else [])
    if method == "mvptr":
        options.append("method.tag_token_type=0")
    model = _built(f"method.name={method}", *options)
    assert isinstance(model.region_embeddings[1], torch.nn.Identity)
    assert isinstance(_built(f"method.name={method}").region_embeddings[1], torch.nn.LayerNorm)
    if contrastive:
        head = model.heads["contrastive"]
        assert head.temperature.item() == pytest.approx(0.05) and model.config.embedding_dim == 24
    if method == "mvptr":
        assert model.config.tag_token_type == 0


@pytest.mark.parametrize("override, words", [
    ("method.region_layernorm=maybe", ["method.region_layernorm", "boolean"]),
    ("method.temperature_init=0", ["method.temperature_init", "> 0"]),
    ("method.tag_token_type=2", ["method.tag_token_type", "<= 1"]),
    # A method option under model: is refused, and the message says where it belongs.
    ("model.region_layernorm=false", ["model.region_layernorm", "method.* keys", "configs/methods/<name>.yaml"]),
])
def test_a_bad_model_option_is_refused_naming_the_key(override: str, words: list[str]):
    with pytest.raises(ConfigError) as err:
        load_config([override], root=ROOT)
    for word in words:
        assert word in str(err.value)
    proc = run_mvptr("config", "show", override)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words[0] in proc.stderr


def test_train_seed_moves_training_but_not_the_data():
    """The workflow's `seeds` set train_seed per run: the world, concepts and regions must stay one build."""
    base, other = load_config(root=ROOT), load_config(["train_seed=1"], root=ROOT)
    assert dataset_dir(base) == dataset_dir(other)
    for step in ("data", "concepts", "regions"):
        assert config_hash(base, step_keys(base, step)) == config_hash(other, step_keys(other, step)), step
    for step in ("stage1", "stage2", "evaluate"):
        assert config_hash(base, step_keys(base, step)) != config_hash(other, step_keys(other, step)), step


def test_a_list_of_numbers_from_snakemake_config_is_numbers():
    """Snakemake's --config reads `seeds=[0, 1, 2]` with YAML's BaseLoader: ['0', '1', '2']."""
    base = read_yaml(ROOT / "configs" / "default.yaml")
    sm_config = {**base, "seeds": ["0", "1", "2"], "ablations": ["full", "no_wpg"]}
    overrides = overrides_from(sm_config, base)
    assert sorted(overrides) == ["ablations=[full, no_wpg]", "seeds=[0, 1, 2]"]
    assert compose(base, overrides, ROOT)["seeds"] == [0, 1, 2]
