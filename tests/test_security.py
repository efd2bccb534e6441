"""Security checks of the whole project: what it unpickles, what reaches a shell, where its servers listen, what
a hostile archive, pickle or config value can do.

Static scans (with `ast`, over every .py under src/, benchmarks/ and workflow/, plus the Snakefile and the
rules) and real runs: hostile pickles fed to the project's readers, a hostile config value through a real
`snakemake` run, hostile names through the real CLI. Each scanner is also run on a snippet that it must flag,
so that a scanner that finds nothing cannot pass for a clean project.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import re
import shlex
import subprocess
import tokenize
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_mvptr
from test_workflow import snakemake

from mvptr.checkpoint_files import read_checkpoint
from mvptr.data.safe_pickle import load_plain_pickle
from mvptr.errors import DataError

PYTHON_DIRS = ("src", "benchmarks", "workflow")
RULE_FILES = [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]


def python_files(*dirs: str) -> list[Path]:
    return sorted(path for folder in dirs for path in (ROOT / folder).rglob("*.py"))


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it was imported as (`import torch as t`, `from torch import load`)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]  # `import a.b` binds a, `import a.b as c` a.b
                names[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`torch.serialization.load` for an expression naming it through any import alias; None otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


# --- 1. what is unpickled -------------------------------------------------------------------------------------

TORCH_LOADS = {"torch.load", "torch.serialization.load"}
# Readers that run whatever callable the data names (unless told otherwise, see `_unsafe_load`).
PICKLE_READERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
                  "_pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads",
                  "joblib.load", "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads",
                  "yaml.unsafe_load", "yaml.full_load", "torch.hub.load"}
# Where a pickle reader is the point, and why that is safe.
ALLOWED_PICKLE = {
    # The restricted unpickler: its find_class refuses every global (tested below with every opcode).
    ("src/mvptr/data/safe_pickle.py", "pickle.Unpickler"),
    # submitit's result pickle, written by this project's own job into its own job folder (what submitit's
    # job.result() reads the same way); never a downloaded file.
    ("src/mvptr/launch/launcher.py", "pickle.load"),
}


def _unsafe_load(node: ast.AST, name: str) -> str | None:
    if name in TORCH_LOADS:
        if not isinstance(node, ast.Call) or not _is_true(_keyword(node, "weights_only")):
            return f"{name} without weights_only=True"
    elif name in PICKLE_READERS:
        return name
    elif name == "numpy.load" and isinstance(node, ast.Call):
        flag = _keyword(node, "allow_pickle")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
            return "numpy.load with allow_pickle"
    elif name == "yaml.load" and isinstance(node, ast.Call):
        loader = _keyword(node, "Loader")
        if loader is None or "Safe" not in ast.unparse(loader):
            return "yaml.load without a SafeLoader"
    return None


def scan_loads(source: str, filename: str) -> tuple[list[str], int]:
    """(each unsafe load in `source` as 'file:line: what', how many torch/pickle loads were looked at)."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found, seen = [], 0
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Name, ast.Attribute)) or isinstance(parents.get(node), ast.Attribute):
            continue  # only the outermost expression of a dotted name
        name = _dotted(node, aliases)
        parent = parents.get(node)
        target = parent if isinstance(parent, ast.Call) and parent.func is node else node
        if name in TORCH_LOADS | PICKLE_READERS | {"numpy.load", "yaml.load"}:
            seen += 1
            problem = _unsafe_load(target, name)
            if problem and (filename, name) not in ALLOWED_PICKLE:
                found.append(f"{filename}:{node.lineno}: {problem}")
    return found, seen


