#!/usr/bin/env bash
# Start nginx as the SuperLink's LAN-facing reverse proxy: TLS for the boards, Fleet API only.
#
#   start_proxy.sh [--dry-run] [--listen ADDRESS:PORT] [--superlink HOST:PORT] [--certs DIR] [--prefix DIR]
#
# The boards connect to ADDRESS:PORT (default 0.0.0.0:8443; their SUPERLINK_ADDRESS is
# SERVER_ADDRESS:PORT). nginx terminates TLS there with the SuperLink's certificate from
# make_certs.sh (DIR, default ./certs) and forwards only POST /v1/fleet/... (the Fleet API) to the
# SuperLink at HOST:PORT (default 127.0.0.1:8000, start_superlink.sh's loopback address) over TLS,
# checking its certificate against DIR/ca.crt. Everything else (the Control API /v1/control/...,
# the Runtime API /v1/runtime/..., /docs, /health) gets 403. Node authentication is unaffected: a
# SuperNode signs each Fleet request in HTTP headers, which nginx passes on.
# The --prefix folder gets nginx.conf, nginx.pid, error.log, access.log and temp/ (default ./proxy).
# nginx runs in the foreground (exec, so its master's process ID is this script's; stop it with
# SIGTERM or SIGQUIT), never as the system service: NGINX=path picks the binary (Debian: apt-get
# install nginx). A port below 1024 needs root. --dry-run prints the config and the command.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

dry_run=0
listen=0.0.0.0:8443
superlink=127.0.0.1:8000
certs=./certs
prefix=./proxy
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --listen) listen="$2"; shift 2 ;;
        --superlink) superlink="$2"; shift 2 ;;
        --certs) certs="$2"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument $1" >&2; usage 2 ;;
    esac
done
[[ "$listen" == *:* && "$superlink" == *:* ]] || { echo "--listen and --superlink take HOST:PORT" >&2; exit 2; }

# nginx resolves relative paths against its prefix: make ours absolute.
if [[ $dry_run -eq 0 ]]; then
    for f in ca.crt superlink.crt superlink.key; do
        [[ -r "$certs/$f" ]] || { echo "missing $certs/$f: run make_certs.sh first" >&2; exit 1; }
    done
    mkdir -p "$prefix/temp"
    certs=$(cd "$certs" && pwd)
    prefix=$(cd "$prefix" && pwd)
fi

config="# Written by jetson/server/start_proxy.sh: the boards reach the SuperLink's Fleet API only.
worker_processes 1;
pid $prefix/nginx.pid;
error_log $prefix/error.log notice;
events { worker_connections 1024; }
http {
    access_log $prefix/access.log;
    client_body_temp_path $prefix/temp/body;
    proxy_temp_path $prefix/temp/proxy;
    fastcgi_temp_path $prefix/temp/fastcgi;
    uwsgi_temp_path $prefix/temp/uwsgi;
    scgi_temp_path $prefix/temp/scgi;
    server_tokens off;

    server {
        listen $listen ssl;
        ssl_certificate $certs/superlink.crt;
        ssl_certificate_key $certs/superlink.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        # Model updates travel as Fleet push-object/pull-object bodies.
        client_max_body_size 512m;

        # The Fleet API: nginx matches the normalised path (../ and %2F resolved), and the URI
        # in proxy_pass makes it forward that normalised path, never the raw one.
        location /v1/fleet/ {
            limit_except POST { deny all; }
            proxy_pass https://$superlink/v1/fleet/;
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate $certs/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            # Stream bodies both ways: no temporary files, no size limit from buffering.
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }

        # Control API, Runtime API, docs, health: not from the LAN.
        location / {
            default_type text/plain;
            return 403 \"only the Fleet API is served here\\n\";
        }
    }
}"

nginx=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}  # /usr/sbin may be off PATH
cmd=("$nginx" -c "$prefix/nginx.conf" -p "$prefix/" -e "$prefix/error.log" -g "daemon off;")
if [[ $dry_run -eq 1 ]]; then
    printf 'write %s:\n%s\n' "$prefix/nginx.conf" "$config"
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
[[ -x "$(command -v "$nginx")" ]] || { echo "nginx not found: apt-get install nginx (or set NGINX=path)" >&2; exit 1; }
printf '%s\n' "$config" >"$prefix/nginx.conf"
"${cmd[@]}" -t -q
exec "${cmd[@]}"
