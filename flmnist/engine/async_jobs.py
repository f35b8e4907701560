"""The asynchronous loop's bookkeeping records: a dispatched update (:class:`Job`), the jobs in
flight in order of virtual completion (:class:`VirtualQueue`) and a node with its work count
(:class:`Node`)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from flmnist.engine.fleet import UpdateTiming
from flmnist.protocol.replies import NodeInfo


@dataclass(order=True)
class Job:
    """One dispatched client update."""

    vdone: float                      # virtual completion time (simulation), else dispatch order
    seq: int
    node_id: int = field(compare=False)
    message_id: str = field(compare=False)
    version: int = field(compare=False)
    sent: float = field(compare=False)             # real time of dispatch
    vstart: float = field(compare=False, default=0.0)
    timing: UpdateTiming | None = field(compare=False, default=None)


class VirtualQueue:
    """Jobs in flight, released in order of virtual completion time (ties: dispatch order)."""

    def __init__(self) -> None:
        self._heap: list[Job] = []

    def push(self, job: Job) -> None:
        heapq.heappush(self._heap, job)

    def pop(self) -> Job:
        return heapq.heappop(self._heap)

    def peek(self) -> Job:
        return self._heap[0]

    def __len__(self) -> int:
        return len(self._heap)

    def jobs(self) -> list[Job]:
        return list(self._heap)

    def remove(self, job: Job) -> None:
        self._heap.remove(job)
        heapq.heapify(self._heap)


@dataclass
class Node:
    info: NodeInfo
    updates: int = 0      # updates dispatched to this node so far

    @property
    def node_id(self) -> int:
        return self.info.node_id

    @property
    def partition(self) -> int:
        return self.info.partition
