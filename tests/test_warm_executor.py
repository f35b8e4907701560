"""flmnist's warm ClientApp executor (``flmnist-warm-executor``, flmnist/flower_patches/warm_executor.py)
beside a real ``flower-supernode --isolation process``: a real SuperLink (the guide's plain "Try it
first" SuperLink on loopback, ``jetson/rehearsal.py``'s ``TryIt`` with ``executor="warm"``), one
SuperNode and its executor, and real ``flwr run``s:

- a small probe app whose ClientApp answers, dies by SIGKILL, raises, or hangs past the executor's
  task timeout, as the server asks: each failure is that message's error reply, the next message
  is answered by a new child, and the executor is still up;
- flmnist itself (logistic regression, 2 rounds): every task in a forked child, the app loaded
  from the bundle the SuperNode installed;
- and, without Flower, its refusal of any Flower but 1.41.0.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import zipfile
from pathlib import Path

import pytest
from scripts import load_script

from flmnist.flower_patches import warm_child, warm_executor
from flmnist.launch.flwr_local import write_run_config

REPO = Path(__file__).resolve().parents[1]
rehearsal = load_script("flmnist_rehearsal", REPO / "jetson" / "rehearsal.py")
NODE = rehearsal.NAMES[0]


PROBE_APPS = '''"""One query per action of the run's plan, to the one SuperNode, each after the last was answered."""
import os
import signal
import time
import zipfile

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def query(msg: Message, context: Context) -> Message:
    action = msg.content["config"]["action"]
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        raise RuntimeError("warmprobe was asked to raise")
    if action == "hang":
        time.sleep(3600)
    return Message(RecordDict({"who": ConfigRecord({"pid": os.getpid(), "file": __file__})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + float(context.run_config["wait"])
    nodes = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    for action in str(context.run_config["plan"]).split(","):
        start = time.monotonic()
        message = Message(RecordDict({"config": ConfigRecord({"action": action})}), dst_node_id=nodes[0],
                          message_type="query")
        (message_id,) = grid.push_messages([message])
        reply = None
        while reply is None and time.monotonic() < deadline:
            for reply in grid.pull_messages([message_id]):
                pass
            time.sleep(0.05)
        took = time.monotonic() - start
        if reply is None:
            print(f"WARMPROBE {action}: no reply ({took:.1f} s)", flush=True)
        elif reply.has_error():
            print(f"WARMPROBE {action}: error {reply.error.code}: {reply.error.reason} ({took:.1f} s)", flush=True)
        else:
            who = reply.content["who"]
            print(f"WARMPROBE {action}: ok pid={who['pid']} file={who['file']} ({took:.1f} s)", flush=True)
'''


def write_probe(folder: Path) -> Path:
    (folder / "warmprobe").mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(rehearsal.app_pyproject(
        "warmprobe", "1.0.0", "Answers, crashes, raises or hangs as its server asks: the warm executor's failure cases",
        "flmnisttests", {"plan": "ok", "wait": 90}))
    (folder / "warmprobe" / "__init__.py").write_text("")
    (folder / "warmprobe" / "apps.py").write_text(PROBE_APPS)
    return folder


def start_warm_node(r) -> None:
    """The plain SuperLink, one SuperNode in --isolation process and its warm executor, online and polling."""
    r.start_superlink()
    r.start_node(NODE)
    r.wait("the SuperNode online", lambda: list(r.node_list().values()).count("online") == 1, 90)
    r.wait("the warm executor polling", lambda: "polling the SuperNode's Runtime API" in r.executor_log(NODE),
           90, 0.2)


def test_refuses_any_flower_but_1_41_0(monkeypatch, capsys):
    assert warm_executor.version_refusal(warm_executor.FLWR_VERSION) is None
    monkeypatch.setattr(warm_executor, "installed_flower_version", lambda: "1.42.0")
    assert warm_executor.main(["--runtime-api-address", "127.0.0.1:9094", "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "flwr 1.42.0" in err and "Flower 1.41.0" in err, err
    assert "Use Flower's stock executor instead" in err and "flower-supernode --isolation subprocess" in err, err


def test_simulation_runs_are_a_task_type_of_their_own_with_the_servers_libraries_preloaded():
    """``--task-type simulation`` (a sweep's local SuperLink, flmnist.launch.sweep_link) asks for
    Flower's flwr-simulation tasks and preloads the server side too; the default stays ClientApps."""
    captured = {}

    class Stop(Exception):
        pass

    def settings_of(settings):
        captured["settings"] = settings
        raise Stop

    log = warm_executor.LOG
    for argv, task_type in ((["--task-type", "simulation"], "flwr-simulation"), ([], "flwr-clientapp")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(log, "handlers", list(log.handlers))  # main() adds its handler: restored after
            mp.setattr(log, "propagate", log.propagate)
            mp.setattr(log, "level", log.level)
            mp.setattr(warm_executor, "preload", lambda modules: 0.0)
            mp.setattr(warm_executor, "WarmExecutor", settings_of)
            mp.setattr(warm_executor.signal, "signal", lambda *a: None)
            mp.setattr("flwr.supercore.utils.disable_process_dumping", lambda **k: None)
            with pytest.raises(Stop):
                warm_executor.main(["--runtime-api-address", "127.0.0.1:9091", "--insecure", *argv])
        settings = captured.pop("settings")
        assert settings.task_type == task_type
        assert ("flwr.simulation.app" in settings.preload) == (task_type == "flwr-simulation")
        assert "torch" in settings.preload and not any(m.startswith("flmnist") for m in settings.preload)


def test_never_preloads_the_apps_own_modules():
    with pytest.raises(SystemExit, match="never imports the app's own modules"):
        warm_executor.preload(("flmnist.client_app",))


def test_report_frames_round_trip():
    read_fd, write_fd = os.pipe()
    warm_child.report(write_fd, warm_child.PULLED, b"abc")
    warm_child.report(write_fd, warm_child.REPLYING)
    os.close(write_fd)
    data = os.read(read_fd, 1024)
    os.close(read_fd)
    assert warm_child.frames(data) == [(b"M", b"abc"), (b"R", b"")]
    assert warm_child.frames(data[:-1]) == [(b"M", b"abc")]  # a cut frame is left out


def test_a_child_keeps_an_installed_bundle_instead_of_unpacking_it_again(tmp_path, monkeypatch):
    """The directory Flower's install_from_fab would return for a bundle already installed (named by
    its id, version and the hash of its bytes); None, so that Flower installs, for anything else."""
    from types import SimpleNamespace

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    monkeypatch.setattr(warm_child, "_RUN", [SimpleNamespace(fab_id="acme/digits", fab_version="1.0.0")])
    fab = b"the bundle's bytes"
    installed = tmp_path / "apps" / f"acme.digits.1.0.0.{hashlib.sha256(fab).hexdigest()[:8]}"
    assert warm_child._installed_path(fab, skip_prompt=True) is None  # not installed yet
    installed.mkdir(parents=True)
    (installed / "pyproject.toml").write_text("[project]\n")
    assert warm_child._installed_path(fab, skip_prompt=True) == installed
    assert warm_child._installed_path(b"other bytes", skip_prompt=True) is None  # another hash
    assert warm_child._installed_path(fab) is None  # Flower would prompt: its own path
    assert warm_child._installed_path(fab, tmp_path / "elsewhere", skip_prompt=True) is None
    # A simulation child has no task run: the bundle's own pyproject.toml (flmnist's here) names it
    monkeypatch.setattr(warm_child, "_RUN", [])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.write(REPO / "pyproject.toml", "pyproject.toml")
    zipped = buffer.getvalue()
    assert warm_child._installed_path(zipped, skip_prompt=True) is None  # not installed yet
    (named := tmp_path / "apps" / f"flmnist.flmnist.0.1.0.{hashlib.sha256(zipped).hexdigest()[:8]}").mkdir()
    (named / "pyproject.toml").write_text("[project]\n")
    assert warm_child._installed_path(zipped, skip_prompt=True) == named
    assert warm_child._installed_path(fab, skip_prompt=True) is None  # not a bundle: Flower's install says why


def test_jetson_compose_runs_the_warm_executor_beside_the_supernode():
    import yaml

    services = yaml.safe_load((REPO / "jetson" / "docker-compose.yml").read_text())["services"]
    assert "--isolation=${FLMNIST_ISOLATION:-process}" in services["supernode"]["command"]
    executor = services["warm-executor"]
    assert executor["entrypoint"] == ["flmnist-warm-executor"] and executor["network_mode"] == "service:supernode"
    args = warm_executor.parse_args(executor["command"])
    assert (args.runtime_api_address, args.insecure, args.task_timeout, args.exit_when_unreachable) == (
        "127.0.0.1:9094", True, 600, 30)
    assert any(isinstance(v, str) and v.endswith(":/data:ro") for v in executor["volumes"])  # its ClientApps' data
    assert executor["init"] is True  # PID 1 an init process: leftovers reaped
    unit = (REPO / "jetson" / "flmnist-warm-executor.service").read_text()
    assert "docker run --rm --init " in unit
    # Both hold the Runtime API's secret (make_node_key.sh writes it beside node.key): only the
    # executor takes the board's tasks, in compose and under systemd alike
    secret = "--superexec-auth-secret-file=/keys/superexec.secret"
    assert secret in services["supernode"]["command"] and args.superexec_auth_secret_file == "/keys/superexec.secret"
    # a bind mount that is never created: a missing secret became a directory and the SuperNode restarted forever
    mounted = [v for v in executor["volumes"] if isinstance(v, dict) and v.get("target") == "/keys/superexec.secret"]
    assert len(mounted) == 1 and mounted[0]["type"] == "bind" and mounted[0]["read_only"] is True
    assert mounted[0]["source"].endswith("/superexec.secret") and mounted[0]["bind"]["create_host_path"] is False
    assert "--mount type=bind,source=${FLMNIST_KEYS}/superexec.secret,target=/keys/superexec.secret,readonly" in unit
    assert secret in unit and secret in (REPO / "jetson" / "flmnist-supernode.service").read_text()


def test_an_error_reply_the_supernode_refuses_is_logged_and_the_executor_goes_on(monkeypatch, caplog, task_identity):
    """Flower raises ObjectPushError when the SuperNode does not store a reply's objects: the
    executor logs the task's error reply as not accepted and returns (the exception went up
    through reap and step, and the executor's shutdown killed every other child)."""
    from flwr.app import Message, RecordDict
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
    from flwr.supernode.runtime import run_clientapp as flower

    def refuse(*args, **kwargs):
        raise ObjectPushError("abc", 3, "s1")

    monkeypatch.setattr(flower, "push_message", refuse)
    executor = warm_executor.WarmExecutor(warm_executor.Settings("127.0.0.1:9", insecure=True))
    pulled = Message(RecordDict(), dst_node_id=7, message_type="train")
    pulled.metadata.__dict__["_message_id"] = "m" * 64
    pulled.metadata.__dict__["_run_id"] = 3
    child = warm_child.Child(pid=1, task_id=5, run_id=3, token="t", started=time.monotonic(), pipe=-1)
    with caplog.at_level("WARNING", logger="flmnist.warm_executor"):
        assert executor.send_error_reply(child, message_to_proto(pulled).SerializeToString(), "crashed") is False
    assert "task 5: error reply not accepted: ObjectPushError: Failed to push object with ID 'abc'" in caplog.text


@pytest.mark.slow
def test_crashed_raising_and_hung_children_are_answered_and_the_executor_stays_up(tmp_path, mnist_root):
    r = rehearsal.TryIt(tmp_path, mnist_root, executor="warm")
    r.warm_task_timeout = 5
    app = write_probe(tmp_path / "warmprobe")
    log = tmp_path / "logs" / "flwr_warmprobe.log"
    try:
        start_warm_node(r)
        proc = r.start([rehearsal.BIN / "flwr", "run", app, rehearsal.TRY_CONNECTION, "--stream",
                        "--run-config", 'plan="ok,crash,raise,hang,ok"'], r.cli_home, log)
        r.wait("the probe's five answers", lambda: log.read_text(errors="replace").count("WARMPROBE ") >= 5
               or proc.poll() is not None, 150, 0.5)
        executor_alive = r.executors[NODE].poll() is None
    finally:
        stopped, leftover = r.stop()
    out, executor_log = log.read_text(errors="replace"), r.executor_log(NODE)
    answers = dict(re.findall(r"WARMPROBE (\w+): (.*)", out.replace("WARMPROBE ok", "WARMPROBE ok1", 1)))
    print("\n".join(f"{a}: {v}" for a, v in answers.items()))
    assert set(answers) == {"ok1", "crash", "raise", "hang", "ok"}, out[-3000:]
    assert answers["crash"].startswith("error 8: ClientApp process killed by SIGKILL"), answers
    assert answers["raise"].startswith("error 2: ") and "warmprobe was asked to raise" in answers["raise"], answers
    assert answers["hang"].startswith("error 8: ClientApp process killed (SIGKILL) after the task timeout of 5 s"), answers
    # Answered at once by the executor, not by Flower's task expiry (up to 60 s without heartbeats).
    assert float(re.search(r"\((\d+\.\d) s\)$", answers["crash"]).group(1)) < 20, answers["crash"]
    first, last = (re.match(r"ok pid=(\d+) file=(\S+)", answers[k]).groups() for k in ("ok1", "ok"))
    assert first[0] != last[0], "each task runs in a new child"
    apps = (tmp_path / "flwr-home" / NODE / "apps").resolve()
    assert Path(first[1]).resolve().is_relative_to(apps), first[1]  # loaded from the installed bundle
    assert executor_alive, executor_log[-3000:]
    assert executor_log.count("started child") == 5, executor_log[-3000:]
    assert "killed by SIGKILL" in executor_log and "error reply sent to the SuperNode" in executor_log
    assert "after the task timeout of 5 s" in executor_log and "Flower's run_clientapp sent the reply" in executor_log
    assert stopped and leftover == [], leftover


@pytest.mark.slow
def test_flmnist_runs_through_the_warm_executor(tmp_path, mnist_root):
    r = rehearsal.TryIt(tmp_path, mnist_root, executor="warm")
    run_dir = tmp_path / "run"
    # Node 0 of an IID split in 6 (10,000 images); the run goes on with the one node it has.
    split = ["partition=iid", "num_nodes=6"]
    overrides = [*split, "sampling.min_available_nodes=1", "model=logreg", "client.local_steps=1", "num_rounds=2",
                 "data.holdout_fraction=0.05", f"data.root={mnist_root}", f"run_dir={run_dir}", "wait_for_nodes=60"]
    log = tmp_path / "logs" / "flwr_flmnist.log"
    try:
        r.export_partitions(split, [NODE])
        start_warm_node(r)
        start = time.monotonic()
        proc = r.start([rehearsal.BIN / "flwr", "run", REPO, rehearsal.TRY_CONNECTION, "--stream", "--run-config",
                        write_run_config(tmp_path / "run.toml", overrides)], r.cli_home, log, cwd=REPO)
        proc.wait(timeout=180)
        seconds = time.monotonic() - start
        executor_alive = r.executors[NODE].poll() is None
    finally:
        stopped, leftover = r.stop()
    executor_log = r.executor_log(NODE)
    print(f"flwr run: {seconds:.0f} s\n" + "\n".join(line for line in executor_log.splitlines() if "task " in line))
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    assert summary.get("status") == "finished" and summary.get("rounds_completed") == 2, log.read_text()[-3000:]
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert rows[-1]["round"] == 2 and rows[-1]["num_updates"] == 1, rows[-1]
    assert summary["final_accuracy"] > 0.2, summary["final_accuracy"]  # chance: 0.1
    # One exchange per round on a SuperNode (sampling.client_evaluation=auto): two train messages,
    # the second also evaluating round 1's model, and one evaluate message for the final model;
    # each a child that replied and exited 0.
    assert executor_log.count("exited with code 0") == executor_log.count("started child") == 3, executor_log[-3000:]
    assert re.findall(r"task \d+ \((\w+)\): pulled", executor_log) == ["train", "train", "evaluate"], executor_log
    assert [row.get("client_accuracy") is not None for row in rows] == [True, True, True], rows  # rounds 0, 1, 2
    apps = str((tmp_path / "flwr-home" / NODE / "apps").resolve())
    bundle = re.findall(r"app modules loaded from the bundle \((\S+)\), (\d+) from elsewhere", executor_log)
    assert len(bundle) == 3 and all(where.startswith(apps) and n == "0" for where, n in bundle), bundle
    assert "Receiving: train message" in r.node_log(NODE)
    assert executor_alive and stopped and leftover == [], leftover


def test_a_child_pushing_its_reply_is_given_reply_grace_past_its_timeout_then_killed(monkeypatch):
    """Cut off mid-upload, a reply is stored without all its objects and Flower 1.41's SuperNode waits
    for them with no time limit: the task timeout kills a child that is pushing its reply only
    REPLY_GRACE later; one that has pushed it (or not begun) at the timeout."""
    import signal
    import subprocess
    import sys

    monkeypatch.setattr(warm_executor, "REPLY_GRACE", 2.0)
    executor = warm_executor.WarmExecutor(warm_executor.Settings("127.0.0.1:9", insecure=True, task_timeout=1))
    frame = {kind: warm_child._FRAME.pack(kind, 0) for kind in (warm_child.REPLYING, warm_child.REPLIED)}
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
             for _ in range(3)]
    try:
        started = time.monotonic() - 1.5  # each past the 1 s timeout
        mid, done, quiet = (warm_child.Child(pid=p.pid, task_id=i, run_id=1, token="t", started=started, pipe=-1)
                            for i, p in enumerate(procs))
        mid.received += frame[warm_child.REPLYING]
        done.received += frame[warm_child.REPLYING] + frame[warm_child.REPLIED]
        executor.children = {c.pid: c for c in (mid, done, quiet)}
        executor.enforce_timeout()
        assert [procs[i].wait(timeout=10) for i in (1, 2)] == [-signal.SIGKILL] * 2
        assert mid.killed is None and procs[0].poll() is None, "killed while pushing its reply"
        mid.started -= 2.0  # now past the timeout and the grace
        executor.enforce_timeout()
        assert procs[0].wait(timeout=10) == -signal.SIGKILL and "after the task timeout of 1 s" in mid.killed
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_child_that_dies_while_pushing_its_reply_is_logged_with_what_to_do(monkeypatch, caplog):
    """No error reply (the SuperNode would not send it behind the cut-off one): the log says the node
    is held and how to restart its SuperNode."""
    import signal

    executor = warm_executor.WarmExecutor(warm_executor.Settings("127.0.0.1:9", insecure=True))
    monkeypatch.setattr(executor, "send_error_reply", lambda *a: pytest.fail("an error reply was sent"))
    child = warm_child.Child(pid=11, task_id=4, run_id=1, token="t", started=time.monotonic(), pipe=-1)
    child.received += warm_child._FRAME.pack(warm_child.PULLED, 1) + b"x" + warm_child._FRAME.pack(warm_child.REPLYING, 0)
    with caplog.at_level("ERROR", logger="flmnist.warm_executor"):
        executor.finished(child, signal.SIGKILL)  # a wait status: killed by SIGKILL
    assert "task 4: child 11 killed by SIGKILL" in caplog.text and "while pushing its reply" in caplog.text
    assert "restart its SuperNode (systemctl restart flmnist-supernode" in caplog.text
