"""flmnist's ServerApp, unchanged, with a Grid that prints who answered each message and on what.

Used by the emulated arm64 rehearsal (``jetson/emulated_arm64.py``), which ships this file in the
signed app bundle beside ``flmnist/`` and ``conf/`` and names ``reply_recorder:app`` as the
ServerApp: ``flmnist.server_app.main`` runs as always (same config, same engine, same screen); the
Grid it gets passes every call through and, for every reply it pulls, prints one line::

    FLMNIST-REPLY {"type": "train", "node": "jetson-arm64", "machine": "aarch64", "device": "cpu",
                   "train_time": 41.2, "examples": 320, "seconds": 97.5, "error": null}

(``seconds``: from the push of the message to the pull of its reply). flmnist's own server records
a reply's node name and device but not its ``machine``; this line is how the rehearsal sees it.
"""

from __future__ import annotations

import json
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flmnist.protocol import messages as p
from flmnist.server_app import main as flmnist_main

REPLY_PREFIX = "FLMNIST-REPLY "

app = ServerApp()


def describe(reply, pushed: dict) -> dict:
    """The recorded facts of one reply (never raises: a malformed reply is the screen's business)."""
    line = {"type": reply.metadata.message_type, "node_id": reply.metadata.src_node_id, "error": None}
    sent = pushed.get(reply.metadata.reply_to_message_id)
    line["seconds"] = round(time.monotonic() - sent, 2) if sent is not None else None
    if reply.has_error():
        line["error"] = str(reply.error.reason)[-300:]
        return line
    try:
        info = reply.content.config_records.get(p.NODE_INFO, {})
        line.update(node=info.get(p.NODE_NAME), machine=info.get(p.MACHINE), device=info.get(p.DEVICE))
        metrics = reply.content.metric_records.get(p.METRICS, {})
        if p.TRAIN_TIME in metrics:
            line.update(train_time=round(float(metrics[p.TRAIN_TIME]), 2),
                        examples=int(metrics.get(p.EXAMPLES_PROCESSED, 0)))
    except Exception as err:  # noqa: BLE001 - recording must never change the run
        line["unreadable"] = f"{type(err).__name__}: {err}"
    return line


class RecordingGrid:
    """Wraps a Flower Grid; prints a line for every reply pulled, passes everything through."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._pushed: dict[str, float] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def push_messages(self, messages):
        ids = list(self._grid.push_messages(messages))
        now = time.monotonic()
        self._pushed.update((i, now) for i in ids if i)
        return ids

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            print(REPLY_PREFIX + json.dumps(describe(reply, self._pushed)), flush=True)
        return replies

    def send_and_receive(self, messages, *, timeout: float | None = None):
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while pending:
            got = self.pull_messages(list(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(0.05)
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    flmnist_main(RecordingGrid(grid), context)


def replies(log: str) -> list[dict]:
    """The FLMNIST-REPLY lines of a ``flwr run --stream`` log."""
    found = []
    for line in log.splitlines():
        if REPLY_PREFIX in line:
            try:
                found.append(json.loads(line.split(REPLY_PREFIX, 1)[1]))
            except ValueError:
                continue
    return found
