"""Check that the device requirement files install on arm64 boards: binary wheels only.

    python jetson/check_aarch64.py            # every target below; exit 1 if one fails

For each target (a requirements file, a board's CPython version and the newest manylinux tag its
glibc accepts) pip resolves every pinned line with ``--only-binary=:all: --platform ...
--python-version ... --no-deps --dry-run --report``, as pip on the board would choose, so a pin
without an aarch64 wheel for that glibc fails here and not on a board. pip evaluates dependency markers
for the machine it runs on (x86_64), not for the target, so the closure is checked separately:
starting from flwr (and torch), each wheel's ``Requires-Dist`` is evaluated for aarch64 Linux and
the target's Python, and every dependency must be pinned in the file with a version that satisfies
it. Needs the package index (pip's own configuration), no emulation; about 10-30 s per target.
``tests/test_jetson.py`` runs it in CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

JETSON = Path(__file__).resolve().parent
ROOTS = ("flwr", "torch")  # what a SuperNode imports; everything else must be pulled in by these


@dataclass(frozen=True)
class Target:
    requirements: str
    python: str
    glibc: int  # the board's glibc 2.x: wheels tagged manylinux_2_17 (manylinux2014) up to 2_x
    what: str

    @property
    def platforms(self) -> list[str]:
        """pip's ``--platform`` values (pip does not widen one manylinux tag to the older ones)."""
        return [f"manylinux_2_{x}_aarch64" for x in range(self.glibc, 16, -1)] + ["manylinux2014_aarch64"]


TARGETS = (
    # JetPack 5 is Ubuntu 20.04 (glibc 2.31); the CPU image is Debian 12 (2.36): 2.28 covers both.
    Target("requirements-cpu.txt", "3.11", 28, "CPU image (Debian 12, Python 3.11) and the JetPack 5 venv"),
    Target("requirements-cpu-jp4.txt", "3.11", 27, "JetPack 4 venv (Ubuntu 18.04, glibc 2.27)"),
    Target("requirements-supernode.txt", "3.12", 28,
           "the Flower set on the GPU image's Python (NVIDIA's igpu images, 3.12)"),
)


def marker_environment(python: str) -> dict:
    return {
        "implementation_name": "cpython", "implementation_version": f"{python}.0", "os_name": "posix",
        "platform_machine": "aarch64", "platform_python_implementation": "CPython", "platform_release": "",
        "platform_system": "Linux", "platform_version": "", "python_full_version": f"{python}.0",
        "python_version": python, "sys_platform": "linux",
    }


def pinned(path: Path) -> dict[str, str]:
    """{name: version} of every ``name==version`` line, following ``-r`` includes."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            pins.update(pinned(path.parent / line[3:].strip()))
        elif line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line} is not pinned with =="
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def resolve(target: Target, pip: list[str] | None = None) -> list[dict]:
    """pip's choice of wheel for each pinned line (its ``--report`` install items)."""
    pip = pip or [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix="flmnist-aarch64-") as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            [*pip, "install", "--dry-run", "--ignore-installed", "--no-deps", "--only-binary=:all:",
             *[f"--platform={p}" for p in target.platforms], "--python-version", target.python,
             "--implementation", "cp",
             "--target", str(Path(tmp) / "target"), "--quiet", "--report", str(report),
             "-r", str(JETSON / target.requirements)],
            capture_output=True, text=True, check=False, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"{target.requirements} for CPython {target.python} aarch64 glibc 2.{target.glibc}: pip "
                                 f"found no wheel for every pin:\n{proc.stderr[-3000:]}")
        return json.loads(report.read_text())["install"]


def missing_dependencies(target: Target, items: list[dict], pins: dict[str, str] | None = None) -> list[str]:
    """Dependencies (for aarch64 and the target's Python) that the file (or ``pins``) does not pin,
    or pins at a version the dependent does not accept; empty when the file is closed."""
    pins = pinned(JETSON / target.requirements) if pins is None else pins
    meta = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in items}
    env = marker_environment(target.python)
    problems, seen, todo = [], set(), [(name, frozenset()) for name in ROOTS if name in pins]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for line in meta[name].get("requires_dist", []):
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                continue
            dep = canonicalize_name(req.name)
            if dep not in pins or dep not in meta:
                problems.append(f"{name} needs {line!r}: not pinned")
            elif not req.specifier.contains(Version(pins[dep]), prereleases=True):
                problems.append(f"{name} needs {line!r}: pinned {dep}=={pins[dep]}")
            else:
                todo.append((dep, frozenset(req.extras)))
    return problems


def wheel_names(items: list[dict]) -> list[str]:
    return [i["download_info"]["url"].rsplit("/", 1)[-1] for i in items]


def check(target: Target) -> list[str]:
    """Every wheel pip would install; raises AssertionError if the target does not resolve."""
    items = resolve(target)
    wheels = wheel_names(items)
    not_binary = [w for w in wheels if not w.endswith(".whl")]
    assert not not_binary, f"{target.requirements}: not wheels: {not_binary}"
    foreign = [w for w in wheels if not (w.endswith("-none-any.whl") or "aarch64" in w)]
    assert not foreign, f"{target.requirements}: wheels that are neither pure Python nor aarch64: {foreign}"
    problems = missing_dependencies(target, items)
    assert not problems, f"{target.requirements} (CPython {target.python}, aarch64):\n" + "\n".join(problems)
    return wheels


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="Takes no options: checks every target in TARGETS.").parse_args(argv)
    failed = 0
    for target in TARGETS:
        try:
            wheels = check(target)
            torch = [w for w in wheels if w.startswith("torch-")]
            print(f"PASS {target.requirements} on CPython {target.python} aarch64, glibc 2.{target.glibc} ({target.what}): "
                  f"{len(wheels)} wheels{', ' + torch[0] if torch else ''}")
        except AssertionError as err:
            failed += 1
            print(f"FAIL {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