def _rule_words(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every name in a Snakefile/.smk (Python's tokenizer reads Snakemake's syntax)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
              if t.type in (tokenize.NAME, tokenize.OP)]
    i = 0
    while i < len(tokens):
        if tokens[i].type == tokenize.NAME:
            words, start = [tokens[i].string], tokens[i].start[0]
            while i + 2 < len(tokens) and tokens[i + 1].string == "." and tokens[i + 2].type == tokenize.NAME:
                words.append(tokens[i + 2].string)
                i += 2
            yield start, ".".join(words)
            if i + 2 < len(tokens) and words[-1] == "shell" and tokens[i + 1].string == "=":
                yield start, f"shell={tokens[i + 2].string}"
        i += 1


# Rules are wiring only (the Snakefile's docstring): none of these belongs in them; the logic is in src/.
RULE_FORBIDDEN = re.compile(r"^(torch\.load|pickle|_pickle|cloudpickle|dill|marshal|subprocess|os\.system|os\.popen"
                            r"|shell=True|eval|exec)\b")


def scan_files(scanner, paths) -> tuple[list[str], int]:
    """Every problem `scanner` finds in `paths` (files of the checkout), and how many places it looked at."""
    found, seen = [], 0
    for path in paths:
        problems, count = scanner(path.read_text(), path.relative_to(ROOT).as_posix())
        found += problems
        seen += count
    return found, seen


def test_every_torch_load_passes_weights_only_and_no_pickle_reader_runs_outside_the_restricted_one():
    found, seen = scan_files(scan_loads, python_files(*PYTHON_DIRS))
    for path in RULE_FILES:
        found += [f"{path.name}:{line}: {word}" for line, word in _rule_words(path) if RULE_FORBIDDEN.match(word)]
    assert not found, "\n".join(found)
    # The four torch.load calls of src/ (checkpoint, BERT init, two in checkpoint_files) and the two pickle
    # readers of ALLOWED_PICKLE at least: a scan that finds fewer is not looking.
    assert seen >= 6, seen


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(f)",
    "import torch\ntorch.load(f, weights_only=False)",
    "import torch\ntorch.load(f, weights_only=flag)",
    "from torch import load\nload(f, map_location='cpu')",
    "from torch import load as read\nread(f)",
    "import torch as t\nt.serialization.load(f)",
    "import pickle\npickle.loads(data)",
    "import pickle as p\nclass U(p.Unpickler): pass",
    "from pickle import load\nload(handle)",
    "import numpy as np\nnp.load(f, allow_pickle=True)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
])
def test_the_load_scanner_flags_every_unsafe_spelling(snippet: str):
    assert len(scan_loads(snippet, "snippet.py")[0]) == 1


def test_the_load_scanner_passes_the_safe_spellings():
    safe = ("import torch\ntorch.load(f, map_location='cpu', weights_only=True)\n"
            "import numpy\nnumpy.load(f)\nimport yaml\nyaml.load(t, Loader=yaml.SafeLoader)\nyaml.safe_load(t)")
    assert scan_loads(safe, "snippet.py") == ([], 3)


def test_the_rule_scanner_flags_a_load_in_a_rule(tmp_path: Path):
    rule = tmp_path / "x.smk"
    rule.write_text('rule x:\n    run:\n        import torch\n        state = torch.load(input[0])\n'
                    'rule y:\n    shell:\n        "echo {input}"\n')
    assert [word for _, word in _rule_words(rule) if RULE_FORBIDDEN.match(word)] == ["torch.load"]


# --- 2. what reaches a shell ----------------------------------------------------------------------------------

SHELL_FUNCTIONS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                   "asyncio.create_subprocess_shell"}
PROCESS_FUNCTIONS = {"subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
                     "subprocess.Popen", "asyncio.create_subprocess_exec"}


