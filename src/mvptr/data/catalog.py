"""The download sources a corpus is made of: read, validated and listed in the order the workflow needs them.

Why: a dataset that is downloaded (COCO, Visual Genome, CC3M, ...) is described once, as data: the `source:`
entry of `configs/datasets/<name>.yaml` lists its files (URL, size, checksum and where those figures came from)
and names the reader that maps them onto the prepared format (mvptr.data.formats). A corpus (`dataset.corpus`,
e.g. `configs/datasets/4m.yaml`) is a list of such sources; this module says which sources a config needs, so
that the Snakemake rules, `mvptr data download` and `mvptr data prepare` agree.

Use:
    source = load_source("coco2014", cfg)             # Source(name, format, files, ...)
    names = needed_sources(cfg)                        # every source the configured corpus reads
    settings = download_settings(cfg)                  # mvptr.data.download.DownloadSettings
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from mvptr.config import OWN_DATASETS, SCHEMAS, project_root, read_yaml
from mvptr.data.download import DownloadSettings, RemoteFile
from mvptr.errors import ConfigError

DOWNLOADS = Path("resources/downloads")


@dataclass(frozen=True)
class SourceFile(RemoteFile):
    """A remote file of a source, and whether it is an archive to unpack."""

    extract: bool = False
    figures: str = ""


@dataclass(frozen=True)
class Source:
    name: str
    format: str
    description: str
    id_offset: int
    files: tuple[SourceFile, ...]
    images_from: str | None = None
    manual: str | None = None
    local: Mapping[str, str] = field(default_factory=dict)
    web_images: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def image_source(self) -> str:
        """The source whose images this source's records are about (itself unless `images_from`)."""
        return self.images_from or self.name


def catalog_dir(cfg: Mapping[str, Any], root: Path | None = None) -> Path:
    folder = cfg["download"]["catalog"]
    return Path(folder) if folder else (root or project_root()) / "configs" / "datasets"


def _schema() -> Mapping[str, Any]:
    return read_yaml(SCHEMAS / "source.schema.yaml")


def load_source(name: str, cfg: Mapping[str, Any], root: Path | None = None) -> Source:
    """The source `name` of the catalog; ConfigError naming the file when it is missing or invalid."""
    folder = catalog_dir(cfg, root)
    path = folder / f"{name}.yaml"
    data = read_yaml(path) if path.is_file() else {}
    if "source" not in data:
        entries = sorted(p.stem for p in folder.glob("*.yaml") if "source" in read_yaml(p)) if folder.is_dir() else []
        raise ConfigError(f"source {name!r}: no `source:` entry in {path}; sources: {', '.join(entries) or 'none'}")
    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path)
        raise ConfigError(f"{path}: {where or 'source'}: {errors[0].message}")
    entry = dict(data["source"])
    files = tuple(SourceFile(f["name"], f["url"], f["size"], f.get("md5"), f.get("sha256"), f.get("extract", False),
                             f["figures"]) for f in entry.pop("files"))
    return Source(name=name, files=files, **entry)


def corpus_roles(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """role -> source names of the configured corpus: pretrain, exclude (test images to keep out), tasks."""
    corpus = cfg["dataset"]["corpus"]
    return {"pretrain": list(corpus["pretrain"]), "exclude": list(corpus["exclude_test_of"]),
            "tasks": list(corpus["tasks"].values())}


def needed_sources(cfg: Mapping[str, Any], root: Path | None = None) -> list[str]:
    """Every source the configured dataset reads (none for synthetic and coco_format), each once, in role
    order; a task source brings its image source. ConfigError when the corpus does not hold together."""
    if cfg["dataset"]["name"] in OWN_DATASETS:
        return []
    roles = corpus_roles(cfg)
    retrieval = cfg["dataset"]["corpus"]["retrieval"]
    if retrieval not in roles["pretrain"]:
        raise ConfigError(f"config key 'dataset.corpus.retrieval': {retrieval!r} must be one of "
                          f"dataset.corpus.pretrain ({', '.join(roles['pretrain'])}): its val/test images are the "
                          f"dataset's val/test splits")
    names: list[str] = []
    for name in [*roles["pretrain"], *roles["exclude"], *roles["tasks"]]:
        for needed in (name, load_source(name, cfg, root).image_source()):
            if needed not in names:
                names.append(needed)
    return names


def web_sources(cfg: Mapping[str, Any], root: Path | None = None) -> list[str]:
    """The needed sources whose images are URL lists (fetched by img2dataset)."""
    return [name for name in needed_sources(cfg, root) if load_source(name, cfg, root).web_images]


def evaluable_tasks(cfg: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The tasks of `evaluate.tasks` that the dataset has files for, and task -> why for each one left out.

    The synthetic world writes every task's files; a corpus has retrieval and the tasks `dataset.corpus.tasks`
    names; a coco_format folder has retrieval and the tasks `dataset.coco_format.task_files` gives files for."""
    name = cfg["dataset"]["name"]
    asked = list(cfg["evaluate"]["tasks"])
    if name == "synthetic":
        return asked, {}
    if name == "coco_format":
        have = {"retrieval", *(t for t, given in cfg["dataset"]["coco_format"]["task_files"].items() if given)}
        why = "the coco_format dataset has no {task} files (set dataset.coco_format.task_files.{task})"
    else:
        have = {"retrieval", *cfg["dataset"]["corpus"]["tasks"]}
        why = f"dataset {name!r} has no {{task}} files (name a source in dataset.corpus.tasks.{{task}})"
    return [t for t in asked if t in have], {t: why.format(task=t) for t in asked if t not in have}


def download_settings(cfg: Mapping[str, Any]) -> DownloadSettings:
    d = cfg["download"]
    return DownloadSettings(workers=d["workers"], retries=d["retries"], backoff_s=d["backoff_s"],
                            timeout_s=d["timeout_s"], mirrors=dict(d["mirrors"]))
