#!/usr/bin/env bash
# Create a certificate authority (CA) and a TLS certificate for the SuperLink.
#
#   make_certs.sh [--dry-run] [--days N] OUT_DIR SERVER_ADDRESS [MORE_NAMES...]
#   make_certs.sh --renew [--ca-key FILE] [--dry-run] [--days N] OUT_DIR SERVER_ADDRESS [MORE_NAMES...]
#
# SERVER_ADDRESS is the address the Jetson boards use to reach the SuperLink (its LAN
# IP, e.g. 192.168.1.10, or a DNS name). It goes into the certificate's subject
# alternative names (SANs) with any MORE_NAMES, plus 127.0.0.1 and localhost: the
# SuperLink's own SuperExec and the flwr CLI on the server connect over loopback.
#
# Writes OUT_DIR/ca.crt (copy it to every board), ca.key (keep it offline),
# superlink.crt and superlink.key (for start_superlink.sh). Existing files are never
# overwritten. --ca-key FILE: the CA's key is written to (read from) FILE instead of
# OUT_DIR/ca.key, e.g. a root-only folder. --renew (the server's address changed): keeps the
# CA (OUT_DIR/ca.crt and its key), moves superlink.crt/.key to *.old and issues new ones for
# the names given, so boards keep their ca.crt; restart the SuperLink and the proxy then.
# --dry-run prints the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

dry_run=0
days=825
renew=0
ca_key=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --days) days="$2"; shift 2 ;;
        --renew) renew=1; shift ;;
        --ca-key) ca_key="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *) break ;;
    esac
done
[[ $# -ge 2 ]] || usage 2
out_dir="$1"; shift

# One SAN entry per name: IP addresses as IP:, everything else as DNS:.
sans="IP:127.0.0.1,DNS:localhost"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9]+(\.[0-9]+){3}$ || "$name" == *:* ]]; then
        entry="IP:$name"
    else
        entry="DNS:$name"
    fi
    [[ ",$sans," == *",$entry,"* ]] || sans="$sans,$entry"
done

run() {
    if [[ $dry_run -eq 1 ]]; then
        printf '%q ' "$@"; echo
    else
        "$@"
    fi
}

ca_key="${ca_key:-$out_dir/ca.key}"
if [[ $renew -eq 1 ]]; then
    # Same CA, new SuperLink certificate: the boards' ca.crt stays valid.
    if [[ $dry_run -eq 0 ]]; then
        [[ -r "$out_dir/ca.crt" ]] || { echo "--renew: no $out_dir/ca.crt (run without --renew first)" >&2; exit 1; }
        [[ -r "$ca_key" ]] || { echo "--renew: cannot read the CA key $ca_key (bring it back, or pass --ca-key FILE)" >&2; exit 1; }
    fi
    for f in superlink.key superlink.crt; do
        if [[ -e "$out_dir/$f" || $dry_run -eq 1 ]]; then
            run mv -f "$out_dir/$f" "$out_dir/$f.old"
        fi
    done
else
    for f in "$ca_key" "$out_dir/ca.crt" "$out_dir/superlink.key" "$out_dir/superlink.crt"; do
        if [[ -e "$f" ]]; then
            echo "$f exists; refusing to overwrite (remove it to start over, or --renew)" >&2
            exit 1
        fi
    done
fi

echo "SuperLink certificate names: $sans"
run mkdir -p "$out_dir"
run chmod 700 "$out_dir"
if [[ $renew -eq 0 ]]; then
    run mkdir -p "$(dirname "$ca_key")"
    run openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
        -days "$days" -subj "/CN=flmnist federation CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$ca_key" -out "$out_dir/ca.crt"
fi
run openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
    -subj "/CN=flmnist SuperLink" \
    -keyout "$out_dir/superlink.key" -out "$out_dir/superlink.csr"
ext="subjectAltName=$sans
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
if [[ $dry_run -eq 1 ]]; then
    printf 'write %s:\n%s\n' "$out_dir/superlink.ext" "$ext"
else
    printf '%s\n' "$ext" >"$out_dir/superlink.ext"
fi
run openssl x509 -req -in "$out_dir/superlink.csr" -sha384 -days "$days" \
    -CA "$out_dir/ca.crt" -CAkey "$ca_key" -CAcreateserial \
    -extfile "$out_dir/superlink.ext" -out "$out_dir/superlink.crt"
run rm -f "$out_dir/superlink.csr" "$out_dir/superlink.ext"
run chmod 600 "$out_dir/superlink.key"
[[ $renew -eq 1 ]] || run chmod 600 "$ca_key"
if [[ $dry_run -eq 0 ]]; then
    openssl verify -CAfile "$out_dir/ca.crt" "$out_dir/superlink.crt"
fi
