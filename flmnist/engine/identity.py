"""Who a node is, decided by the server once, not by each reply.

A reply's ``node-name`` and ``partition-id`` are the node's own words, and a hostile node can
borrow another's (then attribution, the per-node counters and the screen's caps would credit
or blame the wrong board). What Flower authenticates is the node id a reply comes from
(``Message.metadata.src_node_id``: with node authentication, the SuperLink admits a node id
only with the key it was registered with). :class:`IdentityBook` binds each node id to one
identity and judges every later reply by that binding:

- **deployment with a registry** (``screen.registry``: the ``registered_nodes.tsv`` that
  ``jetson/server/register_node.sh`` writes, ``NODE_ID<TAB>NAME<TAB>KEY<TAB>PARTITION``): a node
  id's name, and its partition where given (``--partition``), are the ones the operator
  registered its key under. A reply from a node id not in the registry, or naming itself or its
  partition otherwise, is rejected.
- **everywhere** (simulation, and the partition of a registered node): the first screened
  reply of a node id binds its name and partition id. A later reply claiming another is
  rejected and counted against the bound identity. Two node ids claiming one partition (or
  one name) are both flagged: neither is trusted with it while both are connected, and the
  replies of both are rejected with that reason. When one of them is no longer connected (a
  board that restarted without node authentication comes back with a new node id, and Flower
  drops the old one a minute later), the binding passes to the one still there.

Identities are not checkpointed: node ids are new in every simulation, and a resumed run
binds them afresh.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log

from flmnist.core.errors import ConfigError
from flmnist.protocol.replies import Rejection


@dataclass(frozen=True)
class Identity:
    name: str
    partition: int


def read_registry(path: str | Path) -> dict[int, tuple[str, int | None]]:
    """Node id -> (registered name, partition or None), from ``register_node.sh``'s TSV
    (``NODE_ID<TAB>NAME<TAB>KEY[<TAB>PARTITION]``; a board registered without ``--partition``
    may bind any partition not bound, as without a registry)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except OSError as err:
        raise ConfigError(f"screen.registry={path}: cannot read it ({err.strerror}). It is the file "
                          "jetson/server/register_node.sh appends to (registered_nodes.tsv)") from None
    registry: dict[int, tuple[str, int | None]] = {}
    for number, row in enumerate(csv.reader(text.splitlines(), delimiter="\t"), 1):
        if not row or not "".join(row).strip() or row[0].startswith("#"):
            continue
        part = row[3].strip() if len(row) > 3 else ""
        if len(row) < 2 or not row[0].strip().isdigit() or not row[1].strip() or (part and not part.isdigit()):
            raise ConfigError(f"screen.registry={path}, line {number}: expected NODE_ID<TAB>NAME[<TAB>KEY"
                              f"[<TAB>PARTITION]], got {row!r:.80}")
        node_id, entry = int(row[0]), (row[1].strip(), int(part) if part else None)
        for other, (name, partition) in registry.items():
            if other != node_id and (name == entry[0] or (partition is not None and partition == entry[1])):
                what = f"the name {name!r}" if name == entry[0] else f"partition {partition}"
                raise ConfigError(f"screen.registry={path}, line {number}: {what} is registered twice")
        registry[node_id] = entry
    if not registry:
        raise ConfigError(f"screen.registry={path} lists no node")
    return registry


