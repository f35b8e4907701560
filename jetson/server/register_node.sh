#!/usr/bin/env bash
# Register a board's public key with the SuperLink, so its SuperNode is admitted.
#
#   register_node.sh [--dry-run] [--superlink CONNECTION] [--registry FILE] [--partition K] NAME KEY.pub
#
# Runs `flwr supernode register KEY.pub [CONNECTION] --name NAME` against the SuperLink
# connection CONNECTION of $FLWR_HOME/config.toml (default: its default connection; see
# jetson/README.md for the connection block with address and root-certificates). Prints
# the node ID and appends "NODE_ID<TAB>NAME<TAB>KEY.pub<TAB>K" to FILE (default
# ./registered_nodes.tsv), which revoke_node.sh reads to revoke a node by name and the
# ServerApp (screen.registry) to accept a node's replies only under NAME and partition K.
# --dry-run prints the command instead of running it.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

dry_run=0
connection=()
registry=./registered_nodes.tsv
partition=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --superlink) connection=("$2"); shift 2 ;;
        --registry) registry="$2"; shift 2 ;;
        --partition) partition="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *) break ;;
    esac
done
[[ $# -eq 2 ]] || usage 2
name="$1"
key="$2"
if [[ -n "$partition" && ! "$partition" =~ ^[0-9]+$ ]]; then
    echo "--partition takes the board's partition number (its export_partition.py --node), got $partition" >&2
    exit 2
fi

cmd=("${FLWR:-flwr}" supernode register "$key" "${connection[@]}" --name "$name" --format json)
if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
[[ -r "$key" ]] || { echo "cannot read public key $key" >&2; exit 1; }
if [[ -f "$registry" ]] && cut -f2 "$registry" | grep -qxF -- "$name"; then
    echo "a node named $name is already in $registry; revoke it first or pick another name" >&2
    exit 1
fi
if [[ -n "$partition" && -f "$registry" ]] && cut -f4 "$registry" | grep -qxF -- "$partition"; then
    echo "partition $partition is already registered in $registry; revoke its board first or pick another" >&2
    exit 1
fi

# flwr prints {"success": ..., "node-id": ...} and exits 0 even on failure: read the JSON.
out=$("${cmd[@]}")
node_id=$(printf '%s\n' "$out" | sed -n 's/.*"node-id": *"\{0,1\}\([0-9][0-9]*\).*/\1/p')
if ! printf '%s\n' "$out" | grep -q '"success": *true' || [[ -z "$node_id" ]]; then
    echo "registration of $key failed:" >&2
    printf '%s\n' "$out" >&2
    exit 1
fi
printf '%s\t%s\t%s\t%s\n' "$node_id" "$name" "$key" "$partition" >>"$registry"
echo "registered $name ($key) as node $node_id"
