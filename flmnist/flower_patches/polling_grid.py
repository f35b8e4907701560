"""A Grid whose ``send_and_receive`` polls for replies every ``poll_interval`` seconds.

Flower 1.41's deployment Grid sleeps 3 s between pulls, which adds up to 3 s to every
message exchange of a round. This wrapper keeps Flower's own round loop
(``Strategy.start``) and only replaces how long it waits between pulls, using the
Grid's ``push_messages`` / ``pull_messages``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message

SIMULATION_POLL = 0.005  # s: the longest wait between pulls in a simulation, where a pull reads the process's own link state
BUSY = 4  # a pass over the link state is followed by a pause of at least BUSY times its duration


def pause_after(began: float, least: float) -> float:
    """Seconds to wait after a pass over the link state that began at ``began`` (``time.perf_counter``):
    ``least``, or BUSY times the pass's duration when that is longer (thousands of messages in
    flight), so that polling never takes more than a fifth of a core. The feeder's and the pulls' one rule."""
    return max(least, BUSY * (time.perf_counter() - began))


def poll_every(grid, configured: float | None) -> float | None:
    """Seconds between pulls for ``grid`` with ``poll_interval=configured`` (None: Flower's own
    polling): in a simulation (Flower's in-memory grid) at most :data:`SIMULATION_POLL`."""
    from flwr.superlink.grid import InMemoryGrid

    if configured and isinstance(grid, InMemoryGrid):
        return min(configured, SIMULATION_POLL)
    return configured or None


class PollingGrid:
    """Wraps a Flower Grid; everything but ``send_and_receive`` is passed through."""

    def __init__(self, grid, poll_interval: float = 0.05) -> None:
        self._grid = grid
        self.poll_interval = poll_interval

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``; pull replies every ``poll_interval`` s until all arrived or ``timeout``."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            began = time.perf_counter()
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(pause_after(began, self.poll_interval))
        return replies
