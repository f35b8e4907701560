#!/usr/bin/env bash
# Revoke a board: unregister its node from the SuperLink. Its SuperNode is disconnected
# and its key is refused from then on (register the key again to readmit the board).
#
#   revoke_node.sh [--dry-run] [--superlink CONNECTION] [--registry FILE] NODE_ID|NAME
#
# NAME is looked up in FILE (default ./registered_nodes.tsv, written by register_node.sh);
# a node ID comes from register_node.sh or `flwr supernode list`. Runs
# `flwr supernode unregister NODE_ID [CONNECTION]`, then removes the node's line from FILE.
# --dry-run prints the command instead of running it.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

dry_run=0
connection=()
registry=./registered_nodes.tsv
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --superlink) connection=("$2"); shift 2 ;;
        --registry) registry="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *) break ;;
    esac
done
[[ $# -eq 1 ]] || usage 2
node="$1"

if [[ "$node" =~ ^[0-9]+$ ]]; then
    node_id="$node"
else
    node_id=$( { [[ -f "$registry" ]] && awk -F'\t' -v n="$node" '$2 == n {print $1}' "$registry"; } || true)
    if [[ -z "$node_id" ]]; then
        echo "no node named $node in $registry; pass its node ID (flwr supernode list)" >&2
        exit 1
    fi
fi

cmd=("${FLWR:-flwr}" supernode unregister "$node_id" "${connection[@]}" --format json)
if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
# flwr prints {"success": ...} and exits 0 even on failure: read the JSON.
out=$("${cmd[@]}")
if ! printf '%s\n' "$out" | grep -q '"success": *true'; then
    echo "unregistering node $node_id failed:" >&2
    printf '%s\n' "$out" >&2
    exit 1
fi
if [[ -f "$registry" ]]; then
    tmp=$(mktemp "$registry.XXXXXX")
    awk -F'\t' -v id="$node_id" '$1 != id' "$registry" >"$tmp"
    # mktemp's file is 600 and yours: keep the registry's mode, group and owner (the ServerApp,
    # user flmnist, reads it; the group's members write it)
    chmod --reference="$registry" "$tmp"
    chown --reference="$registry" "$tmp" 2>/dev/null || chgrp --reference="$registry" "$tmp" 2>/dev/null || true
    mv "$tmp" "$registry"
fi
echo "revoked node $node_id"
