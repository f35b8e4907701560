#!/usr/bin/env bash
# Start the SuperLink with TLS, SuperNode authentication and a persistent state database.
#
#   start_superlink.sh [--dry-run] [--host HOST] [--port PORT] [--certs DIR] [--database FILE]
#                      [--app-store HOST:PORT] [-- EXTRA...]
#
# HOST/PORT: where the Fleet, Control and Runtime APIs listen (default 127.0.0.1:8000). Flower
# 1.41 serves all three on this one port and its Control API has no authentication, so keep it on
# loopback: the boards reach the Fleet API through start_proxy.sh, the operator's flwr CLI runs
# on this host (or through an SSH tunnel). Any other HOST gets a warning. DIR holds ca.crt,
# superlink.crt and superlink.key from make_certs.sh (default ./certs). FILE is the SQLite state
# database: registered nodes, runs and messages survive a SuperLink restart (default
# ./superlink-state/state.db). --app-store: the signed app store (app_store.py serve, default
# 127.0.0.1:8001) the SuperLink fetches `flwr run @PUBLISHER/NAME==VERSION` bundles and their
# signatures from, instead of Flower Hub (FLWR_SUPERGRID_API_URL).
# Runs flower-superlink in the foreground (exec, so its process ID is this script's), from
# the same environment as flmnist (flower-superlink on PATH, or FLOWER_SUPERLINK=path),
# and never installs app dependencies at run time. EXTRA goes to flower-superlink as is.
# --dry-run prints the command instead of running it.
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

dry_run=0
host=127.0.0.1
port=8000
certs=./certs
database=./superlink-state/state.db
app_store=127.0.0.1:8001
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --certs) certs="$2"; shift 2 ;;
        --database) database="$2"; shift 2 ;;
        --app-store) app_store="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) echo "unknown argument $1" >&2; usage 2 ;;
    esac
done

cmd=(
    env "FLWR_SUPERGRID_API_URL=http://$app_store/v1"
    "${FLOWER_SUPERLINK:-flower-superlink}"
    --host "$host" --port "$port"
    --ssl-ca-certfile "$certs/ca.crt"
    --ssl-certfile "$certs/superlink.crt"
    --ssl-keyfile "$certs/superlink.key"
    --enable-supernode-auth
    --database "$database"
    --disable-runtime-dependency-installation
    "$@"
)

case "$host" in
    127.*|localhost|::1) ;;
    *) echo "warning: the SuperLink listens on $host: its Control API (flwr run, node registration)" \
            "has no authentication; bind it to 127.0.0.1 and put start_proxy.sh in front" >&2 ;;
esac
if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
for f in ca.crt superlink.crt superlink.key; do
    [[ -r "$certs/$f" ]] || { echo "missing $certs/$f: run make_certs.sh first" >&2; exit 1; }
done
mkdir -p "$(dirname "$database")"
# The SuperLink's SuperExec starts the ServerApp; poll for it every 50 ms instead of 1 s.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.05}"
exec "${cmd[@]}"
