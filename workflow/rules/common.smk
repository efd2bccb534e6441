"""Shared by every rule: the merged, validated config and the input/param functions.

The config is composed by mvptr.config exactly as the `mvptr` CLI composes it: Snakemake's `config`
(configs/default.yaml + --configfile + --config) is turned back into `key=value` overrides of the base
file, and those overrides are passed to every CLI call, so a rule and its command see the same config.
"""

import re
import shlex
from pathlib import Path

from snakemake.utils import validate

from mvptr.config import (
    compose,
    dataset_dir as config_dataset_dir,
    overrides_from,
    read_yaml,
)

ROOT = Path(workflow.basedir)
BASE = read_yaml(ROOT / "configs" / "default.yaml")
OVERRIDES = overrides_from(config, BASE)
CONFIG = compose(BASE, OVERRIDES, ROOT)
validate(CONFIG, "../schemas/config.schema.yaml")
DATASET = config_dataset_dir(CONFIG).name


# Only the configured dataset can be built: its folder name carries the hash of the keys that shape it.
wildcard_constraints:
    dataset=re.escape(DATASET),


def dataset_dir():
    """The prepared dataset folder of the configured dataset."""
    return f"resources/datasets/{DATASET}"


def concept_outputs():
    """The concept vocabulary, plus the parser's quality where the dataset has gold tuples (synthetic)."""
    outputs = [f"results/{DATASET}/concepts/concept_vocab.json"]
    if CONFIG["dataset"]["name"] == "synthetic":
        outputs.append(f"results/{DATASET}/concepts/concept_quality.json")
    return outputs


def regions_dir():
    """The region stores (one HDF5 file per split), backbone and skipped-image manifest of the dataset."""
    return f"results/{DATASET}/regions"


def config_args():
    """`--root` and the overrides to hand to `mvptr`, shell-quoted: a rule's command may run in another
    working directory (--directory, a cluster node) and must compose the same config."""
    return " ".join(shlex.quote(item) for item in ["--root", str(ROOT), *OVERRIDES])
