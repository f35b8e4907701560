"""An emulated arm64 SuperNode in the loopback deployment rehearsal: a JetPack 4/5 board's CPU path.

    FLMNIST_DATA_DIR=/path/to/mnist python jetson/emulated_arm64.py [--work DIR] [--cache DIR]

Runs as root on an x86_64 Debian/Ubuntu machine (``chroot``, mounts and ``binfmt_misc`` need it):

1. Emulation: installs Debian's ``qemu-user-static binfmt-support mmdebstrap arch-test`` if missing,
   mounts ``binfmt_misc`` and enables ``qemu-aarch64``.
2. An arm64 Debian 12 root (``mmdebstrap --arch=arm64``, Python 3.11 from Debian), cached in
   ``~/.cache/flmnist/arm64/root`` (``--cache``, or ``$FLMNIST_ARM64_CACHE``) between runs.
3. The board's no-Docker install in it: ``jetson/device/install_venv.sh`` makes ``/opt/flmnist/venv``
   from ``jetson/requirements-cpu.txt`` (Flower 1.41.0, CPU PyTorch 2.9.1), binary wheels only.
   The aarch64 wheels are downloaded on the host (pip, its own configuration, ``--platform``) into
   the cache, and installed in the root without network. Cached; redone when the files change.
4. ``jetson/device/benchmark.py`` in the root: LeNet training samples/s under emulation.
5. The rehearsal's deployment (``jetson/rehearsal.py``'s pieces): certificates, a real SuperLink with
   TLS, node authentication and a state database on 127.0.0.1, nginx on 127.0.0.2 forwarding the
   Fleet API only, the operator's signing key, the signed app store; three seed-002 partitions and
   three registered keys: ``jetson-0`` and ``jetson-1`` are x86 SuperNodes from ``.venv``,
   ``jetson-arm64`` (digits 7-9) is ``flower-supernode`` from the venv in the arm64 root, under
   qemu, with its own key, TLS and ``--trusted-entities``, through the proxy.
6. The operator's signed ``flwr run`` of a reduced seed 002: one round of 10 local steps that waits
   for all three nodes. The bundle is flmnist plus ``jetson/reply_recorder.py``, whose ServerApp is
   flmnist's own with a Grid that prints each reply's node-info (flmnist's server does not record
   the ``machine`` field), so the arm64 node's train reply is seen to say ``aarch64``.

Then it checks (``CHECKS``) and prints the figures: root build and install times (when not cached),
the emulated SuperNode's start to online, an emulated ``import torch, flwr`` (what each ClientApp
process pays), samples/s, and the round. qemu emulates a Cortex-A57, the Nano's and TX2's core
(``$FLMNIST_QEMU_CPU`` picks another, e.g. ``neoverse-n1`` for an ARMv8.2 core like Xavier's). Everything started is stopped by process id.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JETSON = REPO / "jetson"
sys.path.insert(0, str(REPO))  # flmnist, when run from a checkout


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


rehearsal = _load("flmnist_rehearsal", JETSON / "rehearsal.py")
check_aarch64 = _load("flmnist_check_aarch64", JETSON / "check_aarch64.py")
reply_recorder_path = JETSON / "reply_recorder.py"

CACHE = Path(os.environ.get("FLMNIST_ARM64_CACHE", "~/.cache/flmnist/arm64")).expanduser()
SUITE = "bookworm"  # Debian 12: Python 3.11, glibc 2.36
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
MMDEBSTRAP = ["mmdebstrap", "--arch=arm64", "--variant=apt", f"--include={PACKAGES}", SUITE]
APT_PACKAGES = ["qemu-user-static", "binfmt-support", "mmdebstrap", "arch-test"]
VENV = "/opt/flmnist/venv"
REQUIREMENTS = JETSON / "requirements-cpu.txt"
INSTALL_INPUTS = [REQUIREMENTS, JETSON / "requirements-supernode.txt", JETSON / "device" / "install_venv.sh"]
ARM = "jetson-arm64"
NAMES = ["jetson-0", "jetson-1", ARM]  # seed 002's partitions 0, 1, 2: the arm64 node holds digits 7-9
THREADS = "2"  # OMP_NUM_THREADS of the emulated node: this machine's 2 cores (a board: benchmark.py says)
# The CPU qemu emulates (QEMU_CPU): the Nano's and TX2's Cortex-A57 (ARMv8.0), the oldest Jetson
# core (torch 2.10.0 stops there with an illegal instruction; 2.9.1 runs). qemu's default, "max",
# has SVE, which no Jetson has: PyTorch then picks SVE kernels that qemu runs about 9 times slower.
QEMU_CPU = os.environ.get("FLMNIST_QEMU_CPU", "cortex-a57")
ROUND_TIMEOUT = 1200
BINFMT = Path("/proc/sys/fs/binfmt_misc")
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # unshare, mount, chroot


def _run(cmd: list, say, timeout: float, what: str, **kwargs) -> float:
    start = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.monotonic() - start


# -- emulation and the cached root --------------------------------------------------------------
def ensure_emulation(say=print) -> None:
    """qemu-user-static registered for aarch64 binaries (installed and enabled if missing)."""
    if os.geteuid() != 0:
        raise RuntimeError("run as root: the arm64 root needs chroot, mounts and binfmt_misc")
    if not all(shutil.which(tool) for tool in ("mmdebstrap", "update-binfmts", "arch-test", "unshare", "chroot")) \
            or not Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P").exists():
        say(f"installing {' '.join(APT_PACKAGES)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "update", "-qq"], say, 600, "apt-get update", env=env)
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES], say, 900,
             "apt-get install", env=env)
    if not (BINFMT / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], say, 30, "mounting binfmt_misc")
    if "enabled" not in _read(BINFMT / "qemu-aarch64"):
        _run(["update-binfmts", "--enable", "qemu-aarch64"], say, 60, "update-binfmts --enable qemu-aarch64")
    if "enabled" not in _read(BINFMT / "qemu-aarch64"):
        raise RuntimeError("qemu-aarch64 is not registered in binfmt_misc")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def build_root(cache: Path = CACHE, say=print) -> tuple[Path, float | None]:
    """The arm64 Debian root (cached); returns it and the seconds its build took (None: cached)."""
    root, stamp = cache / "root", cache / "root" / ".flmnist-root"
    key = " ".join(MMDEBSTRAP)
    if _read(stamp) == key:
        return root, None
    tmp = cache / "root.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    say(f"building the arm64 root: {key} {root} (about 3 minutes, more on a busy machine)")
    seconds = _run([*MMDEBSTRAP, tmp], say, 3600, "mmdebstrap")
    (tmp / "opt" / "flmnist").mkdir(parents=True, exist_ok=True)
    (tmp / ".flmnist-root").write_text(key)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    say(f"arm64 root built in {seconds:.0f} s")
    return root, seconds


def _install_key() -> str:
    digest = hashlib.sha256()
    for path in INSTALL_INPUTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def download_wheels(cache: Path = CACHE, say=print) -> Path:
    """The device set's aarch64 wheels for CPython 3.11 (binary only), downloaded by the host's pip."""
    wheels = cache / "wheels-cp311-aarch64"
    wheels.mkdir(parents=True, exist_ok=True)
    target = next(t for t in check_aarch64.TARGETS if t.requirements == REQUIREMENTS.name)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
          *[f"--platform={p}" for p in target.platforms], "--python-version", target.python,
          "--implementation", "cp", "-d", wheels, "-r", REQUIREMENTS], say, 1800, "pip download (aarch64 wheels)")
    return wheels


def install_venv(root: Path, cache: Path = CACHE, say=print) -> float | None:
    """``install_venv.sh`` in the root (cached by the requirement files); seconds, or None if cached."""
    stamp = root / "opt" / "flmnist" / "venv.stamp"
    key = _install_key()
    if _read(stamp) == key and (root / VENV.lstrip("/") / "bin" / "flower-supernode").exists():
        return None
    wheels = download_wheels(cache, say)
    shutil.rmtree(root / VENV.lstrip("/"), ignore_errors=True)
    stamp.unlink(missing_ok=True)
    say(f"installing {REQUIREMENTS.name} into {VENV} in the arm64 root (emulated pip, no network)")
    argv, made = chroot_argv(root, ["/bin/sh", JETSON / "device" / "install_venv.sh", "--python", "/usr/bin/python3",
                                    VENV, "--", "--no-index", "--find-links", wheels],
                             binds=[(REPO, True), (wheels, True)])
    try:
        seconds = _run(argv, say, 3600, "install_venv.sh in the arm64 root", env=HOST_ENV)
    finally:
        remove_mountpoints(made)
    stamp.write_text(key)
    say(f"venv installed in {seconds:.0f} s")
    return seconds


# -- running things in the root ---------------------------------------------------------------
def chroot_argv(root: Path, cmd: list, binds: list[tuple[Path, bool]], cwd: str | Path = "/",
                env: dict | None = None) -> tuple[list[str], list[Path]]:
    """A command line that runs ``cmd`` in ``root`` in its own mount namespace: /proc, /dev and
    each bound host folder (at the same path; ``True`` = read-only) are mounted there and vanish
    with the namespace. Returns it and the mount points it had to create (``remove_mountpoints``)."""
    made = []
    for path, _ in binds:
        made += _makedirs(root / str(Path(path).resolve()).lstrip("/"))
    q = shlex.quote
    lines = ["set -e", f"mount -t proc proc {q(str(root / 'proc'))}", f"mount --rbind /dev {q(str(root / 'dev'))}",
             f"mount --rbind /sys {q(str(root / 'sys'))}"]
    for path, readonly in binds:
        src = str(Path(path).resolve())
        dst = str(root / src.lstrip("/"))
        lines.append(f"mount --bind {q(src)} {q(dst)}")
        if readonly:
            lines.append(f"mount -o remount,bind,ro {q(dst)}")
    envs = [f"{k}={v}" for k, v in (env or {}).items()]
    lines.append(f"exec chroot {q(str(root))} /usr/bin/env --chdir={q(str(cwd))} {' '.join(map(q, envs))} \"$@\"")
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", "\n".join(lines), "sh",
            *[str(c) for c in cmd]], made


def _makedirs(path: Path) -> list[Path]:
    """Create ``path``; return the folders created, deepest first."""
    created = []
    p = path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return created


def remove_mountpoints(made: list[Path]) -> None:
    for folder in made:  # deepest first; only empty folders (a mount still active is never empty)
        try:
            folder.rmdir()
        except OSError:
            pass


def root_env(threads: str = THREADS) -> dict:
    return {"PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
            "QEMU_CPU": QEMU_CPU}


def in_root(root: Path, cmd: list, timeout: float, binds: list[tuple[Path, bool]] = ()) -> tuple[str, float]:
    """Run ``cmd`` in the root; its output and seconds."""
    argv, made = chroot_argv(root, cmd, list(binds), env=root_env())
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=HOST_ENV)
    finally:
        remove_mountpoints(made)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} in the arm64 root failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout, time.monotonic() - start


def emulated_import(root: Path) -> dict:
    """What starting a ClientApp process costs under emulation: Python with torch and Flower's ClientApp."""
    code = ("import platform, torch, flwr.clientapp, numpy; from importlib.metadata import version; "
            "print(platform.machine(), torch.__version__, torch.version.cuda, version('flwr'), torch.get_num_threads())")
    out, seconds = in_root(root, [f"{VENV}/bin/python", "-c", code], 600)
    machine, torch_version, cuda, flwr_version, threads = out.split()[-5:]
    return {"seconds": round(seconds, 1), "machine": machine, "torch": torch_version, "cuda": cuda,
            "flwr": flwr_version, "threads": int(threads)}


