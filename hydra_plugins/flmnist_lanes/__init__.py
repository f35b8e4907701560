"""The launcher of ``flmnist -m`` for Hydra, which instantiates launchers of this package only:
a sweep's jobs in lanes (:mod:`flmnist.launch.lanes`). The ``flmnist`` command picks it
(``hydra/launcher=flmnist_lanes``) and registers it, so an editable install's copy, which Hydra's
scan of this namespace does not find, serves too."""

from hydra.core.config_store import ConfigStore

from flmnist.launch import lanes


class LanesLauncher(lanes.LanesLauncher):
    """:class:`flmnist.launch.lanes.LanesLauncher`, by the name Hydra instantiates it."""


ConfigStore.instance().store(group="hydra/launcher", name="flmnist_lanes", node=lanes.LanesLauncherConf,
                             provider="flmnist")
