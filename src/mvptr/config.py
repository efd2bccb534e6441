"""Load, merge, validate and hash the project's configuration.

Why: every step (CLI, Snakemake rules, tests) must see the same config, merged in one fixed order and
validated against one JSON schema (`src/mvptr/schemas/config.schema.yaml`, shipped in the package; the file Snakemake's
`validate` also uses), so that a typo stops the run at start with a message naming the key.

Merge order (later wins):
    configs/default.yaml  <  configs/datasets/<dataset.name>.yaml  <  configs/models/<model.name>.yaml
    <  configs/methods/<method.name>.yaml  <  `key=value` overrides  <  configs/ablations.yaml[<ablation>]

The ablation comes last so that it is what its entry says whatever the experiment sets: the workflow hands a
`--configfile` (configs/study.yaml) to every command as overrides, and a study that sets the stage-two steps
must leave `no_pretraining` at 0 steps (with the overrides last it had trained every baseline for the study's
steps). An override of a key the ablation does not set still wins over every other layer.

The selectors (`dataset.name`, `model.name`, `method.name`, `ablation`) are read after the overrides are
applied to the base, so `dataset.name=coco_format` on the command line picks the coco_format layer. An ablation
that belongs to one method names it (`method: {name: simla}` in its entry): that selects the method layer
too, unless the command line names another method (an error).

What each leaf affects is declared in the schema (`x-affects`, see its header); `step_keys(cfg, step)` lists
the leaves a step's result depends on (its own and those of the steps it reads), the keys that decide what
reruns and what a stage-one hash covers.

Use:
    from mvptr.config import load_config
    cfg = load_config(["model.hidden_size=64"])
or `mvptr config show model.hidden_size=64`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mvptr.errors import ConfigError


def project_root() -> Path:
    """The folder holding `configs/`: $MVPTR_ROOT, the working directory (a checkout: configs/ and workflow/),
    the checkout of an editable install (src/mvptr/config.py), or else the copy of configs/ that ships in an
    installed package (mvptr/bundled/configs)."""
    if "MVPTR_ROOT" in os.environ:
        return Path(os.environ["MVPTR_ROOT"]).resolve()
    cwd = Path.cwd()
    if (cwd / "configs").is_dir() and (cwd / "workflow").is_dir():
        return cwd
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "configs" / "default.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parent / "bundled"


SCHEMAS = Path(__file__).resolve().parent / "schemas"  # package data: the library validates without a checkout


def schema_path(root: Path | None = None) -> Path:
    """The config schema. It ships in the package, so `root` (a project folder) does not change it."""
    return SCHEMAS / "config.schema.yaml"


@functools.lru_cache(maxsize=4)
def load_schema(path: Path | None = None) -> Any:
    """The parsed config schema (default the packaged one), read once per process: the workflow classifies and
    validates the config of every run, and parsing the YAML each time made a 300-run dry run take minutes.
    Callers must not modify it (`with_objectives` works on a copy)."""
    return read_yaml(path or schema_path())


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error names the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text: byte {err.start}: {err.reason}") from err
    data = parse_yaml(text, f"malformed YAML in {path}")
    return {} if data is None else data


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> data. Text PyYAML cannot read - a syntax error, a tag its value does not fit (`!!int x`,
    `!!timestamp x`), nesting too deep for Python - is a ConfigError starting with `where`."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError) as err:
        raise ConfigError(f"{where}: {err}") from err


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`: nested mappings merge, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["model.hidden_size=64", "seed=1"]` -> nested dict; values are parsed as YAML (`64` is an int)."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.hidden_size=64)")
        value = parse_yaml(text, f"override {key!r}: value {text!r} is not valid YAML") if text else None
        parts = key.split(".")
        node = nested
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r} conflicts with {'.'.join(parts[: depth + 1])}={child!r}")
            node = child
        node[parts[-1]] = value
    return nested


def format_override(key: str, value: Any) -> str:
    """The inverse of `parse_overrides` for one leaf: `key=<YAML flow text>`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[: -len("...")].strip()
    return f"{key}={text}"