def _is_string(node: ast.expr) -> bool:
    """A str literal, an f-string, a str concatenation or formatting, a `"...".join()/.format()` call."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _is_string(node.left) or _is_string(node.right)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("join", "format")
            and _is_string(node.func.value))


def scan_shell(source: str, filename: str) -> tuple[list[str], int]:
    """(each way `source` hands a string to a shell, how many process-starting calls were looked at)."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found, seen = [], 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        shell = _keyword(node, "shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            found.append(f"{filename}:{node.lineno}: {name or 'a call'} with shell={ast.unparse(shell)}")
        if name in SHELL_FUNCTIONS:
            found.append(f"{filename}:{node.lineno}: {name}")
        if name in PROCESS_FUNCTIONS | SHELL_FUNCTIONS:
            seen += 1
            first = node.args[0] if node.args else _keyword(node, "args")
            if name in PROCESS_FUNCTIONS and first is not None and _is_string(first):
                found.append(f"{filename}:{node.lineno}: {name} given a command string")
    return found, seen


def test_nothing_hands_a_string_to_a_shell():
    found, seen = [], 0
    for path in python_files(*PYTHON_DIRS):
        problems, count = scan_shell(path.read_text(), path.relative_to(ROOT).as_posix())
        found += problems
        seen += count
    assert not found, "\n".join(found)
    assert seen >= 5, seen  # sbatch/squeue/scancel, img2dataset, the local job controller, ...


@pytest.mark.parametrize("snippet", [
    "import subprocess\nsubprocess.run(cmd, shell=True)",
    "import subprocess\nsubprocess.run(f'ls {folder}')",
    "from subprocess import Popen\nPopen('ls ' + folder)",
    "import subprocess as sp\nsp.check_output(' '.join(words))",
    "import os\nos.system(cmd)",
    "from os import popen\npopen(cmd)",
])
def test_the_shell_scanner_flags_every_unsafe_spelling(snippet: str):
    assert scan_shell(snippet, "snippet.py")[0]


# Placeholders a rule's shell command may leave unquoted: numbers, and words the rule's code quoted already
# (config_args and LAUNCH_ARGS in workflow/rules/common.smk pass every override through shlex.quote).
PREQUOTED = {"threads", "params.config", "resources.launch"}


def shell_placeholders(path: Path) -> list[tuple[int, str]]:
    """(line, placeholder) of every `{...}` in the string literals of a rule file's `shell:` directives."""
    text = path.read_text()
    out = []
    for match in re.finditer(r"^(\s*)shell:\n((?:\1\s+.*\n|\s*\n)+)", text, re.M):
        block = match.group(2)
        first = text[: match.start(2)].count("\n") + 1
        for token in tokenize.generate_tokens(io.StringIO(f"({block})").readline):
            if token.type == tokenize.STRING and not token.string.lower().startswith(("f", "rf")):
                literal = ast.literal_eval(token.string).replace("{{", "").replace("}}", "")
                out += [(first + token.start[0] - 1, name) for name in re.findall(r"\{([^{}]+)\}", literal)]
    return out


def test_every_value_a_rule_hands_its_shell_is_quoted():
    placeholders = [(path.name, line, name) for path in RULE_FILES for line, name in shell_placeholders(path)]
    unquoted = [f"{file}:{line}: {{{name}}}" for file, line, name in placeholders
                if not name.endswith(":q") and name not in PREQUOTED]
    assert not unquoted, "unquoted in a shell command (use {x:q}):\n" + "\n".join(unquoted)
    assert len(placeholders) >= 40, len(placeholders)


def test_the_placeholder_scanner_reads_a_shell_directive(tmp_path: Path):
    rule = tmp_path / "x.smk"
    rule.write_text('rule x:\n    shell:\n        "cp {input:q} {output} "\n        + f"{{resources.{name}}}"\n'
                    '        + "> {log:q}"\n')
    assert shell_placeholders(rule) == [(3, "input:q"), (3, "output"), (5, "log:q")]


MARKERS = ("semicolon", "subshell", "backtick")


def hostile(folder: Path) -> str:
    """A config value that creates marker files in `folder` if any shell evaluates it."""
    semicolon, subshell, backtick = (folder / name for name in MARKERS)
    return f"x; touch {semicolon}; $(touch {subshell}) `touch {backtick}`"


