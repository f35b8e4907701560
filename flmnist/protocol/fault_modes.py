"""The names ``client.fault`` accepts: part of the settings the server sends (checked by
:class:`~flmnist.protocol.messages.TrainSettings`); what each does is :mod:`flmnist.client.faults`'."""

# Malformed replies first; last the one well-formed Byzantine update, which the screen's
# default norm bound lets through (robust aggregators and clip_to_median are its defence).
# ``rotate`` cycles through these two tuples: benchmarks/adversarial.py and the rotate tests
# depend on their exact order and length, so new modes go to HOSTILE_ATTACKS, not here.
TRAIN_ATTACKS = (
    "nan", "complex-nan", "dtype", "shape", "scale", "huge-examples",
    "extra-metric", "missing-metric", "loss-trace-number", "train-loss-list", "partition-inf",
    "long-trace", "bad-node-info", "sign-flip",
)
EVALUATE_ATTACKS = ("eval-list", "eval-missing", "eval-inconsistent", "bad-node-info")
# Well-formed hostile replies, committed only when named (never under ``rotate``): model
# replacement, and the same with another node's identity claimed (train, evaluate and query).
HOSTILE_ATTACKS = ("replace", "impersonate")
FAULTS = frozenset({"error", "boost", "rotate", *TRAIN_ATTACKS, *EVALUATE_ATTACKS, *HOSTILE_ATTACKS})