def emulated_benchmark(root: Path, seconds: float = 15) -> dict:
    out, _ = in_root(root, [f"{VENV}/bin/python", JETSON / "device" / "benchmark.py", "--json", "--threads", "1,2",
                            "--seconds", seconds], 1800, binds=[(REPO, True)])
    return json.loads(out.strip().splitlines()[-1])


# -- the rehearsal with the arm64 node ----------------------------------------------------------
class Arm64Rehearsal(rehearsal.Rehearsal):
    """The rehearsal's deployment (control plane on), with one SuperNode started in the arm64 root."""

    def __init__(self, work: Path, data_root: Path, root: Path, app_dir: Path, say=print) -> None:
        super().__init__(work, data_root, app_dir, say, control_plane=True)
        self.root = root
        self.mountpoints: list[Path] = []

    def start_arm64_node(self, name: str):
        self.starts[name] = self.starts.get(name, 0) + 1
        home = self.work / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        if home not in self.homes:
            self.homes.append(home)
        log = self.work / "logs" / f"{name}.{self.starts[name]}.log"
        cwd = self.work / "cwd" / log.stem
        cwd.mkdir(parents=True, exist_ok=True)
        cmd = [str(c) for c in self.supernode_command(name, rehearsal.free_port())]
        cmd[0] = f"{VENV}/bin/flower-supernode"
        env = {**root_env(), "FLWR_HOME": str(home), rehearsal.TASK_POLL_ENV: str(rehearsal.TASK_POLL_INTERVAL)}
        argv, made = chroot_argv(self.root, cmd, [(self.work, False)], cwd=cwd, env=env)
        self.mountpoints += made
        with open(log, "a") as out:
            proc = subprocess.Popen(argv, env={**HOST_ENV, "FLWR_HOME": str(home)}, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.nodes[name] = proc
        return proc

    def stop(self):
        stopped, leftover = super().stop()
        remove_mountpoints(self.mountpoints)
        return stopped, leftover


def write_app(folder: Path) -> Path:
    """flmnist's app folder as it is, plus ``reply_recorder.py`` as the ServerApp."""
    folder.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "flmnist", folder / "flmnist", ignore=ignore)
    shutil.copytree(REPO / "conf", folder / "conf", ignore=ignore)
    shutil.copy(REPO / "README.md", folder / "README.md")
    shutil.copy(reply_recorder_path, folder / "reply_recorder.py")
    pyproject = (REPO / "pyproject.toml").read_text()
    for old, new in (('serverapp = "flmnist.server_app:app"', 'serverapp = "reply_recorder:app"'),
                     ('fab-include = ["flmnist/**/*.py",', 'fab-include = ["reply_recorder.py", "flmnist/**/*.py",')):
        if old not in pyproject:
            raise RuntimeError(f"pyproject.toml no longer has {old!r}: update jetson/emulated_arm64.py")
        pyproject = pyproject.replace(old, new)
    (folder / "pyproject.toml").write_text(pyproject)
    return folder


