"""The state a strategy changes during a run, declared by the class that owns it.

A checkpoint saves these attributes and a resumed run restores them; a rejected aggregate
rolls them back with the global model. A strategy class of one's own names its attributes in
a ``checkpoint_state`` class attribute (it replaces the table below, so list inherited ones
too), e.g. ``checkpoint_state = ("current_arrays", "m_t", "v_t", "my_buffer")``. Flower's
own classes are described in :data:`FLOWER_STATE`, matched with ``isinstance``.

Every attribute named must be reassigned (a new object), never updated in place: a rollback
restores the references kept before the aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.serverapp.strategy import FedAvgM, QFedAvg
from flwr.serverapp.strategy.fedopt import FedOpt

# The attributes of Flower's strategies (flwr.serverapp.strategy, 1.41) that change during a
# run. FedAvgM keeps the global model it steps from (set once) and its momentum; FedOpt
# (FedAdam, FedAdagrad, FedYogi) the model of the round and its first and second moments;
# QFedAvg the model of the round. FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum
# and Bulyan keep none.
FLOWER_STATE: Mapping[type, tuple[str, ...]] = {
    FedAvgM: ("current_arrays", "momentum_vector"),
    FedOpt: ("current_arrays", "m_t", "v_t"),
    QFedAvg: ("current_arrays",),
}


def checkpoint_state(strategy) -> tuple[str, ...]:
    """The attributes of ``strategy`` to checkpoint and roll back: its class's own
    ``checkpoint_state`` if it declares one, else :data:`FLOWER_STATE`'s entry for the Flower
    class it is; only names the instance has, in the order declared."""
    declared = getattr(type(strategy), "checkpoint_state", None)
    if isinstance(declared, str):
        raise TypeError(f"{type(strategy).__name__}.checkpoint_state must be a tuple of attribute "
                        f"names, got the string {declared!r}")
    if declared is None:
        owners = (names for cls, names in FLOWER_STATE.items() if isinstance(strategy, cls))
        declared = next(owners, ())
    return tuple(name for name in declared if hasattr(strategy, name))
