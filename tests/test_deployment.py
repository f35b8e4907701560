"""The Jetson deployment, rehearsed on loopback: real SuperLink (loopback only) behind nginx, SuperNodes
with TLS, node authentication and trusted entities, the operator's signed bundle, refusals (an
unregistered key, no TLS, a board's Control API calls through the proxy, unsigned and foreign
bundles, a revoked board coming back), one SuperNode killed mid-run and restarted
(``jetson/rehearsal.py``); the signed app store against Flower's own verifier; and the deployment
scripts' dry runs and the partition export.

``rehearse_try_it`` runs section 4's plain-connection path ("Try it first") the same way: one
round on an insecure SuperLink with three SuperNodes started as the guide's board command; a quick
test checks that the guide shows the commands it runs.

The rehearsal runs once for the module (about 5 minutes: Flower's deployment loop polls every
3 s, and the SuperLink takes up to 60 s to mark a killed SuperNode offline). It needs nginx
(``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
JETSON = REPO / "jetson"


rehearsal = load_script("flmnist_rehearsal", JETSON / "rehearsal.py")
export = load_script("flmnist_export_partition", JETSON / "device" / "export_partition.py")
app_store = load_script("flmnist_app_store", JETSON / "server" / "app_store.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory, mnist_root):
    return rehearsal.rehearse(tmp_path_factory.mktemp("rehearsal"), mnist_root, executor="warm")


@pytest.mark.parametrize("check", list(rehearsal.CHECKS))
@pytest.mark.slow
def test_rehearsal(report, check):
    rehearsal.CHECKS[check](report)


@pytest.mark.slow
def test_rehearsal_round_times_are_recorded(report):
    times = rehearsal.round_times(report)
    print(f"deployment round times (s): {times}; run {report.run['seconds']:.0f} s, "
          f"killed node offline after {report.fault['offline_after']:.0f} s")
    assert len(times) == rehearsal.NUM_ROUNDS and all(t > 0 for t in times)


@pytest.mark.slow
def test_try_it_path_runs_as_the_guide_says(tmp_path, mnist_root):
    """Section 4 of jetson/README.md on loopback (``rehearse_try_it``): the plain SuperLink, three
    SuperNodes started as the guide's board command, the guide's ``flwr run`` for one round."""
    seen = rehearsal.rehearse_try_it(tmp_path, mnist_root)
    print(f"try-it rehearsal: {seen['seconds']:.0f} s (flwr run {seen.get('seconds_run', 0):.0f} s); commands:\n"
          + "\n".join(f"  {what}: {cmd}" for what, cmd in seen["commands"].items()))
    assert seen["stopped"] and seen["leftover"] == [], seen["leftover"]
    assert seen["returncode"] == 0 and seen["run_dir"] is not None, seen.get("log", "")[-3000:]
    summary = seen["summary"]
    assert summary["status"] == "finished" and summary["rounds_completed"] == 1, summary
    # One round of seed002 (each node holds its own digits) scores 0.28; chance is 0.1.
    assert summary["final_accuracy"] > 0.2, summary["final_accuracy"]
    assert f"flmnist run directory: {seen['run_dir']}" in seen["log"] and "Run finished" in seen["log"]
    names = rehearsal.NAMES
    ids = seen["node_ids"]
    assert set(ids) == set(names) and all(seen["status_before_run"].get(ids[n]) == "online" for n in names), seen
    # Each SuperNode got its train message and answered it, under its node name and partition.
    for name in names:
        assert "Receiving: train message" in seen["node_logs"][name], seen["node_logs"][name][-2000:]
        assert "Sending: train message" in seen["node_logs"][name], seen["node_logs"][name][-2000:]
    bound = {int(node): (who["name"], who["partition"]) for node, who in summary["screen"]["identities"]["bound"].items()}
    assert bound == {ids[name]: (name, k) for k, name in enumerate(names)}, bound
    rows = json.loads((seen["run_dir"] / "metrics.json").read_text())
    assert rows[-1]["round"] == 1 and rows[-1]["num_updates"] == len(names), rows[-1]


def _guide_section(title: str) -> tuple[str, str]:
    """A section of jetson/README.md as written, and flat (continued lines joined, whitespace collapsed)."""
    text = (JETSON / "README.md").read_text().split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]
    return text, " ".join(text.replace("\\\n", " ").split())


def test_guide_try_it_section_shows_the_rehearsed_commands():
    """The guide's "Try it first" commands are those ``rehearse_try_it`` runs (flags and values)."""
    guide = rehearsal.GUIDE_VALUES
    text, flat = _guide_section("4. Try it first")
    assert rehearsal.TRY_SUPERLINK.format(**guide) in flat
    # Each board's command: the images (entrypoint flower-supernode, /data mounted) or the venv's SuperNode.
    node_args = rehearsal.TRY_SUPERNODE.removeprefix("flower-supernode ")
    for k, before, data in ((0, "flmnist-supernode:1.41.0", "/data"), (1, "flmnist-supernode-cpu:1.41.0", "/data"),
                            (2, "flower-supernode", guide["data"])):
        assert f"{before} {node_args.format(**{**guide, 'data': data, 'name': f'jetson-{k}'})}" in flat, k
    assert "\nflwr config list " in text
    assert f"cat >> ~/.flwr/config.toml <<'EOF'\n\n{rehearsal.TRY_CONFIG.format(**guide)}EOF\n" in text
    assert f"\nflwr supernode list {rehearsal.TRY_CONNECTION} " in text
    assert f"""echo 'overrides = "{rehearsal.TRY_OVERRIDES.format(**guide)}"' > {guide["run_config"]}""" in flat
    assert f"\n{rehearsal.TRY_RUN.format(**guide)}\n" in text
    assert rehearsal.TRY_EXPORT.format(**guide) in _guide_section("2. The server, once")[1]


