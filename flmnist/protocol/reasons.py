"""What a rejection reason is counted under in the summary's ``rejection_reasons``.

A reason states the figures of the reply it refused ("update norm 3.1e+30 is over 100 x the
median 0.52", "num-examples 99999 is outside 1..15000") and may quote what the node sent
(a metric's value, its keys). Counted as written, a hostile node varying one number made every
rejection a reason of its own, and the summary, the checkpoint and the run's last lines grew
with each. The kind of a reason is its words before the first " (", with every number written N
and every quoted text '...', at most 80 characters; at most ``MAX_KINDS`` kinds are kept, the
rest count as ``OTHER``.
"""

from __future__ import annotations

import re
from collections import Counter

MAX_KINDS = 50
OTHER = "other reasons"
_NUMBER = re.compile(r"(?<![A-Za-z_\d])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![A-Za-z_\d])")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def reason_kind(reason: str) -> str:
    """``reason`` without its figures: what rejections of one kind share."""
    head = _QUOTED.sub("'...'", reason.split(" (")[0])
    return _NUMBER.sub("N", head)[:80]


def count_reason(reasons: Counter, reason: str, count: int = 1) -> None:
    """Count ``reason`` under its kind in ``reasons`` (a new kind past ``MAX_KINDS``: ``OTHER``)."""
    kind = reason_kind(reason)
    reasons[kind if kind in reasons or len(reasons) < MAX_KINDS else OTHER] += count


def recounted(saved: dict) -> Counter:
    """A checkpoint's reasons counted by kind (an older flmnist's were counted as written)."""
    reasons: Counter = Counter()
    for reason, count in saved.items():
        count_reason(reasons, reason, int(count))
    return reasons