def overrides_from(config: Mapping[str, Any], base: Mapping[str, Any]) -> list[str]:
    """The `key=value` overrides that turn `base` into `config` (e.g. Snakemake's --config/--configfile).

    Snakemake parses `--config` values with YAML's BaseLoader, so numbers arrive as strings (`seeds=[0, 1]` as
    ['0', '1']); each changed string leaf, and each string item of a list whose base holds no strings, is parsed
    again as YAML, the same way `parse_overrides` reads the command line.
    """
    base_flat = flatten(base)
    out = []
    for key, value in flatten(config).items():
        known = base_flat.get(key)
        if isinstance(value, str) and not isinstance(known, str):
            value = yaml.safe_load(value) if value else None
        elif isinstance(value, list) and isinstance(known, list) and known and not any(isinstance(v, str) for v in known):
            value = [yaml.safe_load(v) if isinstance(v, str) and v else v for v in value]
        if key not in base_flat or base_flat[key] != value:
            out.append(format_override(key, value))
    return out


def _layer(folder: Path, what: str, name: Any) -> dict[str, Any]:
    """A layer file. A dataset file may also hold a `source:` entry (what to download, mvptr.data.catalog):
    that is no config and is left out; a file with only a source is no dataset. A name that is not one of
    the folder's files (a number, a path, a name too long for the file system) is a ConfigError."""
    choices = sorted(p.stem for p in folder.glob("*.yaml"))
    if name not in choices:
        raise ConfigError(f"config key {what!r}: no layer named {name!r}; allowed values: {', '.join(choices)}")
    path = folder / f"{name}.yaml"
    layer = read_yaml(path)
    if what == "dataset.name":
        if "dataset" not in layer:
            choices = sorted(p.stem for p in folder.glob("*.yaml") if "dataset" in read_yaml(p))
            raise ConfigError(f"config key 'dataset.name': {path} is a download source only, not a dataset (a "
                              f"corpus names it under dataset.corpus); datasets: {', '.join(choices)}")
        layer = {key: value for key, value in layer.items() if key != "source"}
    return layer


def compose(base: Mapping[str, Any], overrides: Sequence[str] = (), root: Path | None = None) -> dict[str, Any]:
    """Merge the layers selected by `base` + `overrides` in the documented order and validate the result."""
    root = root or project_root()
    configs = root / "configs"
    cli = parse_overrides(overrides)
    selected = merge(base, cli)
    ablations = read_yaml(configs / "ablations.yaml")
    ablation = selected.get("ablation")
    if not isinstance(ablation, str) or ablation not in ablations:
        raise ConfigError(f"config key 'ablation': {ablation!r} is not defined in configs/ablations.yaml; "
                          f"allowed values: {', '.join(sorted(ablations))}")
    entry = ablations[ablation] or {}
    owner = entry.get("method", {}).get("name")
    for section in ("dataset", "model", "method"):
        if not isinstance(selected.get(section, {}), Mapping):
            raise ConfigError(f"config key {section!r}: {selected[section]!r} is not allowed; allowed: a mapping "
                              f"with a 'name' (e.g. {section}.name=...)")
    if owner is not None:
        asked = cli.get("method", {}).get("name", owner)
        if asked != owner:
            raise ConfigError(f"config key 'method.name': {asked!r} does not fit ablation {ablation!r}, which is "
                              f"an ablation of method {owner!r}")
        selected = merge(selected, {"method": {"name": owner}})
    layers = [base]
    for section in ("dataset", "model", "method"):
        name = selected.get(section, {}).get("name")
        layers.append(_layer(configs / f"{section}s", f"{section}.name", name))
    layers += [cli, entry]
    cfg: dict[str, Any] = {}
    for layer in layers:
        cfg = merge(cfg, layer)
    validate(cfg, schema_path(root))
    return cfg