def test_exported_partition_is_the_simulation_partition(tmp_path, mnist_root):
    from flmnist.config.compose import compose_config
    from flmnist.core.build import build
    from flmnist.ml.data import load_mnist, normalize, read_data_path

    info = export.export_partition(tmp_path, 1, ["experiment=seed002"], mnist_root)
    blob = torch.load(tmp_path / "data.pt", weights_only=True)
    assert blob["images"].dtype == torch.uint8 and blob["images"].shape[1:] == (28, 28)
    cfg = compose_config(["experiment=seed002"])
    labels = load_mnist(str(mnist_root), True)[1].numpy()
    part = build(cfg.partition, "partition")(labels, cfg.num_nodes, cfg.seed)[1]
    assert np.array_equal(blob["labels"].numpy(), labels[part])
    assert info["digits"] == np.bincount(labels[part], minlength=10).tolist()
    assert set(np.flatnonzero(info["digits"])) == {4, 5, 6}
    images = normalize(read_data_path(tmp_path)[0])  # the ClientApp's reader accepts it
    assert images.shape == (len(part), 1, 28, 28)
    assert json.loads((tmp_path / "partition.json").read_text())["node"] == 1


def test_export_rejects_a_node_outside_the_split(tmp_path, mnist_root, capsys):
    code = export.main(["--node", "3", "--out", str(tmp_path), "--data-root", str(mnist_root), "experiment=seed002"])
    assert code == 2 and "--node 3 is outside 0..2" in capsys.readouterr().err
    assert not (tmp_path / "data.pt").exists()


