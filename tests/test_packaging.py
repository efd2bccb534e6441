"""`pip install .` alone (no extras) gives a working library and `mvptr config show`, in a bare venv.

Why: the library (models, objectives, training, evaluation, the config and its schema) must install without
the workflow stack (Snakemake, DVC, MLflow, the SLURM plugin: the `workflow` extra), and must not need the
checkout: the schema and the default configs ship in the package. The test builds a wheel from the project's
files (as git sees them), installs it into a new venv without system site packages (torch first, at the
Makefile's pin, as the Makefile does), and runs the library outside the checkout. It downloads the core
dependencies from the package index: about 1-2 minutes.

Run: .venv/bin/python -m pytest tests/test_packaging.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT

MAKEFILE_TORCH = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
WORKFLOW_STACK = ["snakemake", "dvc", "mlflow", "snakemake_executor_plugin_slurm"]


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only torch and the mvptr wheel with its core dependencies; returns its bin folder."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout.splitlines()
    for name in files:
        path = ROOT / name
        if path.is_symlink() or path.is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name, follow_symlinks=False)  # src/mvptr/bundled/configs is a link
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), str(source)],
         tmp)
    wheel = next(wheels.glob("mvptr-*.whl"))
    env = tmp / "venv"
    venv.create(env, with_pip=True, system_site_packages=False)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, f"torch=={MAKEFILE_TORCH}"], tmp)
    _run([*pip, str(wheel)], tmp)
    return env / "bin"


def test_the_wheel_installs_without_the_workflow_stack(bare: Path, tmp_path: Path):
    code = ("import importlib.util, json, sys; "
            f"print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {WORKFLOW_STACK!r}}}))")
    found = _run([str(bare / "python"), "-c", code], tmp_path).stdout
    assert found.strip() == "{" + ", ".join(f'"{m}": false' for m in WORKFLOW_STACK) + "}"


def test_config_show_outside_a_checkout_equals_the_checkouts(bare: Path, tmp_path: Path):
    """The packaged schema and configs give the same merged config (and hash) as the checkout's."""
    installed = _run([str(bare / "mvptr"), "config", "show", "model.hidden_size=48"], tmp_path).stdout
    checkout = _run([str(Path(sys.executable).parent / "mvptr"), "config", "show", "model.hidden_size=48"],
                    ROOT).stdout
    assert installed == checkout
    bad = subprocess.run([str(bare / "mvptr"), "config", "show", "model.hidden_sise=48"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "hidden_sise" in bad.stderr, bad.stderr


def test_the_models_build_and_run_from_the_installed_package(bare: Path, tmp_path: Path):
    """Every method's model builds from the packaged config and runs a forward pass (random weights)."""
    code = """
import torch
from mvptr.config import load_config
from mvptr.models import build_model
for method in ("mvptr", "simla", "semvlp"):
    cfg = load_config([f"method.name={method}", "model.hidden_size=32", "model.num_attention_heads=2",
                       "model.intermediate_size=64"])
    model = build_model(cfg, vocab_size=30522 + 7, region_feature_dim=16).eval()  # word pieces + concepts
    ids = torch.randint(1, 30529, (2, 5))
    tokens = model.encode_text(ids, torch.ones_like(ids)).tokens
    print(method, tuple(tokens.shape) == (2, 5, 32) and bool(torch.isfinite(tokens).all()))
"""
    out = _run([str(bare / "python"), "-c", code], tmp_path).stdout.split("\n")
    assert [line for line in out if line] == ["mvptr True", "simla True", "semvlp True"], out
