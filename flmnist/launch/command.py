"""The ``flmnist`` console command: Flower's processes for a single run get a head start
(:mod:`flmnist.launch.head_start`), then :func:`flmnist.launch.cli.main` runs, whose imports
(Hydra's among them) come after that start."""

from __future__ import annotations

import sys

from flmnist.launch import head_start


def main() -> None:
    head_start.begin(sys.argv[1:])
    try:
        from flmnist.launch.cli import main as run  # (after the head start, on purpose)
    except KeyboardInterrupt:  # (Ctrl-C while Hydra imports: the head start is stopped at exit)
        print("flmnist: interrupted before the run started", file=sys.stderr)
        raise SystemExit(130) from None
    run()
