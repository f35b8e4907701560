"""What a newcomer sees before any run: `flmnist --help` and `--version`, and the message of a
typo, all through the real command (no Flower run starts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flmnist.config.compose import GROUPS, group_options
from flmnist.config.help import described, group_settings, top_level_settings

FLMNIST = str(Path(sys.executable).parent / "flmnist")


def flmnist(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FLMNIST, *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_every_setting_in_conf_has_a_description():
    """The YAML comments are help's one source: a setting without one is a gap in the help."""
    missing = [s.key for s in described(top_level_settings()) if not s.description]
    for group in GROUPS:
        for option in group_options(group):
            missing += [f"{group}={option}: {s.key}" for s in described(group_settings(group, option))
                        if not s.description and not s.section]  # a preset's client: section needs none
    assert not missing, f"settings without a comment in conf/: {missing}"


def test_help_lists_every_group_option_and_top_level_setting_with_its_description():
    out = flmnist("--help")
    assert out.returncode == 0 and out.stdout.startswith("flmnist: federated MNIST on Flower"), out.stderr
    assert "Hydra" not in out.stdout.splitlines()[0]
    for group in GROUPS:
        assert f"\n  {group} (default: " in out.stdout
        for option in group_options(group):
            assert f"\n    {option} " in out.stdout or f"\n    {option}\n" in out.stdout, option
    for s in top_level_settings():
        if not s.section:
            assert f"  {s.key} " in out.stdout, s.key
    assert "  num_rounds" in out.stdout and "synchronous strategies: rounds of training" in out.stdout
    assert "  client.lr " in out.stdout and "SGD learning rate" in out.stdout  # client is always there to set


def test_help_for_a_group_option_shows_its_own_settings():
    out = flmnist("--help", "strategy=fedprox", "partition=dirichlet")
    assert out.returncode == 0, out.stderr
    assert "strategy=fedprox: FedProx" in out.stdout
    assert "strategy.proximal_mu" in out.stdout and "mu of the clients' proximal term" in out.stdout
    assert "strategy.fraction_train" in out.stdout and "from sampling.fraction_train" in out.stdout
    assert "partition.alpha" in out.stdout and "0.1 = each node sees few digits" in out.stdout
    preset = flmnist("--help", "experiment=seed002").stdout
    assert "client.lr" in preset and "= 0.1" in preset and "SGD learning rate" in preset


def test_version_names_flmnist_and_flower():
    out = flmnist("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("flmnist 0.") and "Flower 1.41" in out.stdout


@pytest.mark.parametrize("args, expected", [
    (["num_round=3"], "unknown setting 'num_round'; did you mean num_rounds"),
    (["lr=0.1"], "unknown setting 'lr'; did you mean client.lr?"),
    (["client.batchsize=8"], "did you mean client.batch_size"),
    (["partition.alpha=0.1"], "it belongs to partition=dirichlet, not to partition=iid; add partition=dirichlet"),
    (["strategy.proximal_mu=0.1"], "it belongs to strategy=fedprox, not to strategy=fedavg"),
    # the privacy options set their keys under privacy: in a file of `# @package _global_` (a review)
    (["privacy.max_epsilon=8"], ("it belongs to privacy=central or privacy=central_adaptive or privacy=client or "
                                 "privacy=dpsgd or privacy=local, not to privacy=none; add privacy=central")),
    (["+num_round=3"], "+num_round=3: flmnist would ignore a new key here; unknown setting 'num_round'; did you mean"),
    # the help for an option that is not one: printed to stdout, exit 0
    (["--help", "strategy=nope"], "Unknown strategy 'nope'. Valid options for strategy: bulyan, "),
])
def test_a_typo_gets_the_closest_keys_and_leaves_no_run_directory(tmp_path, args, expected):
    out = flmnist(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flmnist: error: ") and expected in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == [], "a failed check must leave no directory behind"
