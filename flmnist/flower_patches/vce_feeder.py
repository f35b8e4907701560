"""One pass over the pending messages per tick for Flower 1.41's simulation engine.

Flower's simulation engine hands messages to its ClientApp workers from a feeder thread
(``vce_api.add_messages_to_queue``): every 0.1 s it calls ``get_message_ins(node_id, limit=1)``
for each of the N simulated nodes, and each call scans every pending message. A tick thus
costs N x M checks (M messages in flight): 3 s per round at 10,000 nodes with 100 sampled,
and a busy core taken from training; per client update 30 ms at 10,000 nodes and 88 ms at
50,000 (``benchmarks/scale.py``). :func:`feed` does the same work in one pass per tick: the
same expiry and federation check (``_check_stored_messages``), the same "delivered" stamp, at
most one message per node per tick, as Flower's loop does; and as a pass is cheap, it ticks
every 5 ms instead of 100 ms (a message waits 2.5 ms on average instead of 50: a round of seed002
waited about 20 ms for its messages and their replies with ticks and polls of 20 ms, 0.8 s of 40
rounds), or, after a pass that took longer than a millisecond or so (many messages in flight), after
:data:`~flmnist.flower_patches.polling_grid.BUSY` times its duration (``pause_after``, the rule the
synchronous engine's pulls follow too), so that it never takes more than a fifth of a core from training.

:func:`install` puts it in place of Flower's loop for flwr 1.41.0 with its in-memory link
state only; for anything else Flower's own loop runs. ``client_app`` calls it on import: the
simulation engine loads the ClientApp before it starts the feeder thread.
"""

from __future__ import annotations

import threading
import time
from queue import Queue

from flmnist.flower_patches.pinned import FLWR_VERSION
from flmnist.flower_patches.polling_grid import SIMULATION_POLL, pause_after


def feed(state, queue: Queue, nodes_mapping, f_stop: threading.Event, tick: float = SIMULATION_POLL) -> None:
    """Until ``f_stop``: every ``tick`` s, queue each simulated node's oldest undelivered message."""
    from flwr.supercore.date import now

    while not f_stop.is_set():
        began = time.perf_counter()
        with state.lock:
            pending = list(state.message_ins_store)
            state._check_stored_messages(set(pending))  # drops expired and out-of-federation messages
            delivered_at, served, batch = now().isoformat(), set(), []
            for message_id in pending:
                msg = state.message_ins_store.get(message_id)
                if msg is None or msg.metadata.delivered_at != "":
                    continue
                node = msg.metadata.dst_node_id
                if node in nodes_mapping and node not in served:
                    served.add(node)
                    msg.metadata.delivered_at = delivered_at
                    batch.append(msg)
        for msg in batch:
            queue.put(msg)
        f_stop.wait(pause_after(began, tick))


def install() -> bool:
    """Replace Flower's feeder with :func:`feed` (flwr 1.41.0, in-memory link state); True if done."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if flwr.__version__ != FLWR_VERSION or getattr(vce_api.add_messages_to_queue, "flmnist", False):
        return False
    flower_feed = vce_api.add_messages_to_queue

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        if isinstance(state, InMemoryLinkState):
            return feed(state, queue, nodes_mapping, f_stop)
        return flower_feed(state, queue, nodes_mapping, f_stop)

    add_messages_to_queue.flmnist = True
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
