"""The CPU SuperNode for arm64 boards (JetPack 4/5): its pinned requirement files resolve to aarch64
wheels (binary only) for the boards' Pythons (``jetson/check_aarch64.py``; needs the package index,
about a minute), the ClientApp trains with nothing but the device set, the benchmark command, and
the install script's and emulated rehearsal's command lines.

The emulated arm64 SuperNode itself (an arm64 root under qemu in a real TLS + node-auth deployment,
one seed-002 round) is its own command, not part of this suite: ``python jetson/emulated_arm64.py``
(root, qemu, mmdebstrap; see jetson/README.md, "Reference"). Here only its command lines are checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
JETSON = REPO / "jetson"


check_aarch64 = load_script("flmnist_check_aarch64", JETSON / "check_aarch64.py")
RESOLVED: dict[str, list[dict]] = {}


@pytest.mark.parametrize("target", check_aarch64.TARGETS, ids=lambda t: f"{t.requirements}-py{t.python}")
def test_device_requirements_resolve_on_aarch64(target):
    """pip finds an aarch64 (or pure-Python) wheel for every pin, and the file holds every dependency."""
    items = check_aarch64.resolve(target)
    RESOLVED[target.requirements] = items
    wheels = check_aarch64.wheel_names(items)
    assert all(w.endswith("-none-any.whl") or "aarch64" in w for w in wheels), wheels
    assert check_aarch64.missing_dependencies(target, items) == []
    pins = check_aarch64.pinned(JETSON / target.requirements)
    assert len(wheels) == len(pins), (len(wheels), len(pins))
    if "torch" in pins:
        (torch,) = [w for w in wheels if w.startswith("torch-")]
        tag = "manylinux2014_aarch64" if target.glibc < 28 else "manylinux_2_28_aarch64"
        assert torch.endswith(f"{tag}.whl"), torch


def test_closure_check_names_a_missing_or_wrong_pin():
    target = check_aarch64.TARGETS[0]
    items = RESOLVED.get(target.requirements) or check_aarch64.resolve(target)
    pins = check_aarch64.pinned(JETSON / target.requirements)
    without_idna = {k: v for k, v in pins.items() if k != "idna"}
    problems = check_aarch64.missing_dependencies(target, items, without_idna)
    assert any("needs 'idna" in p and "not pinned" in p for p in problems), problems
    old_numpy = {**pins, "numpy": "1.0"}
    problems = check_aarch64.missing_dependencies(target, items, old_numpy)
    assert any(p.startswith("flwr needs 'numpy") and "pinned numpy==1.0" in p for p in problems), problems


def test_device_files_pin_the_servers_flower():
    server = re.search(r'"flwr\[simulation\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    for name in ("requirements-cpu.txt", "requirements-cpu-jp4.txt", "requirements-supernode.txt"):
        pins = check_aarch64.pinned(JETSON / name)
        assert pins["flwr"] == server, (name, pins["flwr"])
        # none of the server's heavier set
        assert not {"hydra-core", "omegaconf", "matplotlib", "onnx", "ray", "torchvision", "flwr-datasets"} & set(pins)
    assert check_aarch64.pinned(JETSON / "requirements-cpu.txt")["torch"] == "2.9.1"
    assert check_aarch64.pinned(JETSON / "requirements-cpu-jp4.txt")["torch"] == "2.5.1"


CLIENT_ONLY = r"""
import sys
SERVER_ONLY = {"hydra", "omegaconf", "matplotlib", "torchvision", "onnx", "ray", "flwr_datasets", "datasets"}
for name in SERVER_ONLY:  # as if not installed: importing them fails, importlib.util.find_spec finds nothing
    sys.modules[name] = None
import json, torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flmnist.protocol import messages as p
from flmnist.client_app import train_handler
from flmnist.ml.models import LeNet

from flwr.supercore.task_identity import TaskIdentity  # what a real ClientApp process has set

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
data_path = sys.argv[1]
settings = p.TrainSettings(model={"_target_": "flmnist.ml.models.LeNet"}, partition={}, num_partitions=3, seed=2,
                           holdout_fraction=0.1, local_steps=3, batch_size=8, lr=0.1)
