"""What each import loads: ``import convkit`` (the kernels and their layers) loads neither the
trainer, nor the experiments, nor matplotlib; the trainer loads matplotlib only when a figure
is drawn; the chapter's models need no trainer. And the trainer's and the experiments'
modules import one another one way only, at the top of the file."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "convkit"


def modules_after(statements: str) -> list[str]:
    """The names in sys.modules after running ``statements`` in a fresh interpreter."""
    code = f"{statements}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.splitlines()[-1])


def loaded(modules: list[str], *prefixes: str) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_import_convkit_loads_neither_the_trainer_nor_matplotlib():
    modules = modules_after("import convkit\nimport convkit.nn\nimport convkit.functional")
    assert "convkit.nn" in modules
    assert loaded(modules, "matplotlib", "convkit.train", "convkit.experiments") == []


def test_the_trainer_loads_matplotlib_only_to_draw():
    modules = modules_after("import convkit.train.learner\nimport convkit.train.callbacks\n"
                            "import convkit.train.data")
    assert "convkit.train.plots" in modules
    assert loaded(modules, "matplotlib", "convkit.experiments") == []


def test_the_chapters_models_need_no_trainer():
    # benchmarks/conv_bench.py builds the chapter's CNN from them.
    modules = modules_after("import convkit.experiments.models")
    assert loaded(modules, "matplotlib", "convkit.train") == []


@pytest.mark.parametrize("old", ["learner", "callbacks", "schedules", "plots", "data", "files"])
def test_the_trainer_lives_only_in_convkit_train(old):
    assert importlib.util.find_spec(f"convkit.{old}") is None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _convkit_imports(tree: ast.Module) -> tuple[set[str], list[int]]:
    """The convkit modules a file imports at its top level, and the lines of any convkit
    import inside a function or class."""
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        else:
            continue
        names = {n for n in names if n == "convkit" or n.startswith("convkit.")}
        if not names:
            continue
        if node.col_offset == 0:
            top |= names
        else:
            nested.append(node.lineno)
    return top, nested


def test_trainer_and_experiments_import_one_way_at_the_top():
    files = sorted((PACKAGE / "train").rglob("*.py")) + sorted((PACKAGE / "experiments").rglob("*.py"))
    graph = {}
    for path in files:
        top, nested = _convkit_imports(ast.parse(path.read_text()))
        assert nested == [], f"{path.relative_to(ROOT)}: convkit imported inside a function at lines {nested}"
        graph[_module_name(path)] = top
    # Only edges between the modules checked here: convkit's own package is below them all.
    edges = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in edges[module]:
            visit(target, path + [module])
        done.add(module)

    for module in edges:
        visit(module, [])
