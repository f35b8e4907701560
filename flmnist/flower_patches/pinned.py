"""The one Flower version flmnist's patches follow, and what the warm executor says on any other.

The in-process backend, the message feeder and the warm executor use Flower internals (the
simulation engine's queue, the Runtime API's AcquireTask, ``run_clientapp``) as flwr 1.41.0 has
them; each checks the installed version against :data:`FLWR_VERSION` and steps aside otherwise.
"""

from __future__ import annotations

import contextlib
from importlib import metadata

FLWR_VERSION = "1.41.0"
STOCK_EXECUTOR = "flower-supernode --isolation subprocess"


def installed_flower_version() -> str | None:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version("flwr")
    return None


def version_refusal(version: str | None) -> str | None:
    """Why the warm executor will not run with Flower ``version`` (None: it will)."""
    if version == FLWR_VERSION:
        return None
    found = f"flwr {version}" if version else "no flwr"
    return (f"flmnist-warm-executor follows Flower {FLWR_VERSION}'s internals (the Runtime API's "
            f"AcquireTask and flwr.supernode.runtime.run_clientapp) and this environment has {found}, "
            f"so it will not start. Use Flower's stock executor instead: start the SuperNode with "
            f"`{STOCK_EXECUTOR}` (the default isolation; it starts flower-superexec itself), or keep "
            f"`--isolation process` and run `flower-superexec --runtime-api-address ADDRESS` beside it.")