def test_a_hostile_config_value_reaches_the_rule_command_as_one_word_and_no_shell(tmp_path: Path):
    """A real run of prepare_data (tiny world) with a string config value made to break out of the shell."""
    value = hostile(tmp_path)
    # JSON's double-quoted string is a valid YAML scalar.
    (tmp_path / "hostile.yaml").write_text(
        f"dataset:\n  synthetic: {{size: tiny}}\n  coco_format:\n    images_dir: {json.dumps(value)}\n")
    proc = snakemake("data_only", "--cores", "1", "-p", "--configfile", str(tmp_path / "hostile.yaml"),
                     workdir=tmp_path / "work")
    output = proc.stdout + proc.stderr
    assert not [name for name in MARKERS if (tmp_path / name).exists()]
    assert proc.returncode == 0, output
    command = next(line for line in output.splitlines() if line.startswith("Shell command: mvptr data prepare"))
    words = shlex.split(command.removeprefix("Shell command: "))
    assert f"dataset.coco_format.images_dir={value}" in words



# --- 3. where servers listen ----------------------------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SERVER_CALLS = re.compile(r"(^|\.)(bind|create_server|start_server|run_simple|serve|\w*Server)$")


def _constants(tree: ast.AST) -> dict[str, ast.expr]:
    """Module-level `NAME = <expr>`: what a host given by name stands for."""
    return {target.id: node.value for node in getattr(tree, "body", []) if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def scan_hosts(source: str, filename: str) -> tuple[list[str], int]:
    """(each server address in `source` that is not loopback, how many server addresses were looked at).

    An address is the host of a `(host, port)` tuple handed to a call (socket.bind, HTTPServer, super().__init__
    of a server class), a `host=` keyword, the word after `--host` in a command list, or a `--host=` string;
    any "0.0.0.0" or "::" literal is refused wherever it is."""
    tree = ast.parse(source, filename)
    constants = _constants(tree)
    found, seen = [], 0

    def check(node: ast.expr, what: str) -> None:
        nonlocal seen
        seen += 1
        value = constants.get(node.id, node) if isinstance(node, ast.Name) else node
        if not (isinstance(value, ast.Constant) and value.value in LOOPBACK):
            found.append(f"{filename}:{node.lineno}: {what} listens on {ast.unparse(node)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in ("0.0.0.0", "::") or re.search(r"--host[= ](?!127\.0\.0\.1\b|localhost\b)", node.value):
                found.append(f"{filename}:{node.lineno}: {node.value!r}")
        elif isinstance(node, (ast.List, ast.Tuple)):
            words = node.elts
            for word, after in zip(words, words[1:]):
                if isinstance(word, ast.Constant) and word.value == "--host":
                    check(after, "--host")
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        address = node.args[0] if node.args else None
        if isinstance(address, ast.Tuple) and len(address.elts) == 2 and (
                SERVER_CALLS.search(name) or name.endswith("__init__")):
            check(address.elts[0], name)
        host = _keyword(node, "host")
        if host is not None:
            check(host, name)
    return found, seen


def test_every_server_the_project_or_its_tests_start_listens_on_loopback_only():
    # this file's snippets are the scanner's bad examples
    found, seen = scan_files(scan_hosts, [p for p in python_files("src", "tests", "benchmarks")
                                          if p != Path(__file__).resolve()])
    assert not found, "\n".join(found)
    # tests/mlflow_server.py (its port probe and `mlflow server --host`), tests/loopback_http.py, the
    # torch.distributed port probe of tests/test_train.py: a scan that finds fewer is not looking.
    assert seen >= 4, seen


@pytest.mark.parametrize("snippet", [
    "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 0))",
    "import socket\ns = socket.socket()\ns.bind(('', 8080))",
    "from http.server import HTTPServer\nHTTPServer(('192.0.2.1', 0), H)",
    "HOST = '10.0.0.1'\nclass S(ThreadingHTTPServer):\n    def __init__(self):\n        super().__init__((HOST, 0), H)",
    "import subprocess\nsubprocess.Popen(['mlflow', 'server', '--host', host, '--port', '5000'])",
    "cmd = 'mlflow ui --host=0.0.0.0'",
    "app.run(host=address, port=5000)",
])
def test_the_host_scanner_flags_every_non_loopback_spelling(snippet: str):
    assert scan_hosts(snippet, "snippet.py")[0]


# --- 4. hostile pickles ---------------------------------------------------------------------------------------

class _Reduce:
    """Pickles as `fn(*args)`: what a hostile file asks the unpickler to call."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class NotAllowed:
    """A class of this module: no reader here may build it."""


def pickle_payloads(marker: Path) -> dict[str, bytes]:
    """Hostile pickles, each written with the opcodes it is named after; those that run code touch `marker`."""
    touch = f"touch {marker}".encode()
    return {
        "GLOBAL os.system + REDUCE": b"cos\nsystem\n(S'" + touch + b"'\ntR.",
        "GLOBAL builtins.eval": b"cbuiltins\neval\n(S'__import__(\"os\").system(\"" + touch + b"\")'\ntR.",
        "GLOBAL subprocess.Popen": b"csubprocess\nPopen\n((S'touch'\nS'" + str(marker).encode() + b"'\nltR.",
        "INST os.system": b"(S'" + touch + b"'\nios\nsystem\n.",
        "OBJ os.system": b"(cos\nsystem\nS'" + touch + b"'\no.",
        "STACK_GLOBAL os.system (protocol 4)": pickle.dumps(_Reduce(os.system, touch.decode()), protocol=4),
        "NEWOBJ of a class not allowed": pickle.dumps(NotAllowed(), protocol=2),
        "REDUCE of an allowed-looking callable (builtins.dict)": b"cbuiltins\ndict\n)R.",
        "REDUCE of builtins.getattr": b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'"
                                      + touch + b"'\ntR.",
        "a class not in the allow-list (collections.OrderedDict)": pickle.dumps(OrderedDict(a=1), protocol=2),
    }


RUNS_CODE = ("GLOBAL os.system + REDUCE", "GLOBAL builtins.eval", "GLOBAL subprocess.Popen", "INST os.system",
             "OBJ os.system", "STACK_GLOBAL os.system (protocol 4)", "REDUCE of builtins.getattr")


@pytest.mark.parametrize("kind", RUNS_CODE)
def test_the_hostile_pickles_do_run_code_under_plain_pickle(tmp_path: Path, kind: str):
    """The control: without the restricted readers these bytes do create the marker."""
    marker = tmp_path / "pwned"
    result = pickle.loads(pickle_payloads(marker)[kind])
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(pickle_payloads(Path("m"))))
def test_the_plain_pickle_reader_refuses_every_hostile_pickle_naming_what_it_asked_for(tmp_path: Path, kind: str):
    marker = tmp_path / "pwned"
    (tmp_path / "refs.p").write_bytes(pickle_payloads(marker)[kind])
    with pytest.raises(DataError, match=r"refs\.p: the pickle asks for \w+\.\w+; only plain containers"):
        load_plain_pickle(tmp_path / "refs.p")
    assert not marker.exists()


def _torch_file_with(path: Path, data_pkl: bytes) -> Path:
    """A real torch zip checkpoint (torch.save) whose pickle is replaced by `data_pkl`."""
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as zf:
        entries = {info.filename: zf.read(info) for info in zf.infolist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data_pkl if name.endswith("/data.pkl") else data)
    return path


@pytest.mark.parametrize("kind", sorted(pickle_payloads(Path("m"))))
def test_a_torch_checkpoint_holding_a_hostile_pickle_runs_nothing(tmp_path: Path, kind: str):
    marker = tmp_path / "pwned"
    path = _torch_file_with(tmp_path / "evil.pt", pickle_payloads(marker)[kind])
    with pytest.raises(DataError, match=r"evil\.pt: (torch\.load\(weights_only=True\) refused it \((Trying to load|"
                                        r"Unsupported)|holds (a|no) )"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("fn, args", [(os.system, "touch {marker}"),
                                      (eval, "__import__('os').system('touch {marker}')"),
                                      (subprocess.Popen, ["touch", "{marker}"])], ids=["os.system", "eval", "Popen"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_checkpoint_whose_weights_sit_beside_a_hostile_object_yields_the_weights_and_runs_nothing(
        tmp_path: Path, fn, args, protocol: int):
    marker = tmp_path / "pwned"
    filled = [a.format(marker=marker) for a in args] if isinstance(args, list) else args.format(marker=marker)
    torch.save({"model": {"w": torch.ones(2)}, "hook": _Reduce(fn, filled)}, tmp_path / "ckpt.pt",
               pickle_protocol=protocol)
    try:
        assert set(read_checkpoint(tmp_path / "ckpt.pt")) == {"w"}  # the hostile object became an inert stand-in
    except DataError as err:  # or torch refused the file outright
        assert "ckpt.pt: torch.load(weights_only=True) refused it (" in str(err)
    assert not marker.exists()


# --- 5. config values that name folders -----------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("ablation=../../escape", "ablation"),
    ("ablations=[full, ../../escape]", "ablations.1"),
    ("dataset.name=../../escape", "dataset.name"),
    ("methods=[../escape]", "methods.0"),
    ("dataset.corpus.pretrain=['../../escape']", "dataset.corpus.pretrain.0"),
    ("dataset.corpus.tasks={vqa: '/tmp/escape'}", "dataset.corpus.tasks.vqa"),
    ("dataset.corpus.exclude_test_of=['x; touch pwned']", "dataset.corpus.exclude_test_of.0"),
    ("dataset.local={'../escape': /data}", "dataset.local"),
])
def test_a_config_name_that_would_leave_its_folder_or_reach_a_shell_is_refused_naming_the_key(
        tmp_path: Path, override: str, key: str):
    """Every config value that becomes part of an output path (results/<dataset>/<method>/<ablation>/...,
    resources/downloads/<source>/) is a plain name; no config key is an output location itself."""
    proc = run_mvptr("config", "show", "--root", str(ROOT), override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"config key '{key}'" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == [] and not (ROOT.parent / "escape").exists()


def test_snakemake_refuses_a_source_name_that_would_leave_resources(tmp_path: Path):
    """The rules compose the config with the same loader (workflow/rules/common.smk): the same one-line refusal,
    before any job runs. (The retrieval source must be one of pretrain, mvptr.data.catalog.needed_sources.)"""
    proc = snakemake("-n", "--config", "dataset={name: coco2014, corpus: {pretrain: ['../../escape'], "
                     "retrieval: '../../escape'}}", workdir=tmp_path / "work")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "config key 'dataset.corpus.pretrain.0': '../../escape' is not allowed" in output, output
    assert sorted(p.name for p in tmp_path.rglob("*") if ".snakemake" not in p.parts) == ["work"]


def test_a_catalog_source_whose_image_source_is_not_a_plain_name_is_refused_naming_the_file(tmp_path: Path):
    """images_from names another source, hence another folder under resources/downloads/."""
    entry = (ROOT / "configs" / "datasets" / "vqa_v2.yaml").read_text()
    (tmp_path / "vqa_v2.yaml").write_text(entry.replace("images_from: coco2014", "images_from: ../../escape"))
    (tmp_path / "coco2014.yaml").write_text((ROOT / "configs" / "datasets" / "coco2014.yaml").read_text())
    proc = run_mvptr("data", "sources", "--root", str(ROOT), f"download.catalog={tmp_path}", "dataset.name=coco2014",
                     "dataset.corpus.tasks={vqa: vqa_v2}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "vqa_v2.yaml: source.images_from: '../../escape' does not match" in proc.stderr
