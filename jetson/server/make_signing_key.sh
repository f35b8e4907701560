#!/usr/bin/env bash
# Create the operator's app-signing key and the trusted-entities file the boards verify bundles with.
#
#   make_signing_key.sh [--dry-run] [--id KEY_ID] OUT_DIR
#
# Writes OUT_DIR/app-signing.key, an Ed25519 private key (OpenSSH format, no passphrase, mode
# 600: sign_app.sh signs every app bundle with it; keep it on the server, or better offline),
# OUT_DIR/app-signing.key.pub (its comment is KEY_ID) and OUT_DIR/trusted-entities.yaml
# ("KEY_ID: ssh-ed25519 ..."): copy it to every board, where flower-supernode
# --trusted-entities makes the SuperNode refuse any bundle not signed by this key. Flower 1.41
# accepts only Ed25519 keys there. KEY_ID defaults to fpk_flmnist_operator; to change keys, make
# one with another KEY_ID and list both in the boards' file until every bundle is re-signed.
# Existing files are never overwritten. --dry-run prints the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

dry_run=0
key_id=fpk_flmnist_operator
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --id) key_id="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *) break ;;
    esac
done
[[ $# -eq 1 ]] || usage 2
out_dir="$1"
[[ "$key_id" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "KEY_ID may hold letters, digits, _ . - only" >&2; exit 2; }
key="$out_dir/app-signing.key"
trusted="$out_dir/trusted-entities.yaml"

run() {
    if [[ $dry_run -eq 1 ]]; then
        printf '%q ' "$@"; echo
    else
        "$@"
    fi
}

command -v ssh-keygen >/dev/null || { echo "ssh-keygen not found: install openssh-client" >&2; exit 1; }
for f in "$key" "$key.pub" "$trusted"; do
    if [[ -e "$f" ]]; then
        echo "$f exists; refusing to overwrite (bundles signed with it would stop running)" >&2
        exit 1
    fi
done

run mkdir -p "$out_dir"
run ssh-keygen -q -t ed25519 -N "" -C "$key_id" -f "$key"
run chmod 600 "$key"
if [[ $dry_run -eq 1 ]]; then
    printf 'write %s: %s: "<contents of %s>"\n' "$trusted" "$key_id" "$key.pub"
    exit 0
fi
printf '# Bundles a SuperNode runs must be signed by one of these keys (flower-supernode --trusted-entities).\n%s: "%s"\n' \
    "$key_id" "$(cat "$key.pub")" >"$trusted"
ssh-keygen -l -f "$key.pub"
echo "signing key:      $key (keep it here; sign_app.sh uses it)"
echo "trusted entities: $trusted (copy it to every board)"