content = RecordDict({p.ARRAYS: ArrayRecord(LeNet().state_dict()), p.CONFIG: settings.to_record(**{p.SERVER_ROUND: 1})})
msg = Message(content=content, dst_node_id=1, message_type="train")
ctx = Context(run_id=1, node_id=1, node_config={"data-path": data_path, "node-name": "board"}, state=RecordDict(),
              run_config={})
reply = train_handler(msg, ctx)
info = dict(reply.content.config_records[p.NODE_INFO])
metrics = dict(reply.content.metric_records[p.METRICS])
print(json.dumps({"info": info, "examples": metrics[p.EXAMPLES_PROCESSED],
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in SERVER_ONLY and sys.modules[m])}))
"""


def test_client_app_trains_with_the_device_set_only(tmp_path):
    """A SuperNode imports only flwr, numpy and torch: the ClientApp's modules must not need the
    server's packages (Hydra, omegaconf, matplotlib, torchvision, ONNX, Ray, Flower Datasets)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    torch.save({"images": torch.randint(0, 256, (60, 28, 28), dtype=torch.uint8, generator=gen),
                "labels": torch.randint(0, 10, (60,), generator=gen)}, tmp_path / "data.pt")
    (tmp_path / "partition.json").write_text(json.dumps({"node": 2}))
    proc = subprocess.run([sys.executable, "-c", CLIENT_ONLY, str(tmp_path)], capture_output=True, text=True,
                          check=False, timeout=300, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["info"]["node-name"] == "board" and seen["info"]["device"] == "cpu", seen
    assert seen["info"]["machine"] and seen["examples"] == 3 * 8 and seen["modules"] == [], seen


def test_benchmark_prints_samples_per_second_and_fleet_lines():
    script = JETSON / "device" / "benchmark.py"
    proc = subprocess.run([sys.executable, str(script), "--seconds", "0.3", "--threads", "1"], capture_output=True,
                          text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "1 threads:" in out and "samples/s" in out and "set OMP_NUM_THREADS=1" in out, out
    assert re.search(r"base_throughput: \d+\.\d", out) and "speed:" in out, out
    proc = subprocess.run([sys.executable, str(script), "--seconds", "0.3", "--threads", "1", "--json"],
                          capture_output=True, text=True, check=False, timeout=300)
    info = json.loads(proc.stdout)
    assert info["best_threads"] == 1 and info["samples_per_s"] > 0 and info["device"] == "cpu", info
    bad = subprocess.run([sys.executable, str(script), "--threads", "two"], capture_output=True, text=True,
                         check=False, timeout=120)
    assert bad.returncode == 2 and "--threads" in bad.stderr


def test_install_venv_dry_run_installs_exactly_the_pins():
    proc = subprocess.run(["sh", str(JETSON / "device" / "install_venv.sh"), "--dry-run", "/opt/flmnist/venv", "--",
                           "--no-index", "--find-links", "/wheels"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "python3.11 -m venv /opt/flmnist/venv" in proc.stdout
    assert "--no-deps --only-binary=:all: -r" in proc.stdout and "requirements-cpu.txt --no-index --find-links /wheels" \
        in proc.stdout, proc.stdout


def test_emulated_rehearsal_runs_in_a_chroot_of_its_own():
    """The arm64 node's command line: its own mount namespace, /proc, /dev and the work folder
    bound at the same path, the venv's flower-supernode, read-only binds remounted read-only."""
    emulated = load_script("flmnist_emulated_arm64", JETSON / "emulated_arm64.py")
    argv, made = emulated.chroot_argv(Path("/nonexistent-root"), ["/opt/flmnist/venv/bin/flower-supernode", "--x"],
                                      [], cwd="/w", env={"OMP_NUM_THREADS": "2"})
    assert made == [] and argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    script = argv[7]
    assert "mount -t proc proc /nonexistent-root/proc" in script and "mount --rbind /dev /nonexistent-root/dev" in script
    assert "exec chroot /nonexistent-root /usr/bin/env --chdir=/w OMP_NUM_THREADS=2" in script
    assert argv[-2:] == ["/opt/flmnist/venv/bin/flower-supernode", "--x"]
    overrides = emulated.run_overrides(Path("/r"), Path("/m"))
    assert "num_rounds=1" in overrides and "sampling.min_available_nodes=3" in overrides


# -- the guide (jetson/README.md): paths, unit files, options, order ----------------------------------
GUIDE = JETSON / "README.md"
SCRIPT = re.compile(r"(?:jetson/)?((?:server|device)/[\w.-]+\.(?:sh|py))")
SEPARATORS = re.compile(r"&&|\|\||[;|`#]")
IMAGES = ("flmnist-supernode:1.41.0", "flmnist-supernode-cpu:1.41.0")  # their entrypoint is flower-supernode


def _logical_lines(text: str) -> list[str]:
    """Lines with shell/systemd backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def _segments(text: str):
    """Each command segment (a line cut at ``&&``, ``;``, ``|``, backticks and comments)."""
    for line in _logical_lines(text):
        yield from (seg.strip() for seg in SEPARATORS.split(line) if seg.strip())


def _flags_after(segment: str, token: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", segment.split(token, 1)[1]))


def _unit_files() -> dict[str, Path]:
    return {p.name: p for p in JETSON.rglob("*.service")}


def _unit_sections(path: Path) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in _logical_lines(path.read_text()):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.fullmatch(r"\[\w+\]", line):
            current = sections.setdefault(line[1:-1], [])
        else:
            assert current is not None, f"{path.name}: {line!r} before any section"
            current.append(line)
    return sections


def test_guide_paths_exist():
    """Every ``jetson/...`` path the guide names exists, and so does every file of its Files table."""
    text = GUIDE.read_text()
    named = {m.rstrip(".,:)") for m in re.findall(r"(?<![\w.-])jetson/[\w./*-]*[\w*]", text)}
    assert named, "the guide names no jetson/ paths"
    missing = sorted(p for p in named if not list(REPO.glob(p)))
    assert not missing, f"the guide names paths that do not exist: {missing}"
    table = text.split("### Files", 1)[1].split("\n### ", 1)[0]
    first_cells = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `")]
    listed = {t for cell in first_cells for t in re.findall(r"`([^`\s]+)`", cell)}
    assert len(listed) >= 20, listed
    missing = sorted(t for t in listed if not list(JETSON.glob(t)))
    assert not missing, f"the Files table lists files that do not exist under jetson/: {missing}"


def test_guide_units_exist_and_are_complete():
    """Every unit the guide installs or starts has a file under jetson/ with [Unit], [Service] (with
    ExecStart) and [Install]; every script option in an ExecStart exists in that script."""
    text = GUIDE.read_text()
    units = _unit_files()
    named = set(re.findall(r"([\w-]+\.service)\b", text))
    for line in _segments(text):
        if re.match(r"(sudo )?(systemctl|journalctl)\b", line):
            named |= {f"{u}.service" for u in re.findall(r"\b(flmnist-[\w-]+)\b", line)}
    assert {"flmnist-superlink.service", "flmnist-app-store.service", "flmnist-proxy.service",
            "flmnist-supernode.service", "flmnist-supernode-venv.service"} <= named, named
    missing = sorted(named - set(units))
    assert not missing, f"the guide names units without a file under jetson/: {missing}"
    for name in sorted(named):
        sections = _unit_sections(units[name])
        assert {"Unit", "Service", "Install"} <= set(sections), (name, sorted(sections))
        exec_start = [ln for ln in sections["Service"] if ln.startswith("ExecStart=")]
        assert len(exec_start) == 1, (name, exec_start)
        assert any(ln.startswith("WantedBy=") for ln in sections["Install"]), name
        for seg in _segments(exec_start[0]):
            for m in SCRIPT.finditer(seg):
                script = (JETSON / m.group(1)).read_text()
                unknown = sorted(f for f in _flags_after(seg, m.group(0)) if f not in script)
                assert not unknown, f"{name}: {m.group(1)} has no options {unknown}"
    for name in ("flmnist-superlink.service", "flmnist-app-store.service", "flmnist-proxy.service",
                 "flmnist-supernode-venv.service"):
        assert any(ln.startswith("User=flmnist") for ln in _unit_sections(units[name])["Service"]), name


def _help_flags(*cmd: str) -> set[str]:
    proc = subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:], "--help"], capture_output=True,
                          text=True, check=False, timeout=120, env=dict(os.environ, COLUMNS="200"))
    flags = set(re.findall(r"--[a-z][\w-]*", proc.stdout + proc.stderr))
    assert "--help" in flags, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
    return flags


def test_guide_options_exist():
    """Every option the guide passes to a jetson/ script, to flower-superlink, flower-supernode (also
    through the images' entrypoint and the SuperNode units) and to `flwr run` exists there."""
    text = GUIDE.read_text()
    units = "\n".join(p.read_text() for p in _unit_files().values())
    wanted: dict[str, set[str]] = {"flower-superlink": set(), "flower-supernode": set(), "flwr run": set()}
    checked = 0
    for seg in _segments(text):
        for m in SCRIPT.finditer(seg):
            flags = _flags_after(seg, m.group(0))
            unknown = sorted(f for f in flags if f not in (JETSON / m.group(1)).read_text())
            assert not unknown, f"{m.group(1)} has no options {unknown}: {seg}"
            checked += len(flags)
        for program in wanted:
            if re.search(rf"(^|[\s/]){program}\b", seg):
                wanted[program] |= _flags_after(seg, program)
        image = next((i for i in IMAGES if i in seg), None)
        if image and "docker run" in seg and "--entrypoint" not in seg.split(image)[0]:
            wanted["flower-supernode"] |= _flags_after(seg, image)
    warm_executor: set[str] = set()  # flmnist-warm-executor.service: the image with another entrypoint
    for seg in _segments(units):
        if "--entrypoint flmnist-warm-executor" in seg:
            warm_executor |= {f.split("=")[0] for f in _flags_after(seg, "${FLMNIST_IMAGE}")}
        elif "flower-supernode" in seg or any(i in seg for i in ("${FLMNIST_IMAGE}",)):
            token = "flower-supernode" if "flower-supernode" in seg else "${FLMNIST_IMAGE}"
            wanted["flower-supernode"] |= {f.split("=")[0] for f in _flags_after(seg, token)}
    assert checked >= 12, checked
    assert {"--insecure", "--host", "--port"} <= wanted["flower-superlink"], wanted
    assert {"--insecure", "--superlink", "--node-config", "--trusted-entities"} <= wanted["flower-supernode"], wanted
    assert {"--stream", "--run-config"} <= wanted["flwr run"], wanted
    for program, flags in wanted.items():
        known = _help_flags(*program.split())
        assert flags <= known, f"{program} has no options {sorted(flags - known)}"
    assert {"--runtime-api-address", "--task-timeout"} <= warm_executor, warm_executor
    assert warm_executor <= _help_flags("flmnist-warm-executor"), warm_executor


def test_guide_order_and_names():
    """The plain "try it" path comes before the hardened one; node k is jetson-k everywhere, as in
    jetson/rehearsal.py (jetson-0, jetson-1, ...), in the guide and the boards' settings file."""
    text = GUIDE.read_text()
    headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
    try_it = [i for i, h in enumerate(headings) if "try it" in h.lower()]
    hardened = [i for i, h in enumerate(headings) if "hardened" in h.lower()]
    assert len(try_it) == 1 and len(hardened) == 1, headings
    assert try_it[0] < hardened[0], headings
    rehearsal = (JETSON / "rehearsal.py").read_text()
    assert 'NAMES = ["jetson-0", "jetson-1", "jetson-2"]' in rehearsal
    for source in (text, (JETSON / "supernode.env.example").read_text()):
        numbers = re.findall(r"\bjetson-(\d+)\b", source)
        assert numbers and all(n == str(int(n)) for n in numbers), sorted(set(numbers))
    assert "NODE_NAME=jetson-0\n" in (JETSON / "supernode.env.example").read_text()
    # data.root and the run directories are defined before a run uses them
    first_use = text.index("data.root=/srv/flmnist/mnist")
    assert text.index("/srv/flmnist/mnist") < first_use and text.index("/srv/flmnist/runs") < first_use
