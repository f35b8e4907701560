"""Flower's Grid listing node ids in the order the nodes registered, for the synchronous engine.

Flower gives SuperNodes new random node ids every run and ``Grid.get_node_ids()`` lists them in
no fixed order, so Flower's strategies, which sample ``random.sample(list(grid.get_node_ids()),
n)``, would pick different partitions in two runs with the same seed. Flower's simulation
registers the node of partition i as the i-th node, one after another, so the registration
order (``NodeInfo.registered_at``, ties by node id) is the partition order, the same every run,
without a message to any node (asking each node who it is took 66 s at 10,000 nodes). In a
deployment it is the order the SuperNodes registered in.
"""

from __future__ import annotations


class RegistrationOrderGrid:
    """A Flower Grid whose ``get_node_ids()`` lists the connected nodes by registration; the
    order is worked out again only when the set of connected ids changes. Everything else is
    passed through to the wrapped grid."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self._ids: frozenset[int] = frozenset()
        self._order: list[int] = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        ids = frozenset(self._grid.get_node_ids())
        if ids != self._ids:
            registered = {n.node_id: n.registered_at for n in self._grid.get_nodes() if n.node_id in ids}
            # a node listed without its info (it registered between the two calls) comes last
            self._order = sorted(ids, key=lambda n: (n not in registered, registered.get(n, ""), n))
            self._ids = ids
        return list(self._order)
