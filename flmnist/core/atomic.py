"""Files written whole or not at all: a temporary file renamed over the real one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def replaced(path: Path):
    """A temporary file beside ``path`` to write, renamed over ``path`` once written, so readers
    never see a half-written file; removed if the writing fails (a full disk: no half-written
    temporary file left to take the last space)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
