"""The length defences: an update is judged by its L2 length against the lengths of others.

- ``privacy=client``: an update longer than the clip every node must apply is refused;
- ``screen.max_norm_ratio``: an update longer than that many times the median length is refused
  (with fewer than 3 lengths to take it from, against the global model's own length);
- ``screen.clip_to_median``: an accepted update longer than that many times the median is scaled
  down to it.

The median is over the recent accepted updates (the last ``screen.norm_window``) and the batch
being judged. Asynchronous, it is over each *other* node's latest accepted update and the batch:
one vote per node. Over the recent updates, a fast node that supplies most of them sets the
median: sending each update at 2.9 times it, in one useless direction, it raised the median
500-fold in 100 updates, never clipped, rejected or probed (the effect guard's cheap test uses
these lengths too). With fewer than 3 nodes' lengths, the recent updates are used.
"""

from __future__ import annotations

from collections import deque
from logging import WARNING

import numpy as np
from flwr.common.logger import log

from flmnist.protocol.replies import ClientUpdate, Rejection
from flmnist.protocol.screen import ScreenSettings, Weights, l2_norm


class LengthBounds:
    """Refuses and clips updates by length; remembers the accepted lengths."""

    def __init__(self, settings: ScreenSettings, update_clip: float | None = None,
                 asynchronous: bool = False) -> None:
        self.settings, self.update_clip, self.asynchronous = settings, update_clip, asynchronous
        self.norms: deque[float] = deque(maxlen=settings.norm_window)  # recent accepted lengths
        self.latest: dict[str, float] = {}  # node name -> the length of its latest accepted update
        self.clipped = 0

    def others(self, updates: list[ClientUpdate]) -> list[float]:
        """The lengths ``updates`` are measured against: asynchronous, every other node's latest
        accepted one (if at least 2 nodes have one); else the recent accepted ones."""
        if self.asynchronous:
            names = {u.name for u in updates}
            latest = [n for name, n in self.latest.items() if name not in names]
            if len(latest) >= 2:
                return latest
        return list(self.norms)

    def median(self, updates: list[ClientUpdate]) -> float | None:
        """The median of :meth:`others` and the batch's lengths (None with fewer than 3)."""
        norms = self.others(updates) + [u.norm for u in updates]
        return float(np.median(norms)) if len(norms) >= 3 else None

    def refuse_unclipped(self, updates: list[ClientUpdate], reference: Weights, delta: bool) -> list[Rejection]:
        """``privacy=client``: refuse updates longer than the clip every node must apply (beyond
        float32 rounding of the model the node sends: 1e-5 of the clip plus 2**-22 of the model's
        norm); removes them from ``updates``. No node's clip is trusted: the DP noise covers C."""
        if self.update_clip is None or not updates:
            return []
        c = self.update_clip
        bound = c * (1 + 1e-5) + (0.0 if delta else 2.0**-22 * l2_norm(reference))
        refused = [Rejection(u.node_id, u.name, f"update norm {u.norm:.6g} exceeds privacy.clipping_norm={c:g} "
                             "(privacy=client: every node clips its update to it)") for u in updates if u.norm > bound]
        updates[:] = [u for u in updates if u.norm <= bound]
        return refused

    def refuse_long(self, updates: list[ClientUpdate], reference: Weights) -> list[Rejection]:
        """Refuse updates longer than ``max_norm_ratio`` times the median norm (with fewer than 3
        norms to take it from, the global model's own norm); removes them from ``updates``."""
        s = self.settings
        scale = self.median(updates) or l2_norm(reference)
        refused = []
        if s.max_norm_ratio is not None and scale > 0:
            for u in list(updates):
                if u.norm > s.max_norm_ratio * scale:
                    refused.append(Rejection(u.node_id, u.name, f"update norm {u.norm:.4g} is over "
                                             f"{s.max_norm_ratio:g} x the median {scale:.4g} (screen.max_norm_ratio)"))
                    updates.remove(u)
        return refused

    def clip_long(self, updates: list[ClientUpdate], reference: Weights, delta: bool) -> None:
        """Scale accepted updates longer than ``clip_to_median`` times the median norm down to that
        length (a boosted update the guard let through counts no more than that); remember the norms."""
        s = self.settings
        median = self.median(updates)
        if s.clip_to_median is not None and median:
            bound = s.clip_to_median * median
            for u in updates:
                if u.norm > bound > 0:
                    log(WARNING, "Clipped the update of %s: norm %.4g > %.4g (%g x median)", u.name, u.norm, bound,
                        s.clip_to_median)
                    u.scale_update(bound / u.norm, reference, delta)
                    self.clipped += 1
        self.norms.extend(u.norm for u in updates)
        self.latest.update((u.name, u.norm) for u in updates)