class IdentityBook:
    """Node id -> its bound :class:`Identity`; :meth:`judge` says why a claim is refused."""

    def __init__(self, registry: dict[int, tuple[str, int | None]] | None = None,
                 connected: Callable[[], Iterable[int]] | None = None) -> None:
        self.registry = registry
        self.connected = connected          # the node ids Flower lists now (engines set it)
        self.bound: dict[int, Identity] = {}
        self.flagged: dict[int, str] = {}   # node id -> why it is trusted with nothing
        self.rivals: dict[int, int] = {}    # flagged node id -> the node id it conflicts with
        self.contested: dict[int, Identity] = {}  # flagged node id -> the identity it and its rival claim
        self.refused_claims = 0
        self.named: Counter = Counter()     # name -> rejected replies counted under it for good
        self.claimed: Counter = Counter()   # (node id, the name it claimed) -> rejected replies, unverified

    def count_rejection(self, node_id: int, name: str) -> None:
        """A rejected reply of ``node_id``, named ``name`` (:meth:`name_of`). A name only claimed
        (by a node id not bound, with no registry) is not counted under it yet: see :meth:`rejections`.
        A node id that claims a second name (or one counted as ``node id N`` already) is believed
        under none: its replies so far and later count under ``node id N`` (a name of its own in
        each reply made the summary grow with them)."""
        if self.registry is None and node_id not in self.bound and not name.startswith("node id "):
            earlier = [n for i, n in self.claimed if i == node_id]
            if earlier in ([], [name]) and f"node id {node_id}" not in self.named:
                self.claimed[node_id, name] += 1
                return
            name = f"node id {node_id}"
            for n in earlier:
                self.named[name] += self.claimed.pop((node_id, n))
        self.named[name] += 1

    def rejections(self) -> Counter:
        """Name -> rejected replies. A claimed name counts as the claimant's once its node id is bound,
        and as ``node id N`` once another node id has bound it: a node that names another in its
        rejected replies before that one first replies (or in the same batch) is not believed."""
        out = Counter(self.named)
        for (node_id, name), count in self.claimed.items():
            out[self.name_of(node_id, name)] += count
        return out

    def failure_of(self, out: Rejection, msg: Message, sent_to: Mapping[str, int] | None) -> Rejection:
        """An error reply, counted under the node it concerns, by that node id's bound identity: the
        node that sent it, or, for an error Flower's SuperLink wrote itself (``src_node_id`` 1: the
        node unreachable, the message or its reply expired), the node the message went to
        (``sent_to``: message id -> node id; it was counted under "node id 1")."""
        node_id, reason = out.node_id, out.reason
        if node_id == SUPERLINK_NODE_ID and sent_to and msg.metadata.reply_to_message_id in sent_to:
            node_id = sent_to[msg.metadata.reply_to_message_id]
            reason = f"{reason} (Flower's SuperLink, error code {msg.error.code})"
        return dataclasses.replace(out, node_id=node_id, name=self.name_of(node_id, f"node id {node_id}"), reason=reason)

    def name_of(self, node_id: int, claimed: str) -> str:
        """The name to count a reply under: the bound or registered one; ``node id N`` for a node
        id trusted with no identity, not in the registry, or claiming a name bound to another
        node id or contested by two (its rejections are never counted against the node it
        names); else what the reply claims."""
        if node_id in self.bound:
            return self.bound[node_id].name
        if self.registry is not None:
            return self.registry.get(node_id, (f"node id {node_id}", None))[0]
        held = (*self.bound.values(), *self.contested.values())  # a contested name is not free either
        if node_id in self.flagged or any(i.name == claimed for i in held):
            return f"node id {node_id}"
        return claimed

    def _holder(self, claim: Identity, node_id: int) -> int | None:
        """Another node id already bound to this partition or name."""
        for other, ident in self.bound.items():
            if other != node_id and (ident.partition == claim.partition or ident.name == claim.name):
                return other
        return None

    def _gone(self, node_id: int) -> bool:
        if self.connected is None:
            return False
        try:
            return node_id not in set(self.connected())
        except Exception:  # noqa: BLE001 - Flower unreachable: assume it is still there
            return False

    def judge(self, node_id: int, name: str, partition: int) -> str | None:
        """None if the claim (``name``, ``partition``) is this node id's identity; else why not."""
        reason = self._judge(node_id, Identity(name, partition))
        if reason:
            self.refused_claims += 1
        return reason

    def _judge(self, node_id: int, claim: Identity) -> str | None:
        if node_id in self.flagged:
            rival = self.rivals.get(node_id)
            if rival is None or not self._gone(rival):
                return self.flagged[node_id]
            log(INFO, "Identity conflict over: node id %d is no longer connected; node id %d may bind %s",
                rival, node_id, claim.name)
            for n in (node_id, rival):
                self.flagged.pop(n, None)
                self.rivals.pop(n, None)
                self.contested.pop(n, None)
        if self.registry is not None:
            if node_id not in self.registry:
                return f"not in the registry (node id {node_id} is not listed in screen.registry)"
            registered, partition = self.registry[node_id]
            if claim.name != registered:
                return (f"claims a name it is not registered under ({claim.name!r}; node id {node_id} is "
                        f"registered as {registered!r})")
            if partition is not None and claim.partition != partition:
                return (f"claims a partition it is not registered for (partition {claim.partition}; node id "
                        f"{node_id} is registered as {registered!r}, partition {partition})")
            holder = next((name for n, (name, part) in self.registry.items() if part == claim.partition and n != node_id),
                          None)
            if partition is None and holder is not None:  # (registered without --partition: not another's)
                return f"claims partition {claim.partition}, registered to {holder!r}"
        bound = self.bound.get(node_id)
        if bound is not None:
            if bound != claim:
                return (f"claims another node's identity ({claim.name}, partition {claim.partition}; "
                        f"node id {node_id} is {bound.name}, partition {bound.partition}, since its first reply)")
            return None
        for rival, ident in self.contested.items():  # a third node id cannot take what two contest
            if rival != node_id and (ident.partition == claim.partition or ident.name == claim.name) \
                    and not self._gone(rival):
                return (f"claims an identity two other node ids contest ({claim.name}, partition {claim.partition}: "
                        f"node ids {min(rival, self.rivals[rival])} and {max(rival, self.rivals[rival])}; nobody "
                        "is trusted with it while they are connected)")
        other = self._holder(claim, node_id)
        if other is not None:
            held = self.bound[other]
            if self._gone(other):
                log(INFO, "%s (partition %d) is now node id %d: node id %d is no longer connected",
                    held.name, held.partition, node_id, other)
                del self.bound[other]
            else:
                first, second = sorted((other, node_id))
                reason = (f"two node ids claim one identity (node ids {first} and {second} both claim "
                          f"{claim.name}, partition {claim.partition}: neither is trusted with it)")
                self.flagged[other] = self.flagged[node_id] = reason
                self.rivals[other], self.rivals[node_id] = node_id, other
                self.contested[other], self.contested[node_id] = self.bound.pop(other), claim
                log(WARNING, "Identity conflict: %s", reason)
                return reason
        self.bound[node_id] = claim
        return None

    def trusted(self, node_id: int) -> bool:
        return node_id not in self.flagged

    def summary(self) -> dict:
        return {
            "bound": {str(n): {"name": i.name, "partition": i.partition} for n, i in sorted(self.bound.items())},
            "flagged": {str(n): r for n, r in sorted(self.flagged.items())},
            "refused_claims": self.refused_claims,
            "registry": self.registry is not None,
        }
