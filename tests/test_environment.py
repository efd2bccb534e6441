"""pyproject.toml and environment.yml must list the same packages at the same versions."""

from __future__ import annotations

import re
import tomllib

import yaml
from conftest import ROOT


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins(requirements: list[str]) -> dict[str, str]:
    return {_name(r): r[len(_name(r)):].strip() for r in requirements}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pip_section() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def test_environment_yml_matches_pyproject():
    """conda is not installed here (nor mamba): the file's content is what can be checked."""
    project = _project()
    declared = _pins(project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                                  for r in extra])
    conda = _pins([r for r in _pip_section() if not r.startswith("-e ")])
    assert set(conda) == set(declared)
    # torch is a range in pyproject (the Makefile pins it); every other pin must agree exactly.
    for name, pin in declared.items():
        if name != "torch":
            assert conda[name] == pin, name
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert conda["torch"] == f"=={makefile_torch}"


def test_environment_yml_installs_the_project_with_every_extra():
    """The last pip line installs the checkout itself (conda runs pip in the file's folder), so that
    `conda env create` gives the `mvptr` command and the workflow stack."""
    last = _pip_section()[-1]
    match = re.fullmatch(r"-e \.\[([a-z,]+)\]", last)
    assert match, last
    assert set(match.group(1).split(",")) == set(_project()["optional-dependencies"])
    assert "mvptr" in _project()["scripts"]


def test_the_workflow_stack_is_an_extra_not_a_core_dependency():
    project = _project()
    core = {_name(r) for r in project["dependencies"]}
    workflow = {_name(r) for r in project["optional-dependencies"]["workflow"]}
    assert workflow == {"snakemake", "snakemake-executor-plugin-slurm", "dvc", "mlflow", "psutil"}
    assert not core & workflow
