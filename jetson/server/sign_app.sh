#!/usr/bin/env bash
# Sign the app bundle for the boards and add it to the operator's signed app store.
#
#   sign_app.sh [--dry-run] [--key KEY] [--store DIR] [APP_DIR | FILE.fab]
#
# Builds APP_DIR (default: this repository) into a Flower app bundle (FAB) exactly as `flwr run`
# would, signs it with the Ed25519 key KEY (default ./signing/app-signing.key, from
# make_signing_key.sh; its key ID is the comment of KEY.pub) and stores it in DIR (default
# ./app-store) as PUBLISHER/NAME/VERSION.fab, which `app_store.py serve` hands to the SuperLink.
# Prints the app spec to run, e.g. `flwr run @flmnist/flmnist==0.1.0 CONNECTION`: SuperNodes
# with --trusted-entities refuse `flwr run APP_DIR` (unsigned). Sign again after every change of
# the app's code or config (signing a version again replaces it). Runs app_store.py with the
# Python of flmnist's environment (python on PATH, or PYTHON=path).
# --dry-run prints the command instead of running it.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

here=$(cd "$(dirname "$0")" && pwd)
dry_run=0
key=./signing/app-signing.key
store=./app-store
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --key) key="$2"; shift 2 ;;
        --store) store="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *) break ;;
    esac
done
[[ $# -le 1 ]] || usage 2
app="${1:-$(cd "$here/../.." && pwd)}"

cmd=("${PYTHON:-python}" "$here/app_store.py" sign --key "$key" --store "$store" "$app")
if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
[[ -r "$key" && -r "$key.pub" ]] || { echo "cannot read $key and $key.pub: run make_signing_key.sh first" >&2; exit 1; }
[[ -e "$app" ]] || { echo "no app folder or bundle at $app" >&2; exit 1; }
"${cmd[@]}"
