#!/usr/bin/env bash
# Create a SuperNode's authentication key pair (run it on the board; the private key never leaves it).
#
#   make_node_key.sh [--dry-run] [--secret-only] KEY_PATH [COMMENT]
#
# Writes KEY_PATH, the private key (OpenSSH format, no passphrase, mode 600), and
# KEY_PATH.pub, the public key to copy to the server and register there with
# jetson/server/register_node.sh; and superexec.secret beside them (32 random bytes, mode 600,
# kept if there), which the SuperNode and the warm executor share (--superexec-auth-secret-file):
# only a process holding it takes the board's tasks from the SuperNode's Runtime API.
# --secret-only writes just that file (a board set up before the secret existed). Flower's node authentication takes an elliptic-curve
# key on a NIST curve in OpenSSH format (flower-supernode --auth-supernode-private-key
# reads it with load_ssh_private_key; flwr supernode register reads the .pub with
# load_ssh_public_key); this uses ECDSA on P-384. Existing keys are never overwritten.
# --dry-run prints the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

dry_run=0
secret_only=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --secret-only) secret_only=1; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *) break ;;
    esac
done
[[ $# -ge 1 && $# -le 2 ]] || usage 2
key="$1"
comment="${2:-flmnist-supernode@$(hostname)}"

run() {
    if [[ $dry_run -eq 1 ]]; then
        printf '%q ' "$@"; echo
    else
        "$@"
    fi
}

secret="$(dirname "$key")/superexec.secret"
make_secret() {
    if [[ -d "$secret" ]]; then
        echo "$secret is a directory, not the secret file (Docker makes one when it bind-mounts a" \
             "missing file): remove it (sudo rmdir $secret) and run this again" >&2
        exit 1
    elif [[ -f "$secret" ]]; then
        echo "$secret exists; kept"
    elif [[ $dry_run -eq 1 ]]; then
        printf '%q ' install -D -m 600 /dev/null "$secret"; echo "&& head -c 32 /dev/urandom > $(printf '%q' "$secret")"
    else
        install -D -m 600 /dev/null "$secret" && head -c 32 /dev/urandom > "$secret"
        echo "SuperExec secret: $secret (the SuperNode's and the warm executor's)"
    fi
}
if [[ $secret_only -eq 1 ]]; then
    make_secret
    exit 0
fi

command -v ssh-keygen >/dev/null || { echo "ssh-keygen not found: install openssh-client" >&2; exit 1; }
for f in "$key" "$key.pub"; do
    if [[ -e "$f" ]]; then
        echo "$f exists; refusing to overwrite (a registered key would stop working)" >&2
        exit 1
    fi
done

run mkdir -p "$(dirname "$key")"
run ssh-keygen -q -t ecdsa -b 384 -N "" -C "$comment" -f "$key"
run chmod 600 "$key"
if [[ $dry_run -eq 0 ]]; then
    ssh-keygen -l -f "$key.pub"
    echo "private key: $key (keep it on this board)"
    echo "public key:  $key.pub (copy it to the server and register it)"
fi
make_secret
