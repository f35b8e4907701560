"""The server waits for the SuperNodes the strategy needs, and a timeout names the setting to change
(it said ``num_nodes=N`` when the count came from ``sampling.min_available_nodes``: a review)."""

from __future__ import annotations

import pytest

from flmnist.config.compose import compose_config
from flmnist.core.errors import ConfigError
from flmnist.runtime.run_setup import build_run


class OneNodeGrid:
    """A deployment where one SuperNode of several has connected."""

    def get_node_ids(self):
        return [101]


@pytest.mark.parametrize(("overrides", "said"), [
    (["sampling.min_available_nodes=2"], "sampling.min_available_nodes=2 but only 1 SuperNode(s) connected"),
    (["strategy=fedasync"], "num_nodes=3 but only 1 SuperNode(s) connected"),
])
def test_a_deployment_short_of_nodes_fails_naming_the_setting_that_asked_for_them(tmp_path, mnist_root,
                                                                                   overrides, said):
    cfg = compose_config(["model=logreg", "num_nodes=3", "wait_for_nodes=0.01", f"data.root={mnist_root}",
                          f"run_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError) as err:
        build_run(OneNodeGrid(), cfg)
    assert said in str(err.value), str(err.value)
    assert "(wait_for_nodes)" in str(err.value)