def run_overrides(run_dir: Path, data_root: Path) -> list[str]:
    """A reduced seed 002: one round of 10 local steps that waits for all three nodes."""
    return ["experiment=seed002", "num_rounds=1", "client.local_steps=10", "eval.rounds=[1]",
            "eval.update_rounds=[1]", "sampling.min_available_nodes=3", "sampling.min_train_nodes=3",
            f"round_timeout={ROUND_TIMEOUT}", "wait_for_nodes=600", f"data.root={data_root}", f"run_dir={run_dir}"]


def rehearse_arm64(work: Path, data_root: Path, root: Path, say=print, timeout: float = 1800) -> dict:
    """The deployment with the emulated node; returns what it saw (judged by ``CHECKS``)."""
    work, data_root = Path(work).resolve(), Path(data_root).resolve()
    seen: dict = {"work": work, "timings": {}}
    r = Arm64Rehearsal(work, data_root, root, write_app(work / "app"), say)
    try:
        r.make_certs()
        r.sh(JETSON / "server" / "make_signing_key.sh", "--id", rehearsal.OPERATOR_KEY_ID, r.signing)
        signed = r.sh(*r.sign_command(r.app_dir, r.signing)).stdout
        r.app = seen["app"] = signed.split("flwr run ")[-1].split()[0]
        r.start_app_store()
        r.start_superlink()
        r.start_proxy()
        r.log(f"SuperLink on {r.address} (TLS, node authentication), nginx on {r.proxy_address}, {r.app} signed")
        r.export_partitions(["experiment=seed002"], NAMES)
        seen["node_ids"] = {}
        for name in NAMES:
            r.make_key(name)
            seen["node_ids"][name] = r.register(name)
        started = time.monotonic()
        r.start_arm64_node(ARM)
        for name in NAMES[:-1]:
            r.start_node(name)
        arm_id = seen["node_ids"][ARM]
        r.wait("the x86 SuperNodes online", lambda: all(r.node_list().get(seen["node_ids"][n]) == "online"
                                                        for n in NAMES[:-1]), 120)
        r.wait(f"{ARM} online", lambda: r.node_list().get(arm_id) == "online", 600, every=1.0)
        seen["timings"]["arm64_online"] = time.monotonic() - started
        seen["status_before_run"] = r.node_list()
        r.log(f"{ARM} (emulated arm64) online {seen['timings']['arm64_online']:.0f} s after its start")
        run_dir = work / "run"
        proc, log, start = rehearsal._start_flwr_run(r, "run", run_overrides(run_dir, data_root))
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"flwr run did not finish within {timeout:.0f} s; see {log}") from err
        seen["run"] = {"returncode": proc.returncode, "log": log.read_text(errors="replace"), "run_dir": run_dir,
                       "seconds": time.monotonic() - start}
        r.log(f"flwr run exited with {proc.returncode} after {seen['run']['seconds']:.0f} s")
    finally:
        seen["arm64_log"] = r.node_log(ARM) if ARM in r.starts else ""
        seen["superlink_log"] = _read(work / "logs" / "superlink.log")
        seen["stopped"], seen["leftover"] = r.stop()
        seen["timings"]["total"] = time.monotonic() - r.t0
        r.log(f"stopped {len(seen['stopped'])} processes; {len(seen['leftover'])} left")
    return seen


