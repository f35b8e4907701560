"""Hydra callback: the command holds its run's (or its sweep's) directory before Hydra writes there.

Hydra names a run's directory to the second (``outputs/DATE/TIME_NAME``): two commands with the
same name started in the same second got the same one and wrote the same files, and a resume of
a run still going (``resume=latest`` picks it, as it checkpoints every round) wrote beside it.
:class:`HoldDirectory` takes the lock (:func:`flmnist.core.run_files.hold_run_dir`) when Hydra
starts the run or the sweep, before it writes its record (``.hydra/``), so a command that finds
the directory held ends in one line, having written nothing. The lock is the command's until it
exits (``kill -9`` too). A sweep's jobs each hold their own directory as they run
(:func:`flmnist.launch.cli.launch`).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from flmnist.core.errors import ConfigError
from flmnist.core.run_files import hold_run_dir
from flmnist.launch.cli import EXIT_ERROR, Stop

_held: list[int] = []  # the command's directory, held until it exits


class HoldDirectory(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # The directory's name reads Hydra's runtime choices (``${hydra:...}``), which need the
        # HydraConfig that Hydra sets only next (run_job, from this same config: ``${now:...}``
        # is cached in it, so both name the same second's directory).
        HydraConfig.instance().set_config(config)
        self._hold(Path(config.hydra.run.dir), resume=bool(config.get("resume")), what="run directory")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._hold(Path(config.hydra.sweep.dir), resume=False, what="sweep directory")

    @staticmethod
    def _hold(folder: Path, resume: bool, what: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)  # (Hydra makes it next, and writes .hydra/ in it)
        try:
            _held.append(hold_run_dir(folder.resolve(), resume, what))
        except ConfigError as err:
            raise Stop(str(err), EXIT_ERROR) from None
