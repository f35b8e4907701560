#!/bin/sh
# Install a flmnist SuperNode into a virtual environment, without Docker (a board's CPU).
#
#   install_venv.sh [--python PY] [--requirements FILE] [--dry-run] VENV [-- PIP_OPTIONS...]
#
# Makes VENV with PY (default python3.11; Flower 1.41 needs >= 3.11) and installs exactly
# the pins of FILE (default: jetson/requirements-cpu.txt beside this script: Flower 1.41.0,
# CPU PyTorch 2.9.1; on JetPack 4 without Docker: requirements-cpu-jp4.txt), binary
# wheels only, no dependency resolution (--no-deps: the file is complete, CI checks it for
# aarch64). PIP_OPTIONS go to pip (e.g. --no-index --find-links DIR for an offline board).
# Then checks that flwr is 1.41.0 and that torch imports. flmnist itself is not installed:
# the ClientApp arrives in the signed app bundle; run jetson/device/benchmark.py from the
# checkout. The emulated arm64 rehearsal (jetson/emulated_arm64.py) installs its node with
# this script. --dry-run prints the commands instead of running them.
set -eu

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

here=$(cd "$(dirname "$0")" && pwd)
python=python3.11
requirements="$here/../requirements-cpu.txt"
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python) python="$2"; shift 2 ;;
        --requirements) requirements="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage 2
venv="$1"; shift
if [ $# -gt 0 ]; then
    [ "$1" = "--" ] || usage 2
    shift
fi

run() {
    if [ "$dry_run" -eq 1 ]; then
        for arg in "$@"; do printf '%s ' "$arg"; done; echo
    else
        "$@"
    fi
}

if [ "$dry_run" -eq 0 ]; then
    command -v "$python" >/dev/null || { echo "$python not found: Flower 1.41 needs Python >= 3.11 (jetson/README.md, 'Boards')" >&2; exit 1; }
    "$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' 2>/dev/null \
        || { echo "$python is older than 3.11: Flower 1.41 needs >= 3.11" >&2; exit 1; }
    [ -e "$venv" ] && { echo "$venv exists; remove it first or pick another folder" >&2; exit 1; }
fi

run "$python" -m venv "$venv"
run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -r "$requirements" "$@"
run "$venv/bin/python" -c "import importlib.metadata as m, platform, torch, flwr.clientapp; \
assert m.version('flwr') == '1.41.0', m.version('flwr'); \
print('flwr', m.version('flwr'), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '|', platform.machine(), '|', torch.get_num_threads(), 'threads')"
if [ "$dry_run" -eq 0 ]; then
    echo "SuperNode installed: $venv/bin/flower-supernode (set OMP_NUM_THREADS; see jetson/README.md, 'Boards')"
fi
