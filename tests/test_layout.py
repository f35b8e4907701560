"""The layout's rules, enforced: the import-linter contracts in pyproject.toml, no import cycle
between flmnist's modules (function-level imports included), few top-level modules, short
modules, and a README whose Layout section names every package."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flmnist"


def test_the_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _cycle(graph, modules: set[str]) -> list[str] | None:
    """One cycle among ``modules`` (depth-first search), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m) & modules):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(modules):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_between_modules_function_level_imports_included():
    graph = grimp.build_graph("flmnist", cache_dir=None)
    modules = {m for m in graph.modules if m.startswith("flmnist")}
    # A package's __init__ is no module of its own here: "flmnist.strategies" is its __init__.py.
    assert _cycle(graph, modules) is None, " -> ".join(_cycle(graph, modules))


def test_few_modules_at_the_top_and_none_long():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_the_readme_layout_names_every_package():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    missing = [p for p in packages if not re.search(rf"\b{p}/", section)]
    assert not missing, f"README's Layout section does not describe: {missing}"