def workflow_runs(cfg: Mapping[str, Any], root: Path | None = None) -> list[tuple[str, str]]:
    """The (method, ablation) pairs the workflow runs: each ablation of `ablations` that names its method (its
    entry in configs/ablations.yaml sets `method.name`) for that method, every other one for each method of
    `methods`, in that order."""
    entries = read_yaml((root or project_root()) / "configs" / "ablations.yaml")
    runs = []
    for ablation in cfg["ablations"]:
        if ablation not in entries:
            raise ConfigError(f"config key 'ablations': {ablation!r} is not defined in configs/ablations.yaml; "
                              f"allowed values: {', '.join(sorted(entries))}")
        owner = (entries[ablation] or {}).get("method", {}).get("name")
        runs += [(owner, ablation)] if owner else [(method, ablation) for method in cfg["methods"]]
    return runs


def load_config(overrides: Sequence[str] = (), base: Path | None = None, root: Path | None = None) -> dict[str, Any]:
    """Read the base file (default `configs/default.yaml`), apply layers and overrides, validate."""
    root = root or project_root()
    path = base or root / "configs" / "default.yaml"
    cfg = read_yaml(path)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"config file {path}: holds a {type(cfg).__name__}; allowed: a mapping of config keys")
    return compose(cfg, overrides, root)


def _allowed(schema: Mapping[str, Any]) -> str:
    """Say in words what a schema node accepts, for error messages."""
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    parts = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        parts.append(" or ".join(types))
    for word, key in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if word in schema:
            parts.append(f"{key} {schema[word]}")
    if "minItems" in schema:
        parts.append(f"{schema['minItems']}+ items")
    if "description" in schema:
        parts.append(f"({schema['description']})")
    return " ".join(parts) or "see the schema"


def _message(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known), key=str)  # YAML keys may be numbers, null, ...
        where = f"under {path!r}" if path else "at the top level"
        keys = ", ".join(f"{path}.{k}" if path else str(k) for k in extra)
        hint = error.schema.get("x-unknown-key-hint")
        return f"unknown config key {keys}; allowed keys {where}: {', '.join(known)}" + (f"; {hint}" if hint else "")
    if error.validator == "required":
        missing = error.message.split("'")[1]
        full = f"{path}.{missing}" if path else missing
        return f"config key {full!r} is missing"
    return f"config key {path!r}: {error.instance!r} is not allowed; allowed: {_allowed(error.schema)}"


