"""The operator's signed app store: signs Flower app bundles (FABs) and hands them to the SuperLink.

    python jetson/server/app_store.py sign --key KEY --store DIR [APP_DIR | FILE.fab]
    python jetson/server/app_store.py serve --store DIR [--host 127.0.0.1] [--port 8001]
    python jetson/server/app_store.py list --store DIR

Why it exists (Flower 1.41, read in its source): a SuperNode started with
``--trusted-entities`` runs only bundles whose verification records carry an Ed25519 signature
by one of those keys over (8-byte big-endian ``signed_at`` + SHA-256 of the FAB), plus a
``valid_license`` record. The SuperLink fills in these records only for apps it fetches from
"Flower Hub" (``flwr run @account/app==VERSION``: POST ``$FLWR_SUPERGRID_API_URL/hub/fetch-fab``,
then a GET of the returned ``fab_url``); a bundle sent by ``flwr run APP_DIR`` always reaches the
SuperNodes unsigned and is refused. ``serve`` answers those two requests on the server's loopback
from a folder of bundles signed here, so the SuperLink, started with
``FLWR_SUPERGRID_API_URL=http://127.0.0.1:8001/v1`` (``start_superlink.sh --app-store``), ships
the operator's signatures to the boards. Nothing else of the Hub is served.

``sign`` builds the bundle exactly as ``flwr run`` does (``build_fab_from_disk``), or takes a
built ``.fab``, signs it with the operator's Ed25519 OpenSSH private key (``make_signing_key.sh``;
the key ID is the comment of ``KEY.pub``, as in the boards' trusted-entities file) and stores
``DIR/PUBLISHER/NAME/VERSION.fab`` with ``VERSION.json`` (hash and signature). Signing a version
again replaces it. Run it with ``@PUBLISHER/NAME==VERSION``: without a version, the SuperLink
runs the bundle it has cached for the app (refreshed in the background at most every 5 minutes).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FETCH_PATH = "/hub/fetch-fab"  # after FLWR_SUPERGRID_API_URL's path (e.g. /v1)
FAB_PREFIX = "/fabs/"
VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def key_id(public_key_file: Path) -> str:
    """The key ID of an OpenSSH public key line: its comment (``ssh-ed25519 BASE64 ID``)."""
    fields = public_key_file.read_text().split()
    if len(fields) < 3:
        raise ValueError(f"{public_key_file} has no comment: the comment is the key ID (make_signing_key.sh)")
    return fields[2]


def sign_fab(fab: bytes, key_file: Path, public_key_id: str) -> dict:
    """One verification record: the Ed25519 signature of ``signed_at`` + SHA-256(fab), as Flower checks it."""
    from flwr.supercore.primitives.asymmetric_ed25519 import (
        create_message_to_sign,
        load_private_key,
        sign_message,
    )

    private_key = load_private_key(key_file)  # ValueError unless an Ed25519 OpenSSH key
    signed_at = int(time.time())
    signature = sign_message(private_key, create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    return {"public_key_id": public_key_id, "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(),
            "signed_at": signed_at}


def add(store: Path, fab: bytes, verification: dict) -> Path:
    """Store a signed bundle as ``store/PUBLISHER/NAME/VERSION.fab`` (+ ``.json``); returns the ``.fab`` path."""
    from flwr.common.config import get_fab_config, get_metadata_from_config

    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    if not VERSION.match(version):
        raise ValueError(f"version {version!r} is not x.y.z: Flower's app specs accept digits only")
    folder = store / fab_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{version}.fab"
    path.write_bytes(fab)
    record = {"app_id": f"@{fab_id}", "app_version": version, "fab_sha256": hashlib.sha256(fab).hexdigest(),
              "verifications": [verification]}
    (folder / f"{version}.json").write_text(json.dumps(record, indent=1) + "\n")
    return path


def find(store: Path, app_id: str, version: str | None) -> tuple[dict | None, list[str]]:
    """The stored record of ``@PUBLISHER/NAME`` at ``version`` (None: the highest); and all versions."""
    if not re.fullmatch(r"@[\w.-]+/[\w.-]+", app_id or ""):
        return None, []
    folder = store / app_id[1:]
    versions = sorted((p.stem for p in folder.glob("*.json") if VERSION.match(p.stem)), key=_version_key)
    if version is None and versions:
        version = versions[-1]
    if version not in versions:
        return None, versions
    return json.loads((folder / f"{version}.json").read_text()), versions


def make_handler(store: Path):
    class Handler(BaseHTTPRequestHandler):
        server_version = "flmnist-app-store"

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if not self.path.endswith(FETCH_PATH):
                self._json(404, {"detail": "not found"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            except ValueError:
                self._json(400, {"detail": "invalid JSON"})
                return
            record, versions = find(store, body.get("app_id"), body.get("app_version"))
            if record is None:
                self._json(404, {"detail": {"available_app_versions": versions}})
                return
            prefix = self.path[: -len(FETCH_PATH)]
            host = self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"
            url = f"http://{host}{prefix}{FAB_PREFIX}{record['app_id'][1:]}/{record['app_version']}.fab"
            self._json(200, {"fab_url": url, "verifications": record["verifications"]})

        def do_GET(self) -> None:
            marker = self.path.find(FAB_PREFIX)
            rel = self.path[marker + len(FAB_PREFIX):] if marker >= 0 else ""
            match = re.fullmatch(r"([\w.-]+)/([\w.-]+)/(\d+\.\d+\.\d+)\.fab", rel)
            path = store / match[1] / match[2] / f"{match[3]}.fab" if match else None
            if path is None or not path.is_file():
                self._json(404, {"detail": "not found"})
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            print(f"{self.address_string()} {format % args}", file=sys.stderr, flush=True)

    return Handler


def serve(store: Path, host: str, port: int) -> None:
    server = ThreadingHTTPServer((host, port), make_handler(store))
    print(f"app store: serving signed bundles of {store} on http://{host}:{port} "
          f"(SuperLink: FLWR_SUPERGRID_API_URL=http://{host}:{port}/v1)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring and jetson/README.md, 'Control plane'.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_sign = sub.add_parser("sign", help="build (or take) a FAB, sign it and add it to the store")
    p_sign.add_argument("app", nargs="?", default=".", help="app folder (default .) or a built .fab file")
    p_sign.add_argument("--key", required=True, type=Path, help="Ed25519 OpenSSH private key (KEY.pub beside it)")
    p_sign.add_argument("--key-id", help="key ID (default: the comment of KEY.pub)")
    p_sign.add_argument("--store", required=True, type=Path, help="the store folder")
    p_serve = sub.add_parser("serve", help="answer the SuperLink's fetch-fab requests from the store")
    p_serve.add_argument("--store", required=True, type=Path)
    p_serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: keep it loopback)")
    p_serve.add_argument("--port", type=int, default=8001)
    p_list = sub.add_parser("list", help="list the signed bundles in the store")
    p_list.add_argument("--store", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.command == "serve":
        serve(args.store.resolve(), args.host, args.port)
        return 0
    if args.command == "list":
        for record_file in sorted(args.store.glob("*/*/*.json")):
            record = json.loads(record_file.read_text())
            keys = ", ".join(v["public_key_id"] for v in record["verifications"])
            print(f"{record['app_id']}=={record['app_version']}  sha256 {record['fab_sha256'][:16]}  signed by {keys}")
        return 0
    app = Path(args.app)
    if app.is_dir():
        from flwr.cli.build import build_fab_from_disk

        fab = build_fab_from_disk(app)  # what `flwr run APP_DIR` would ship
    else:
        fab = app.read_bytes()
    public_key_id = args.key_id or key_id(Path(f"{args.key}.pub"))
    record = sign_fab(fab, args.key, public_key_id)
    path = add(args.store, fab, record)
    fab_id = path.parent.relative_to(args.store).as_posix()
    print(f"signed @{fab_id}=={path.stem} (sha256 {hashlib.sha256(fab).hexdigest()[:16]}) with {public_key_id}; "
          f"run it with: flwr run @{fab_id}=={path.stem} CONNECTION")
    return 0


if __name__ == "__main__":
    sys.exit(main())