# -- checks -------------------------------------------------------------------------------------
def _replies(seen: dict) -> list[dict]:
    return _load("flmnist_reply_recorder", reply_recorder_path).replies(seen["run"]["log"])


def _summary(seen: dict) -> dict:
    return json.loads((seen["run"]["run_dir"] / "summary.json").read_text())


def check_arm64_node_joined(seen: dict) -> None:
    assert seen["status_before_run"].get(seen["node_ids"][ARM]) == "online", seen["status_before_run"]
    assert "SuperNode ID:" in seen["arm64_log"] or "Starting Flower SuperNode" in seen["arm64_log"], \
        seen["arm64_log"][-2000:]


def check_round_finished_with_all_three(seen: dict) -> None:
    summary = _summary(seen)
    assert summary["status"] == "finished", summary
    rows = json.loads((seen["run"]["run_dir"] / "metrics.json").read_text())
    assert rows[-1]["round"] == 1 and rows[-1]["num_updates"] == 3, rows[-1]


def check_arm64_update_accepted(seen: dict) -> None:
    log = seen["run"]["log"]
    assert f"Model update {ARM}: Percentage numbers 0-3:" in log, log[-3000:]
    assert f"Model update {ARM}: Average loss:" in log
    rows = json.loads((seen["run"]["run_dir"] / "metrics.json").read_text())
    assert ARM in rows[-1].get("update_eval", {}), list(rows[-1].get("update_eval", {}))
    assert ARM not in json.dumps(_summary(seen).get("screen", {})), _summary(seen).get("screen")


