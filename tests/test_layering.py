"""The house rules: packages import only downwards, a run config validates without torch or Ray, files and
functions stay small.

    core/, shapes/  ->  policy/  ->  rollout/, rewards/  ->  rl/  ->  benchmarks/

Each import check runs in a fresh interpreter whose import system refuses the packages above (a `sys.meta_path`
finder raising ImportError), so a violation is an error naming the module, at import time or in a function's
deferred import (checked statically with `ast`).
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # package -> the packages it must never import
    "core": {"shapes", "policy", "rollout", "rewards", "rl", "benchmarks"},
    "shapes": {"policy", "rollout", "rewards", "rl", "benchmarks"},
    "policy": {"rollout", "rewards", "rl", "benchmarks"},
    "rollout": {"rl", "benchmarks"},
    "rewards": {"rl", "benchmarks"},
    "rl": {"benchmarks"},
}
SIZED = ["core", "shapes", "policy", "rollout", "rewards", "rl", "benchmarks"]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
HEAVY = ["torch", "ray", "deepspeed", "transformers", "open_clip"]

BLOCKER = """
import importlib, json, pathlib, sys
BLOCKED = set(json.loads(sys.argv[1]))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'layering: {name} is above this package')
sys.meta_path.insert(0, Block())
for module in json.loads(sys.argv[2]):
    importlib.import_module(module)
print('imported', len(json.loads(sys.argv[2])), 'modules')
"""


def modules_of(package: str) -> list[str]:
    out = []
    for f in sorted((ROOT / package).rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def py_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("packages", [["core", "shapes"], ["policy"], ["rollout", "rewards"]],
                         ids=lambda p: "+".join(p))
def test_packages_import_nothing_above_them(packages):
    """Import every module of the packages in an interpreter that refuses the layers above them."""
    blocked = set.intersection(*(LAYERS[p] for p in packages))
    modules = [m for p in packages for m in modules_of(p)]
    proc = subprocess.run([sys.executable, "-c", BLOCKER, json.dumps(sorted(blocked)), json.dumps(modules)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_deferred_import_reaches_up(package):
    """Imports inside functions count too: the same rule, read from the source."""
    bad = []
    for f in py_files(package):
        for name in imported_names(ast.parse(f.read_text(encoding="utf-8"))):
            if name.split(".")[0] in LAYERS[package]:
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


VALIDATE = """
import json, sys
from core.config import ConfigError, load_config
from rl.config import RunConfig
cfg = load_config(RunConfig, 'configs/shapes-tiny.yaml')
try:
    load_config(RunConfig, 'configs/shapes-tiny.yaml', ['rollout.workers=99'])
    bad = None
except ConfigError as e:
    bad = str(e)
print(json.dumps({'name': cfg.name, 'bad': bad, 'loaded': [m for m in HEAVY if m in sys.modules]}))
"""


def run_json(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{code}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_validating_a_run_config_imports_neither_torch_nor_ray():
    out = run_json(VALIDATE)
    assert out["name"] == "shapes-tiny" and out["bad"].startswith("rollout.workers: 99 is outside"), out
    assert out["loaded"] == [], out


CLI = """
import contextlib, io, json, sys
from rl.__main__ import main
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    codes = [main(['train', '--help']), main(['train', 'configs/shapes-tiny.yaml', '--print-config']),
             main(['train', 'configs/shapes-tiny.yaml', 'steps=many'])]
print(json.dumps({'codes': codes, 'err': err.getvalue(), 'loaded': [m for m in HEAVY if m in sys.modules]}))
"""


def test_train_help_print_config_and_a_bad_config_import_neither_torch_nor_ray():
    out = run_json(CLI)
    assert out["codes"] == [0, 0, 2] and out["err"].startswith("config error: steps: "), out
    assert out["loaded"] == [], out


@pytest.mark.parametrize("package", SIZED)
def test_files_and_functions_are_small(package):
    bad = []
    for f in py_files(package):
        text = f.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE_LINES:
            bad.append(f"{f.relative_to(ROOT)}: {len(text.splitlines())} lines > {MAX_FILE_LINES}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines > {MAX_FUNCTION_LINES}")
    assert not bad, "\n".join(bad)
