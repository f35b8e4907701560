"""Whether a config's ``_target_`` (an observer's class, say) names something that exists, told
from the module's files without importing them (the ``flmnist`` command never imports PyTorch):
a typo is one line before Flower starts, not an error after the run's directory was made."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path


def _locate(parts: list[str]) -> tuple[int, object | None]:
    """Through ``parts``' packages (imported by find_spec, never the module itself: it would import
    PyTorch) to the first module: (its index, its spec); (the index of the first name that cannot be
    found, None); (len(parts), None) when the rest are a package's attributes."""
    for i in range(1, len(parts)):
        try:
            spec = importlib.util.find_spec(".".join(parts[:i]))
        except (ImportError, ValueError):
            spec = None
        if spec is None:  # unless the package (imported by find_spec) defines it: package.Class.method
            parent = sys.modules.get(".".join(parts[: i - 1])) if i > 1 else None
            return (len(parts), None) if parent is not None and hasattr(parent, parts[i - 1]) else (i, None)
        if spec.submodule_search_locations is None:  # a module: the rest are its attributes
            return i, spec
    return len(parts), None


def missing_module(target: str) -> str | None:
    """The first package or module of ``target`` (a dotted path to a class or function) that cannot be
    found, or None."""
    parts = target.split(".")
    if not all(parts):  # a relative or malformed name: Hydra cannot load it either
        return target
    i, spec = _locate(parts)
    return ".".join(parts[:i]) if spec is None and i < len(parts) else None


def undefined_name(target: str) -> str | None:
    """Why ``target``'s class or function (and a method of a class without bases) is not in its
    module, or None. The module's source is read, not imported (it would import PyTorch); a name
    made at run time (a star import, a definition under ``if``) is not judged."""
    parts = target.split(".")
    i, spec = _locate(parts) if all(parts) else (0, None)
    if spec is None or not str(spec.origin).endswith(".py"):
        return None  # (missing: missing_module's to say)
    try:
        scope = ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body
    except (OSError, SyntaxError, ValueError):
        return None
    for depth, wanted in enumerate(parts[i:]):
        defined = _defined(scope)
        if defined is None:
            return None
        if wanted not in defined:
            return f"{'.'.join(parts[:i + depth])} ({spec.origin}) defines no {wanted!r}"
        node = defined[wanted]
        if not isinstance(node, ast.ClassDef) or node.bases or node.keywords or node.decorator_list:
            return None  # (a base class, a metaclass or a class decorator may define the rest)
        scope = node.body
    return None


def _defined(scope: list) -> dict | None:
    """The names a module's or class's body defines (their nodes; None for imported or assigned
    ones), or None if it may define others at run time."""
    names: dict = {}
    for n in scope:
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names[n.name] = n
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in n.names):
                return None
            names.update({(a.asname or a.name).split(".")[0]: None for a in n.names})
        elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):  # (A, B = ...: every name unpacked)
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            names.update({t.id: None for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)})
        elif isinstance(n, (ast.If, ast.Try, ast.TryStar, ast.Match, ast.With, ast.For, ast.While)):
            return None
    return None if "__getattr__" in names else names  # (a module's __getattr__ makes names on demand)