def check_arm64_reply_says_aarch64(seen: dict) -> None:
    train = [r for r in _replies(seen) if r.get("type") == "train"]
    by_node = {r.get("node"): r for r in train}
    assert set(by_node) == set(NAMES), train
    assert by_node[ARM]["machine"] == "aarch64" and by_node[ARM]["device"] == "cpu", by_node[ARM]
    for name in NAMES[:-1]:
        assert by_node[name]["machine"] == "x86_64", by_node[name]


def check_everything_stopped(seen: dict) -> None:
    assert seen["stopped"] and seen["leftover"] == [], seen["leftover"]


CHECKS = {f.__name__.removeprefix("check_"): f for f in (
    check_arm64_node_joined, check_round_finished_with_all_three, check_arm64_update_accepted,
    check_arm64_reply_says_aarch64, check_everything_stopped)}


def figures(seen: dict) -> dict:
    """The numbers the README reports."""
    out = {k: round(v, 1) for k, v in seen["timings"].items() if isinstance(v, float)}
    arm = next((r for r in _replies(seen) if r.get("type") == "train" and r.get("node") == ARM), None)
    if arm:
        out["arm64_train_reply"] = arm
        if arm.get("train_time"):
            out["arm64_round_samples_per_s"] = round(arm["examples"] / arm["train_time"], 1)
            out["arm64_reply_overhead_s"] = round(arm["seconds"] - arm["train_time"], 1)
    if seen.get("run"):
        out["run_seconds"] = round(seen["run"]["seconds"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="folder to work in (default: a new temporary folder, kept)")
    parser.add_argument("--cache", default=str(CACHE), help=f"root and wheel cache (default {CACHE})")
    parser.add_argument("--data-root", default=os.environ.get("FLMNIST_DATA_DIR"), help="MNIST root")
    parser.add_argument("--benchmark-seconds", type=float, default=15.0,
                        help="seconds per thread count of the emulated benchmark (0: skip it)")
    args = parser.parse_args(argv)
    if not args.data_root:
        parser.error("set FLMNIST_DATA_DIR or --data-root to the MNIST root (holding MNIST/raw/)")
    t0 = time.monotonic()
    cache = Path(args.cache).expanduser()
    ensure_emulation()
    root, built = build_root(cache)
    installed = install_venv(root, cache)
    info = emulated_import(root)
    print(f"arm64 root {root}: root build {'cached' if built is None else f'{built:.0f} s'}, venv install "
          f"{'cached' if installed is None else f'{installed:.0f} s'}; emulated Python start with torch and "
          f"Flower's ClientApp imported: {info['seconds']} s ({info['machine']}, torch {info['torch']}, CUDA "
          f"{info['cuda']}, flwr {info['flwr']}, {info['threads']} threads)", flush=True)
    bench = None
    if args.benchmark_seconds > 0:
        bench = emulated_benchmark(root, args.benchmark_seconds)
        print("emulated benchmark (jetson/device/benchmark.py): " + ", ".join(
            f"{r['threads']} threads {r['samples_per_s']} samples/s" for r in bench["results"]), flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="flmnist-arm64-"))
    seen = rehearse_arm64(work, Path(args.data_root), root)
    failed = 0
    for name, check in CHECKS.items():
        try:
            check(seen)
            print(f"PASS {name}")
        except (AssertionError, KeyError, OSError, ValueError) as err:
            failed += 1
            print(f"FAIL {name}: {err}")
    if seen.get("run"):
        for line in seen["run"]["log"].splitlines():
            if ARM in line and ("Model update" in line or "FLMNIST-REPLY" in line) or "[round 1/1]" in line:
                print("  " + line.strip())
    print("figures: " + json.dumps({**figures(seen), "root_build_s": built, "venv_install_s": installed,
                                    "emulated_import": info, "benchmark": bench,
                                    "whole_command_s": round(time.monotonic() - t0, 1)}))
    print(f"work folder {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
