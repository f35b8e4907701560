"""DP-SGD and local DP in synchronous rounds: every training task sent counts, when it is sent.

A task counts for the partition its node id is bound to (a node's first accepted reply binds it,
:class:`~flmnist.engine.identity.IdentityBook`); until then against every partition (the
accountant's ``unattributed`` tasks), and it moves to its own once the node id is bound. The
privacy ledger is written as the tasks go out, so a server that dies mid-round has counted them.
"""

from __future__ import annotations

from collections import Counter
from logging import WARNING

from flwr.common.logger import log

from flmnist.engine.privacy import SampleAccountant
from flmnist.engine.privacy_ledger import save_ledger


class SentTasks:
    """The synchronous engine's training tasks under a per-node accountant (DP-SGD, local DP)."""

    def __init__(self, accountant: SampleAccountant, identities) -> None:
        self.accountant, self.identities = accountant, identities
        self.unbound: Counter[int] = Counter()  # node id -> tasks sent before it was bound
        self.carried = 0    # unattributed tasks a resume took from the ledger: they stay against everyone
        self.per_round = 1  # tasks the last round sent: the most the next one may send
        self.connected: list[int] | None = None  # the node ids Flower listed when they went out

    def sent(self, node_ids: list[int], recorder, connected: list[int] | None = None) -> None:
        """A round's tasks are going out: count them, and write the ledger."""
        self.per_round, self.connected = max(1, len(node_ids)), connected
        self.unbound.update(node_ids)
        self.attribute()
        save_ledger(recorder, self.accountant, self.accountant.epsilon)

    def attribute(self, warn: bool = False) -> None:
        """Move the tasks of node ids bound since to their partitions."""
        for node_id, count in list(self.unbound.items()):
            bound = self.identities.bound.get(node_id)
            if bound is not None:
                for _ in range(count):
                    self.accountant.task(bound.partition, bound.name)
                del self.unbound[node_id]
            elif warn:
                log(WARNING, "Privacy: node id %d has not replied yet; its %d task(s) count against every "
                    "node's budget until it does", node_id, count)
        self.accountant.unattributed = sum(self.unbound.values()) + self.carried

    def would_exceed(self) -> bool:
        """Whether the next round could pass the budget: of its ``per_round`` tasks, each one to a
        node id not bound yet counts against every partition, and a bound node's against its own.
        The unbound ones are the connected node ids not bound, and one for each partition none of whose
        node ids was connected (its board may come back under a new node id, or its old one); before
        a resumed run's first round, whose node ids are new: every partition not bound now."""
        bound, partitions = self.identities.bound, len(self.accountant.train_examples)
        if self.connected is None:
            mine = {identity.partition for identity in bound.values()}
            unbound = partitions - len(mine)
            return self.accountant.would_exceed_by(lambda part: min(self.per_round, unbound + (part in mine)))
        # A partition none of whose node ids was connected may come back under a new node id (a task
        # against everyone); so every partition may get its own task and all the unbound ones.
        present = {bound[n].partition for n in self.connected if n in bound}
        unbound = sum(n not in bound for n in self.connected) + partitions - len(present)
        return self.accountant.would_exceed_by(lambda part: min(self.per_round, unbound + 1))

    def state_dict(self) -> dict:
        return {"unbound_tasks": {str(k): v for k, v in self.unbound.items()}, "round_tasks": self.per_round}

    def load_state_dict(self, state: dict) -> None:
        """After the accountant's state (the checkpoint's, or the ledger's where it spent more)."""
        self.unbound = Counter({int(k): int(v) for k, v in state.get("unbound_tasks", {}).items()})
        self.per_round = int(state.get("round_tasks", 1))
        self.carried = max(0, self.accountant.unattributed - sum(self.unbound.values()))
        self.accountant.unattributed = sum(self.unbound.values()) + self.carried
