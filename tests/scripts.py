"""Loading the jetson/ scripts (standalone files, not a package) as modules in the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

JETSON = Path(__file__).resolve().parents[1] / "jetson"


def load_script(name: str, path: Path):
    """The script at ``path`` as module ``name`` (loaded once per test session)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