def with_objectives(schema: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The schema with the options schema of every objective the config names under `pretrain.objectives`
    (each declared by its module, `mvptr.objectives.options_schema`); an unknown objective is a ConfigError."""
    pretrain = cfg.get("pretrain", {})
    names = pretrain.get("objectives") if isinstance(pretrain, Mapping) else None  # else validate names it
    schema = copy.deepcopy(dict(schema))
    if not isinstance(names, Mapping):
        return schema
    from mvptr.objectives import available_objectives, options_schema  # imports torch, not transformers

    known = available_objectives()
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError("invalid config:\n  " + "\n  ".join(
            f"config key 'pretrain.objectives.{name}': no such objective; objectives (mvptr.objectives): "
            f"{', '.join(known)}" for name in unknown))
    node = schema["properties"]["pretrain"]["properties"]["objectives"]
    node["properties"] = {name: options_schema(name, list(names)) for name in names}
    node["additionalProperties"] = False
    return schema


def validate(cfg: Mapping[str, Any], schema_file: Path | None = None) -> None:
    """Raise ConfigError listing every invalid key with what it accepts."""
    schema = with_objectives(load_schema(schema_file), cfg)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_message(e) for e in errors))


def config_hash(cfg: Mapping[str, Any], keys: Sequence[str] | None = None, length: int = 12) -> str:
    """sha256 of the canonical JSON of the whole config, or of the given dotted keys only."""
    if keys is not None:
        flat = flatten(cfg)
        picked = {k: v for k, v in flat.items() if any(k == key or k.startswith(key + ".") for key in keys)}
        cfg = picked
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


# What a step's result depends on: the leaves of its own class and of the steps it reads from (schema header).
STEP_READS = {"data": ("data",), "concepts": ("data", "concepts"), "regions": ("data", "regions")}
STEP_READS["stage1"] = (*STEP_READS["concepts"], "regions", "stage1")
STEP_READS["stage2"] = (*STEP_READS["stage1"], "stage2")
STEP_READS["evaluate"] = (*STEP_READS["stage2"], "evaluate")
LEAF_CLASSES = (*STEP_READS, "launch", "workflow")


def _schema_child(node: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """The schema of property `key` of an object schema, looking into allOf / if-then branches."""
    if key in node.get("properties", {}):
        return node["properties"][key]
    for branch in node.get("allOf", []):
        found = _schema_child(branch.get("then", {}), key)
        if found is not None:
            return found
    return None


def leaf_class(cfg: Mapping[str, Any], key: str, schema: Mapping[str, Any] | None = None) -> str:
    """The class (LEAF_CLASSES) of a dotted config leaf: the `x-affects` of its nearest annotated schema node;
    an objective's option is stage1 when the objective is uni-modal and the schedule two_stage, else stage2.
    ConfigError when the leaf has none (every leaf must be classified, see tests/test_config.py)."""
    node: Mapping[str, Any] | None = schema if schema is not None else load_schema()
    found = None
    parts = key.split(".")
    for depth, part in enumerate(parts):
        node = _schema_child(node, part) if node is not None else None
        if node is None:
            break
        found = node.get("x-affects", found)
        if found == "objective":
            from mvptr.objectives import load_objective

            uni_modal = load_objective(parts[depth + 1]).stage == 1
            return "stage1" if uni_modal and cfg["pretrain"]["schedule"] == "two_stage" else "stage2"
    if found not in LEAF_CLASSES:
        raise ConfigError(f"config key {key!r} is not classified: give it (or a parent) `x-affects` in "
                          f"{schema_path()} (one of {', '.join(LEAF_CLASSES)} or objective)")
    return found


def classify(cfg: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every leaf of the config -> its class."""
    schema = schema if schema is not None else load_schema()
    return {key: leaf_class(cfg, key, schema) for key in flatten(cfg)}


def step_keys(cfg: Mapping[str, Any], step: str) -> list[str]:
    """The leaves whose values a step's result depends on (`STEP_READS`), sorted; `launch` gives the keys that
    only say how a job runs."""
    wanted = STEP_READS.get(step, (step,))
    return sorted(key for key, cls in classify(cfg).items() if cls in wanted)


# Datasets made here or given as a folder; every other dataset name is a corpus of downloaded sources.
OWN_DATASETS = ("synthetic", "coco_format")


def dataset_keys(cfg: Mapping[str, Any]) -> list[str]:
    """The config keys that shape a prepared dataset (and so name its folder)."""
    name = cfg["dataset"]["name"]
    if name not in OWN_DATASETS:  # a corpus of downloaded sources
        return ["dataset.name", "dataset.corpus", "dataset.local", "download.catalog"]
    keys = ["dataset.name", f"dataset.{name}"]
    return keys + ["seed"] if name == "synthetic" else keys


def dataset_dir(cfg: Mapping[str, Any], root: Path | str = "resources/datasets") -> Path:
    """`resources/datasets/<dataset name>-<hash of the keys that shape it>`: a new size or seed gets a new folder."""
    return Path(root) / f"{cfg['dataset']['name']}-{config_hash(cfg, dataset_keys(cfg), 8)}"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--root`, `--base` and `key=value` overrides, for every subcommand that reads the config."""
    parser.add_argument("--root", type=Path, default=None,
                        help="project folder holding configs/ and workflow/ (default: $MVPTR_ROOT, the working "
                             "directory if it has them, else the checkout the package was installed from)")
    parser.add_argument("--base", type=Path, default=None, help="base config file (default ROOT/configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=1")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return load_config(args.overrides, args.base, args.root)