def _dry(script: str, *args: str) -> str:
    proc = subprocess.run(["bash", str(JETSON / script), "--dry-run", *args], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_script_dry_runs_show_the_commands_they_would_run(tmp_path):
    out = _dry("server/make_certs.sh", str(tmp_path / "c"), "192.168.1.10", "server.lan")
    assert "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:192.168.1.10,DNS:server.lan" in out
    assert not (tmp_path / "c").exists()
    out = _dry("server/start_superlink.sh", "--port", "9000", "--certs", "/etc/c")
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--database",
                 "--ssl-certfile /etc/c/superlink.crt", "--port 9000", "--host 127.0.0.1",
                 "FLWR_SUPERGRID_API_URL=http://127.0.0.1:8001/v1"):
        assert flag in out, flag
    proc = subprocess.run(["bash", str(JETSON / "server" / "start_superlink.sh"), "--dry-run", "--host", "0.0.0.0"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "has no authentication" in proc.stderr, proc.stderr
    out = _dry("server/start_proxy.sh", "--listen", "192.168.1.10:8443", "--certs", "/etc/c")
    for line in ("listen 192.168.1.10:8443 ssl;", "ssl_certificate /etc/c/superlink.crt;", "location /v1/fleet/ {",
                 "limit_except POST { deny all; }", "proxy_pass https://127.0.0.1:8000/v1/fleet/;",
                 "proxy_ssl_verify on;", 'return 403 "only the Fleet API is served here\\n";', r"-g daemon\ off\;"):
        assert line in out, line
    assert "/v1/control" not in out.split("location / {")[0].split("location /v1/fleet/")[1]
    out = _dry("server/make_signing_key.sh", "--id", "fpk_test", str(tmp_path / "s"))
    assert "ssh-keygen -q -t ed25519 -N '' -C fpk_test" in out and "trusted-entities.yaml" in out
    assert not (tmp_path / "s").exists()
    out = _dry("server/sign_app.sh")
    assert "app_store.py sign --key ./signing/app-signing.key --store ./app-store" in out, out
    assert "flwr supernode register k.pub lab --name jetson-01" in _dry(
        "server/register_node.sh", "--superlink", "lab", "jetson-01", "k.pub")
    assert "flwr supernode unregister 42" in _dry("server/revoke_node.sh", "42")
    out = _dry("device/make_node_key.sh", str(tmp_path / "k" / "node.key"))
    assert "ssh-keygen -q -t ecdsa -b 384" in out and f"install -D -m 600 /dev/null {tmp_path}/k/superexec.secret" in out
    assert "ssh-keygen" not in _dry("device/make_node_key.sh", "--secret-only", str(tmp_path / "k" / "node.key"))
    assert not (tmp_path / "k").exists()


def test_signed_app_store_satisfies_flowers_verifier(tmp_path):
    """A bundle signed by sign_app.sh and handed out by app_store.py passes the SuperNode's own check
    (flwr's ``_verify_fab`` with the boards' trusted-entities file); a changed bundle, a foreign key
    claiming the operator's key ID, and an unsigned bundle do not."""
    import yaml
    from flwr.supercore.fab import Fab
    from flwr.superlink.servicer.control.control_handlers import _format_verification
    from flwr.supernode.start_client_internal import _verify_fab

    for name in ("signing", "foreign"):
        subprocess.run(["bash", str(JETSON / "server" / "make_signing_key.sh"), str(tmp_path / name)], check=True,
                       capture_output=True)
    trusted = yaml.safe_load((tmp_path / "signing" / "trusted-entities.yaml").read_text())
    assert list(trusted) == ["fpk_flmnist_operator"] and trusted["fpk_flmnist_operator"].startswith("ssh-ed25519 ")
    app = rehearsal.write_probe_app(tmp_path / "probe", "1.2.3")
    store = tmp_path / "store"
    out = subprocess.run(["bash", str(JETSON / "server" / "sign_app.sh"), "--key", str(tmp_path / "signing" / "app-signing.key"),
                          "--store", str(store), str(app)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHON=sys.executable)).stdout
    assert "run it with: flwr run @intruder/probe==1.2.3 CONNECTION" in out, out

    record, versions = app_store.find(store, "@intruder/probe", None)  # what `serve` answers
    assert versions == ["1.2.3"] and record["app_version"] == "1.2.3"
    fab = (store / "intruder" / "probe" / "1.2.3.fab").read_bytes()
    verifications = _format_verification(record["verifications"])  # what the SuperLink stores with the bundle
    assert verifications["valid_license"] == "Valid"
    assert _verify_fab(Fab("", fab, verifications), trusted)
    assert not _verify_fab(Fab("", fab + b"x", verifications), trusted)  # changed after signing
    assert not _verify_fab(Fab("", fab, {}), trusted)  # unsigned

    foreign = app_store.sign_fab(fab, tmp_path / "foreign" / "app-signing.key", "fpk_flmnist_operator")
    assert not _verify_fab(Fab("", fab, _format_verification([foreign])), trusted)
    assert app_store.find(store, "@intruder/probe", "9.9.9") == (None, ["1.2.3"])
    assert app_store.find(store, "../../etc", None) == (None, [])


def test_revoking_a_board_keeps_the_registrys_mode_for_the_serverapp(tmp_path):
    """revoke_node.sh rewrote the registry through mktemp, mode 600 and the operator's: the
    ServerApp (user flmnist, in the group) could no longer read it, and every hardened run failed
    at setup. The rewritten file keeps the registry's mode. (FLWR: the flwr command it runs, here
    one that answers as a SuperLink that unregistered the node.)"""
    registry = tmp_path / "registered_nodes.tsv"
    registry.write_text("11\tjetson-0\tkey0\n22\tjetson-1\tkey1\n")
    registry.chmod(0o640)
    flwr = tmp_path / "flwr"
    flwr.write_text('#!/bin/sh\necho \'{"success": true}\'\n')
    flwr.chmod(0o755)
    proc = subprocess.run(["bash", str(JETSON / "server" / "revoke_node.sh"), "--registry", str(registry), "jetson-1"],
                          capture_output=True, text=True, check=False, env={**os.environ, "FLWR": str(flwr)})
    assert proc.returncode == 0, proc.stderr
    assert registry.read_text() == "11\tjetson-0\tkey0\n"
    assert registry.stat().st_mode & 0o777 == 0o640


def test_registering_a_second_board_for_a_partition_is_refused_before_the_superlink(tmp_path):
    """register_node.sh --partition 0 while partition 0 is registered: refused before its key is
    registered with the SuperLink (every later run failed at setup: "partition 0 is registered
    twice"); a free partition goes in as the fourth column."""
    registry = tmp_path / "registered_nodes.tsv"
    registry.write_text("11\tjetson-0\tkey0\t0\n")
    (tmp_path / "k.pub").write_text("a key\n")
    flwr = tmp_path / "flwr"
    flwr.write_text(f'#!/bin/sh\ntouch {tmp_path}/called\necho \'{{"success": true, "node-id": 22}}\'\n')
    flwr.chmod(0o755)
    env = {**os.environ, "FLWR": str(flwr)}
    script = str(JETSON / "server" / "register_node.sh")
    proc = subprocess.run(["bash", script, "--registry", str(registry), "--partition", "0", "jetson-1",
                           str(tmp_path / "k.pub")], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 1 and "partition 0 is already registered" in proc.stderr
    assert not (tmp_path / "called").exists()
    proc = subprocess.run(["bash", script, "--registry", str(registry), "--partition", "1", "jetson-1",
                           str(tmp_path / "k.pub")], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert registry.read_text().splitlines()[-1] == f"22\tjetson-1\t{tmp_path / 'k.pub'}\t1"
